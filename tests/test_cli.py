"""The command line, driven as a user runs it: ``python -m dp_grad_callbacks ...``."""

from __future__ import annotations

import fcntl
import json
import math
import os
import pty
import struct
import subprocess
import sys
import termios
import tomllib
import warnings
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from opacus.accountants import create_accountant
from torch.utils.tensorboard import SummaryWriter

from dp_grad_callbacks import GradNormCallback
from dp_grad_callbacks.cli import build_parser, main
from dp_grad_callbacks.record import GradNormRecord
from dp_grad_callbacks.stats import bucket_limits, clipped_norms
from dp_grad_callbacks.tensorboard import write_record

from conftest import make_private, read_events

ROOT = Path(__file__).resolve().parents[1]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

DRY_RUN_ARGS = (
    "--steps", "12", "--batch-size", "2048", "--log-every", "3", "--seed", "7",
    "--max-grad-norm", "2.0", "--median-ratio", "0.4", "--sigma", "0.5",
)


def run_cli(*args: object, stderr=subprocess.PIPE) -> subprocess.CompletedProcess[str]:
    """Run the command line in a fresh interpreter on this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(
        [sys.executable, "-m", "dp_grad_callbacks", *map(str, args)],
        stdout=subprocess.PIPE, stderr=stderr, text=True, env=env, timeout=600,
    )


def opacus_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
                   delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = create_accountant(accountant)
        reference.history = [(noise_multiplier, sample_rate, steps)]
        return reference.get_epsilon(delta)


def histogram_counts(logdir: Path, tag: str) -> dict[int, list[float]]:
    return {e.step: list(e.histogram_value.bucket) for e in read_events(logdir).Histograms(tag)}


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def logdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def dry(logdir) -> subprocess.CompletedProcess[str]:
    """A dry run with epsilon, written by the command line to ``<logdir>/dry``."""
    return run_cli(
        "dry-run", "--logdir", logdir / "dry", *DRY_RUN_ARGS,
        "--noise-multiplier", "1.2", "--dataset-size", "20480", "--epsilon-every", "5",
    )


@pytest.fixture(scope="module")
def real(logdir) -> list:
    """Records of four steps of a tiny Opacus model, logged by the callback to ``<logdir>/real``."""
    private = make_private(poisson=False)
    records = []
    with GradNormCallback(logdir / "real") as callback:
        callback.attach(private.optimizer)
        for x, y in private.loader:
            private.optimizer.zero_grad()
            private.criterion(private.model(x), y).backward()
            private.optimizer.step()
            records.append(callback.last_record)
    return records


# ---------------------------------------------------------------------- dry-run


def test_dry_run_succeeds_silently_off_terminal(dry):
    assert dry.returncode == 0
    assert dry.stderr == ""
    assert "epsilon after 12 steps" in dry.stdout


def test_dry_run_writes_synthetic_tags_and_steps(dry, logdir):
    events = read_events(logdir / "dry")
    root = "grad_norm/synthetic"

    assert sorted(events.Tags()["histograms"]) == [f"{root}/after_clipping", f"{root}/before_clipping"]
    assert [e.step for e in events.Scalars(f"{root}/samples")] == [0, 3, 6, 9]
    assert [e.value for e in events.Scalars(f"{root}/samples")] == [2048] * 4
    assert [e.value for e in events.Scalars(f"{root}/max_grad_norm")] == [2.0] * 4
    assert [e.histogram_value.num for e in events.Histograms(f"{root}/before_clipping")] == [2048] * 4


def test_dry_run_norms_follow_lognormal_options(dry, logdir):
    events = read_events(logdir / "dry")
    medians = np.array([e.value for e in events.Scalars("grad_norm/synthetic/median")])
    p90s = np.array([e.value for e in events.Scalars("grad_norm/synthetic/p90")])
    after = events.Histograms("grad_norm/synthetic/after_clipping")

    # The median is 0.4 C with C = 2, and p90 / median = exp(z_0.9 * sigma) with sigma = 0.5.
    assert medians == pytest.approx(0.8, rel=0.05)
    assert p90s / medians == pytest.approx(math.exp(1.2815516 * 0.5), rel=0.05)
    assert max(e.histogram_value.max for e in after) <= 2.0 * (1 + 1e-6)


def test_dry_run_epsilon_matches_opacus(dry, logdir):
    epsilon = read_events(logdir / "dry").Scalars("privacy/epsilon")

    assert [e.step for e in epsilon] == [4, 9, 11]
    for event in epsilon:
        expected = opacus_epsilon("rdp", 1.2, 2048 / 20480, event.step + 1, 1e-5)
        assert event.value == pytest.approx(expected, rel=1e-6)


def test_dry_run_tags_match_callback_dry_run(dry, logdir, tmp_path):
    private = make_private()
    with GradNormCallback(tmp_path, dry_run=True) as callback:
        callback.attach(private.optimizer)
        x, y = next(iter(private.loader))
        private.criterion(private.model(x), y).backward()
        private.optimizer.step()
    callback_tags = read_events(tmp_path).Tags()
    cli_tags = read_events(logdir / "dry").Tags()

    assert sorted(cli_tags["histograms"]) == sorted(callback_tags["histograms"])
    assert sorted(set(cli_tags["scalars"]) - {"privacy/epsilon"}) == sorted(callback_tags["scalars"])
    assert sorted(cli_tags["tensors"]) == sorted(callback_tags["tensors"])


def test_dry_run_settings_text(dry, logdir):
    events = read_events(logdir / "dry").Tensors("grad_norm/dp_settings/text_summary")
    text = events[0].tensor_proto.string_val[0].decode()

    assert events[0].step == 0
    assert "| Clipping bound C (max_grad_norm) | 2 |" in text
    assert "| Noise multiplier | 1.2 |" in text
    assert "| Sample rate | 0.1 |" in text
    assert "| Accountant | rdp |" in text
    assert "median 0.4 C, sigma 0.5" in text


def test_dry_run_same_seed_same_norms(dry, logdir, tmp_path):
    again = run_cli("dry-run", "--logdir", tmp_path, *DRY_RUN_ARGS)

    assert again.returncode == 0
    tag = "grad_norm/synthetic/before_clipping"
    assert histogram_counts(tmp_path, tag) == histogram_counts(logdir / "dry", tag)
    assert "privacy/epsilon" not in read_events(tmp_path).Tags()["scalars"]


def test_dry_run_gdp_epsilon_and_warning_lines(tmp_path):
    result = run_cli(
        "dry-run", "--logdir", tmp_path, "--steps", "5", "--batch-size", "8",
        "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--accountant", "gdp",
        "--epsilon-every", "2",
    )

    assert result.returncode == 0
    epsilon = read_events(tmp_path).Scalars("privacy/epsilon")
    assert [e.step for e in epsilon] == [1, 3, 4]
    for event in epsilon:
        expected = opacus_epsilon("gdp", 1.0, 0.01, event.step + 1, 1e-5)
        assert event.value == pytest.approx(expected, rel=1e-6)
    lines = result.stderr.splitlines()
    assert lines
    assert all(line.startswith("dp-grad-callbacks: warning: ") for line in lines)
    assert "GDP accounting is experimental" in lines[0]


def test_dry_run_progress_bar_on_terminal(tmp_path):
    controller, terminal = pty.openpty()
    # A fresh pseudo-terminal is 0 columns wide, and tqdm draws nothing in 0 columns.
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-m", "dp_grad_callbacks", "dry-run", "--logdir", str(tmp_path),
         "--steps", "20", "--batch-size", "4"],
        stdout=subprocess.DEVNULL, stderr=terminal, env=env,
    )
    os.close(terminal)
    output = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # Linux raises EIO once the process closed the terminal.
            break
        if not chunk:
            break
        output += chunk
    os.close(controller)

    assert process.wait(timeout=600) == 0
    assert b"dry run:" in output
    assert b"step" in output


# ---------------------------------------------------------------------- summary


def test_summary_json_numbers(dry, real, logdir):
    result = run_cli("summary", logdir, "--json")

    assert result.returncode == 0
    document = json.loads(result.stdout)
    rows = {row["run"]: row for row in document["runs"]}
    assert sorted(rows) == ["dry", "real"]

    last = real[-1]
    row = rows["real"]
    assert row["tag_root"] == "grad_norm"
    assert row["synthetic"] is False
    assert row["logged_steps"] == len(real)
    assert row["last_step"] == last.step
    assert row["clipped_fraction"] == pytest.approx(np.mean(last.before > 0.5), rel=1e-6)
    assert row["median"] == pytest.approx(np.quantile(last.before, 0.5), rel=1e-6)
    assert row["p90"] == pytest.approx(np.quantile(last.before, 0.9), rel=1e-6)
    assert row["max_grad_norm"] == 0.5
    medians = [np.quantile(record.before, 0.5) for record in real]
    assert row["suggested_max_grad_norm"] == pytest.approx(np.median(medians), rel=1e-6)
    assert row["suggestion_steps"] == len(real)

    synthetic = rows["dry"]
    assert synthetic["tag_root"] == "grad_norm/synthetic"
    assert synthetic["synthetic"] is True
    assert synthetic["logged_steps"] == 4
    assert synthetic["last_step"] == 9
    assert synthetic["max_grad_norm"] == 2.0
    assert synthetic["suggested_max_grad_norm"] is None


def test_summary_table_labels_suggestion(dry, real, logdir):
    result = run_cli("summary", logdir, "--recent-steps", "2")

    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:3] == ["run", "tag", "root"]
    real_row = next(line for line in lines if line.startswith("real "))
    medians = [np.quantile(record.before, 0.5) for record in real[-2:]]
    assert real_row.split()[-1] == f"{np.median(medians):.4g}"
    dry_row = next(line for line in lines if line.startswith("dry "))
    assert dry_row.split()[-1] == "-"
    assert "suggested C: the median of the per-step median norms over the last 2" in result.stdout
    assert "It is a suggestion" in result.stdout


# ---------------------------------------------------------------------- plot


def test_plot_writes_png_of_figure_size(real, logdir, tmp_path):
    out = tmp_path / "plot.png"

    result = run_cli("plot", logdir, "--run", "real", "--out", out)

    assert result.returncode == 0, result.stderr
    assert png_size(out) == (800, 900)
    assert out.stat().st_size > 10_000
    assert f"steps {real[-1].step}" in result.stdout


def test_plot_several_steps_and_dpi(real, logdir, tmp_path):
    out = tmp_path / "plot.png"

    result = run_cli("plot", logdir, "--run", "real", "--out", out, "--step", "0", "--step", "2",
                     "--dpi", "50")

    assert result.returncode == 0, result.stderr
    assert png_size(out) == (400, 450)
    assert "steps 0, 2" in result.stdout


def test_plot_without_matplotlib_names_pip_command(real, logdir, tmp_path):
    out = tmp_path / "plot.png"
    # A None entry in sys.modules makes `import matplotlib` fail as if it were not installed.
    code = (
        "import sys; sys.modules['matplotlib'] = None; "
        "from dp_grad_callbacks.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, "plot", str(logdir), "--run", "real", "--out", str(out)],
        capture_output=True, text=True, cwd=ROOT, timeout=600,
    )

    assert result.returncode == 1
    assert result.stderr.count("\n") == 1
    assert "pip install 'dp-grad-callbacks[plot]'" in result.stderr
    assert not out.exists()


# ---------------------------------------------------------------------- export


def expected_points(norms: np.ndarray, max_grad_norm: float) -> list[dict[str, float]]:
    """Density points of the norms over log-spaced buckets, ten per decade around C."""
    edges = max_grad_norm * 10.0 ** (np.arange(-30, 21) / 10)
    counts, _ = np.histogram(norms, bins=edges)
    nonzero = np.flatnonzero(counts)
    used = slice(nonzero[0], nonzero[-1] + 1)
    widths = np.diff(edges)[used]
    centres = ((edges[:-1] + edges[1:]) / 2)[used]
    density = counts[used] / (norms.size * widths)
    return [{"x": float(x), "y": float(y)} for x, y in zip(centres, density)]


def assert_points_equal(actual, expected):
    assert len(actual) == len(expected)
    assert [p["x"] for p in actual] == pytest.approx([p["x"] for p in expected], rel=1e-9)
    assert [p["y"] for p in actual] == pytest.approx([p["y"] for p in expected], rel=1e-9)


def test_export_step_points_from_buckets(real, logdir):
    record = real[1]

    result = run_cli("export", logdir, "--run", "real", "--step", record.step)

    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert sorted(document) == ["after_clipping", "before_clipping"]
    assert_points_equal(document["before_clipping"], expected_points(record.before, 0.5))
    assert_points_equal(document["after_clipping"], expected_points(record.after, 0.5))
    for points in document.values():
        assert [p["x"] for p in points] == sorted(p["x"] for p in points)
        assert all(set(p) == {"x", "y"} for p in points)


def test_export_out_file_defaults_to_last_step(real, logdir, tmp_path):
    out = tmp_path / "points.json"

    result = run_cli("export", logdir, "--run", "real", "--out", out)

    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert f"step {real[-1].step}" in result.stderr
    document = json.loads(out.read_text())
    assert_points_equal(document["before_clipping"], expected_points(real[-1].before, 0.5))


# ---------------------------------------------------------------------- bad input


def file_in_the_way(tmp_path: Path) -> Path:
    """Return a path below a regular file, which no one can create, root included."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    return blocker / "sub"


