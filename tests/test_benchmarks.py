"""Smoke runs of the benchmark scripts: each one runs and writes a well-formed section.

These tests check no timing or size threshold: the numbers of a smoke run mean nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_common():
    """Import benchmarks/common.py by path: the scripts are not an installed package."""
    spec = importlib.util.spec_from_file_location("benchmark_common", ROOT / "benchmarks" / "common.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


common = load_common()
NUMBER = re.compile(r"^[+-]?\d+(\.\d+)?x?$")

# Each script: its section in the results file, and the table columns that must hold numbers.
SCRIPTS = {
    "overhead": ("overhead", ["baseline step (ms)", "median ratio", "amortised ratio"]),
    "memory": ("memory", ["RSS after warm-up (MB)", "RSS at end (MB)", "growth (MB)"]),
    "events": ("events", ["bytes per logged step", "largest histogram bytes"]),
    "generator": ("generator", ["vectorised (ms)", "Python loop (ms)", "speed-up"]),
    "accountant_cost": (
        "accountant_cost",
        ["epsilon (ms)", "training step (ms)", "epsilon / step"],
    ),
    "flush_cost": (
        "flush_cost",
        ["wall time per logged step (us)", "CPU time per logged step (us)"],
    ),
}


def run_script(name: str, results: Path) -> subprocess.CompletedProcess[str]:
    return run_benchmark(name, "--smoke", "--results", str(results))


def run_benchmark(name: str, *options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *options],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


@pytest.fixture(scope="module")
def smoke_section(tmp_path_factory: pytest.TempPathFactory):
    """Run a script in smoke mode once per module and return its section of the results."""
    sections: dict[str, str] = {}

    def get(script: str) -> str:
        if script not in sections:
            results = tmp_path_factory.mktemp(script) / "RESULTS.md"
            completed = run_script(script, results)
            assert completed.returncode == 0, completed.stderr
            sections[script] = section(results.read_text(encoding="utf-8"), SCRIPTS[script][0])
        return sections[script]

    return get


def section(text: str, name: str) -> str:
    match = re.search(rf"<!-- begin {name} -->\n(.*?)<!-- end {name} -->", text, re.DOTALL)
    assert match is not None, f"no {name} section in:\n{text}"
    return match.group(1)


def parse_table(text: str) -> tuple[list[str], list[dict[str, str]]]:
    """Return the header and rows of the first Markdown table in ``text``."""
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert len(lines) >= 3, f"no table with rows in:\n{text}"
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}, lines[1]
    rows = []
    for line in lines[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == len(header), f"row {line!r} does not match header {header}"
        rows.append(dict(zip(header, cells)))
    return header, rows


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_benchmark_smoke_run(script: str, smoke_section) -> None:
    body = smoke_section(script)

    assert "- Command: `python benchmarks/" in body
    assert "- Machine: " in body
    assert "- Versions: " in body
    header, rows = parse_table(body)
    numeric_columns = SCRIPTS[script][1]
    for column in numeric_columns:
        assert column in header
    for row in rows:
        if row.get("median ratio", "").startswith("not run"):
            continue  # a combination the callback rejects; the reason is listed below the table
        for column in numeric_columns:
            assert NUMBER.match(row[column]), f"{column} = {row[column]!r} in {row}"


def test_overhead_smoke_covers_grid(smoke_section) -> None:
    _, rows = parse_table(smoke_section("overhead"))

    cells = {(row["model"], row["sample mode"], row["variant"], row["log_every"]) for row in rows}
    for model in common.MODELS:
        assert (model, "hooks", "reference hook", "every step") in cells
        for log_every in ("1", "10", "100"):
            assert (model, "hooks", "callback, raw", log_every) in cells
            assert (model, "hooks", "callback, private", log_every) in cells
            assert (model, "ghost", "callback, raw", log_every) in cells


def test_write_section_replaces_in_place(tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"
    common.write_section(results, "generator", "Generator", ["first"])
    common.write_section(results, "overhead", "Overhead", ["overhead text"])
    results.write_text(results.read_text(encoding="utf-8") + "\nA note by hand.\n", encoding="utf-8")

    common.write_section(results, "generator", "Generator", ["second"])

    text = results.read_text(encoding="utf-8")
    assert text.count("<!-- begin generator -->") == 1
    assert "second" in text
    assert "first" not in text
    assert text.index("<!-- begin overhead -->") < text.index("<!-- begin generator -->")
    assert "A note by hand." in text


def test_every_script_listed() -> None:
    scripts = {path.stem for path in (ROOT / "benchmarks").glob("*.py")} - {"common", "run"}

    assert set(common.SECTIONS) == scripts
    assert set(SCRIPTS) == scripts


def test_accountant_smoke_covers_accountants(smoke_section) -> None:
    _, rows = parse_table(smoke_section("accountant_cost"))

    assert {row["accountant"] for row in rows} == {"rdp", "gdp", "prv"}
    assert len(rows) == 3 * 2
    assert "- Allocator: " in smoke_section("accountant_cost")


def test_flush_smoke_covers_variants(smoke_section) -> None:
    _, rows = parse_table(smoke_section("flush_cost"))

    cells = {(row["events"], row["flush after each step"]) for row in rows}
    assert cells == {
        ("one per step", "yes"),
        ("one per step", "no"),
        ("one per value", "yes"),
        ("one per value", "no"),
    }


def test_accountant_help_runs_nothing() -> None:
    completed = run_benchmark("accountant_cost", "--help")

    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.startswith("usage: accountant_cost.py")
    assert "--results" in completed.stdout
    assert "wrote" not in completed.stdout


def test_directory_results_rejected_before_run(tmp_path: Path) -> None:
    completed = run_benchmark("generator", "--smoke", "--results", str(tmp_path))

    assert completed.returncode == 2
    assert completed.stdout == ""
    assert "Traceback" not in completed.stderr
    error = completed.stderr.splitlines()[-1]
    assert error.startswith("generator.py: error: argument --results: ")
    assert f"directory {str(tmp_path)!r}" in error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("option", ["--blocks", "--steps"])
def test_flush_rejects_zero_count(option: str, tmp_path: Path) -> None:
    results = tmp_path / "RESULTS.md"

    completed = run_benchmark("flush_cost", "--smoke", option, "0", "--results", str(results))

    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr
    error = completed.stderr.splitlines()[-1]
    assert error == f"flush_cost.py: error: argument {option}: expected a positive integer, got 0"
    assert not results.exists()


@pytest.mark.parametrize(
    ("relative", "message"),
    [
        (".", "expected a Markdown file, got the directory"),
        ("missing/RESULTS.md", "does not exist. Create it first"),
    ],
)
def test_results_path_rejects_unwritable(relative: str, message: str, tmp_path: Path) -> None:
    text = str(tmp_path / relative)

    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)) as raised:
        common.results_path(text)

    assert repr(text) in str(raised.value)


def test_results_path_accepts_new_file(tmp_path: Path) -> None:
    assert common.results_path(str(tmp_path / "RESULTS.md")) == tmp_path / "RESULTS.md"


@pytest.mark.parametrize(("text", "shown"), [("0", "0"), ("-3", "-3"), ("two", "'two'")])
def test_positive_int_rejects_value(text: str, shown: str) -> None:
    expected = f"expected a positive integer, got {shown}$"
    with pytest.raises(argparse.ArgumentTypeError, match=expected):
        common.positive_int(text)
