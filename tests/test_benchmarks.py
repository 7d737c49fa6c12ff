"""Smoke runs of the benchmark scripts: each one runs and writes a well-formed section.

These tests check no timing or size threshold: the numbers of a smoke run mean nothing.
"""

from __future__ import annotations

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
}


def run_script(name: str, results: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--results", str(results)],
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