def no_norm_tags(tmp_path: Path) -> Path:
    with SummaryWriter(str(tmp_path / "other")) as writer:
        writer.add_scalar("loss", 1.0, 0)
    return tmp_path


def run_in_process(args, capsys) -> tuple[int, str]:
    """Run ``main`` in this interpreter and return its exit status and stderr."""
    try:
        status = main([str(arg) for arg in args])
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err


def assert_one_line_error(stderr: str, message: str) -> None:
    assert stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    assert message in stderr


# The failures that users meet most, run as a user runs them.
@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, logdir: ("summary", tmp / "missing"), "log directory not found: {tmp}/missing"),
        (lambda tmp, logdir: ("summary", tmp), "no TensorBoard event files found under {tmp}"),
        (lambda tmp, logdir: ("summary", no_norm_tags(tmp)), "no gradient-norm tags"),
        (lambda tmp, logdir: ("export", logdir, "--run", "real", "--step", "999"),
         "step 999 not found in real:grad_norm. Logged steps: 0, 1, 2, 3"),
        (lambda tmp, logdir: ("plot", logdir, "--run", "real", "--out", file_in_the_way(tmp) / "p.png"),
         "failed to write {tmp}/blocker/sub/p.png: Not a directory"),
    ],
    ids=["missing-logdir", "empty-logdir", "no-norm-tags", "unknown-step", "unwritable-output"],
)
def test_failure_exits_1_with_one_line(real, logdir, tmp_path, make_args, message):
    result = run_cli(*make_args(tmp_path, logdir))

    assert result.returncode == 1
    assert_one_line_error(result.stderr, message.format(tmp=tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dry-run", "--max-grad-norm", "0"),
         "argument --max-grad-norm: expected a finite positive number, got '0'"),
        (("dry-run", "--batch-size", "0"), "argument --batch-size: expected a positive integer, got '0'"),
    ],
    ids=["zero-c", "zero-batch"],
)
def test_usage_error_exits_2_with_one_line(args, message):
    result = run_cli(*args)

    assert result.returncode == 2
    assert_one_line_error(result.stderr, message)


# More failures, in this interpreter to save the start-up time of one per case.
@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda tmp, logdir: ("plot", logdir, "--run", "real", "--step", "7", "--out", tmp / "p.png"),
         "step 7 not found"),
        (lambda tmp, logdir: ("plot", logdir, "--out", tmp / "p.png"),
         "Choose one with --run and --tag-root"),
        (lambda tmp, logdir: ("export", logdir, "--run", "nothing"), "run 'nothing' not found"),
        (lambda tmp, logdir: ("export", logdir, "--run", "real", "--out", file_in_the_way(tmp) / "p.json"),
         "failed to write {tmp}/blocker/sub/p.json: Not a directory"),
        (lambda tmp, logdir: ("dry-run", "--steps", "2", "--logdir", file_in_the_way(tmp)),
         "failed to write the log directory {tmp}/blocker/sub: Not a directory"),
        (lambda tmp, logdir: ("summary", file_in_the_way(tmp).parent),
         "log directory is not a directory: {tmp}/blocker"),
    ],
    ids=["plot-unknown-step", "ambiguous-series", "unknown-run", "export-unwritable",
         "dry-run-unwritable", "logdir-is-file"],
)
def test_more_failures_exit_1(dry, real, logdir, tmp_path, capsys, make_args, message):
    status, stderr = run_in_process(make_args(tmp_path, logdir), capsys)

    assert status == 1
    assert_one_line_error(stderr, message.format(tmp=tmp_path))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("dry-run", "--max-grad-norm", "-1.5"),
         "argument --max-grad-norm: expected a finite positive number, got '-1.5'"),
        (("dry-run", "--max-grad-norm", "nan"),
         "argument --max-grad-norm: expected a finite positive number, got 'nan'"),
        (("dry-run", "--batch-size", "many"),
         "argument --batch-size: expected a positive integer, got 'many'"),
        (("dry-run", "--noise-multiplier", "1"), "--noise-multiplier needs --sample-rate or --dataset-size"),
        (("dry-run", "--sample-rate", "0.1"), "--sample-rate and --dataset-size need --noise-multiplier"),
        (("dry-run", "--noise-multiplier", "1", "--batch-size", "64", "--dataset-size", "10"),
         "argument --dataset-size: expected at least --batch-size (64), got 10"),
        (("dry-run", "--sample-rate", "1.5"), "argument --sample-rate: expected a number in (0, 1], got '1.5'"),
        (("dry-run", "--delta", "1"), "argument --delta: expected a number in (0, 1), got '1'"),
        (("dry-run", "--tag-prefix", "/"), "argument --tag-prefix: expected a non-empty tag, got '/'"),
        (("plot", ".", "--out", "plot.txt"), "argument --out: expected a file name ending in .png"),
        (("plot", "."), "the following arguments are required: --out"),
        (("export", ".", "--step", "-1"), "argument --step: expected a non-negative integer, got '-1'"),
        (("frobnicate",), "invalid choice: 'frobnicate'"),
        ((), "the following arguments are required: COMMAND"),
        (("dry-run", "--max-grad-norm", "1e300"),
         "argument --max-grad-norm: expected a clipping bound between 1e-30 and 1e+30, got '1e300'"),
        (("dry-run", "--logdir", ""), "argument --logdir: expected a directory path, got an empty string"),
        (("plot", ".", "--out", "p.png", "--dpi", "100000"),
         "argument --dpi: expected at most 1000 pixels per inch, got '100000'"),
    ],
    ids=["negative-c", "nan-c", "text-batch", "noise-without-rate", "rate-without-noise",
         "dataset-below-batch", "rate-above-1", "delta-1", "empty-prefix", "plot-suffix",
         "plot-without-out", "negative-step", "unknown-command", "no-command", "huge-c",
         "empty-logdir", "huge-dpi"],
)
def test_more_usage_errors_exit_2(capsys, args, message):
    status, stderr = run_in_process(args, capsys)

    assert status == 2
    assert_one_line_error(stderr, message)


def test_dry_run_default_logdir_is_new_per_run(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _ = run_in_process(("dry-run", "--steps", "2", "--batch-size", "4"), capsys)

    assert status == 0
    (run,) = (tmp_path / "runs").iterdir()
    assert run.name.startswith("dry-run-")
    assert any(run.glob("events.out.tfevents.*"))


def test_unexpected_error_one_line_or_traceback(monkeypatch, capsys, tmp_path):
    def fail(*args, **kwargs):
        raise RuntimeError("reader broke")

    monkeypatch.setattr("dp_grad_callbacks.cli.load_norm_series", fail)

    status, stderr = run_in_process(("summary", tmp_path), capsys)
    assert status == 1
    assert_one_line_error(stderr, "unexpected RuntimeError: reader broke (rerun with --traceback")

    status, stderr = run_in_process(("--traceback", "summary", tmp_path), capsys)
    assert status == 1
    assert "Traceback (most recent call last)" in stderr
    assert "RuntimeError: reader broke" in stderr


# ---------------------------------------------------------------------- help and packaging


def test_help_exits_0_with_units():
    result = run_cli("dry-run", "--help")

    text = " ".join(result.stdout.split())  # argparse wraps lines to the terminal width
    assert result.returncode == 0
    assert "clipping bound C, in gradient-norm units (default: 1.0)" in text
    assert "Exit status: 0 on success, 2 for an invalid command line" in text


def test_option_help_states_default():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")

    for name, subparser in subparsers.choices.items():
        for action in subparser._actions:
            if not action.option_strings or action.dest == "help" or action.required:
                continue
            assert "default" in (action.help or ""), f"{name} {action.option_strings}"


def test_console_script_is_declared():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    installed = metadata.entry_points(group="console_scripts", name="dp-grad-callbacks")

    assert pyproject["project"]["scripts"]["dp-grad-callbacks"] == "dp_grad_callbacks.cli:main"
    assert [entry.value for entry in installed] == ["dp_grad_callbacks.cli:main"]


def test_summary_damaged_file_one_warning(real, logdir, tmp_path, capsys):
    run = tmp_path / "damaged"
    run.mkdir()
    (source,) = (logdir / "real").glob("events.out.tfevents.*")
    data = source.read_bytes()
    (run / source.name).write_bytes(data[: len(data) // 2])

    status, stderr = run_in_process(["summary", tmp_path], capsys)

    assert status == 0
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("dp-grad-callbacks: warning: run 'damaged': TensorBoard stopped")
    assert "incomplete record" in stderr


@pytest.mark.parametrize(
    ("accountant", "message"),
    [("prv", "the prv accountant would compute epsilon on"),
     ("gdp", "the gdp accountant failed to compute epsilon after 1 step")],
)
def test_dry_run_accountant_failure_one_line(tmp_path, capsys, accountant, message):
    args = ["dry-run", "--logdir", tmp_path / "run", "--steps", "5", "--accountant", accountant,
            "--noise-multiplier", "0.01", "--sample-rate", "1"]

    with warnings.catch_warnings():
        # Opacus's own warnings about GDP and overflow are not the error under test.
        warnings.simplefilter("ignore")
        status, stderr = run_in_process(args, capsys)

    errors = [line for line in stderr.splitlines() if ": error: " in line]
    assert status == 1
    assert len(errors) == 1
    assert message in errors[0]
    assert "Traceback" not in stderr


def test_summary_json_writes_null_for_infinity(tmp_path, capsys):
    logdir = tmp_path / "wide"
    # Norms this spread overflow float32, so TensorBoard stores the p90 scalar as inf.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["dry-run", "--logdir", str(logdir), "--steps", "2", "--sigma", "1e5",
                     "--seed", "2"]) == 0
    capsys.readouterr()

    assert main(["summary", "--json", str(logdir)]) == 0
    (run,) = json.loads(capsys.readouterr().out)["runs"]
    assert main(["summary", str(logdir)]) == 0
    table = capsys.readouterr().out

    assert run["p90"] is None
    assert run["max_grad_norm"] == 1.0
    assert " inf " in table


def test_export_default_skips_non_finite_step(tmp_path, capsys):
    norms = [np.array([0.25, 4.0]), np.array([np.nan, np.inf])]
    with SummaryWriter(str(tmp_path)) as writer:
        for step, before in enumerate(norms):
            record = GradNormRecord(step, before, clipped_norms(before, 1.0), 1.0, synthetic=False)
            write_record(writer, record, prefix="grad_norm", limits=bucket_limits(1.0))

    assert main(["export", str(tmp_path)]) == 0
    exported = json.loads(capsys.readouterr().out)

    # Step 0, whose two norms fill two buckets. Step 1 has no histogram to export.
    assert len([point for point in exported["before_clipping"] if point["y"] > 0]) == 2
