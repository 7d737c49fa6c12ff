"""Command-line checks of the example scripts: a bad flag is one line on stderr and exit 2."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from conftest import REPO_ROOT, checkout_env

EXAMPLES = REPO_ROOT / "examples"

# Invalid train_digits.py arguments, each with the message that follows "error: ".
TRAINING_ERRORS = [
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["--epochs", "1.5"], "argument --epochs: expected a positive integer, got '1.5'"),
    (
        ["--max-grad-norm", "0"],
        "argument --max-grad-norm: expected a finite positive number, got '0'",
    ),
    (
        ["--max-grad-norm", "1e-320"],
        "argument --max-grad-norm: expected a clipping bound between 1e-30 and 1e+30, "
        "got '1e-320'",
    ),
    (
        ["--noise-multiplier", "-1"],
        "argument --noise-multiplier: expected a finite positive number, got '-1'",
    ),
    (
        ["--noise-multiplier", "nan"],
        "argument --noise-multiplier: expected a finite positive number, got 'nan'",
    ),
    (["--batch-size", "0"], "argument --batch-size: expected a positive integer, got '0'"),
    (
        ["--physical-batch-size", "0"],
        "argument --physical-batch-size: expected a positive integer, got '0'",
    ),
    (["--lr", "inf"], "argument --lr: expected a finite positive number, got 'inf'"),
    (
        ["--lr", "1e39"],
        "argument --lr: expected a learning rate of at most 3.40282e+38, got '1e39'",
    ),
    (["--log-every", "-3"], "argument --log-every: expected a positive integer, got '-3'"),
    (
        ["--delta", "0"],
        "argument --delta: expected a number between 0 and 1 (exclusive), got '0'",
    ),
    (
        ["--delta", "1"],
        "argument --delta: expected a number between 0 and 1 (exclusive), got '1'",
    ),
    (
        ["--delta", "1e-5x"],
        "argument --delta: expected a number between 0 and 1 (exclusive), got '1e-5x'",
    ),
    (["--seed", "-1"], "argument --seed: expected an integer from 0 to 4294967295, got '-1'"),
    (
        ["--seed", "4294967296"],
        "argument --seed: expected an integer from 0 to 4294967295, got '4294967296'",
    ),
    (["--logdir", ""], "argument --logdir: expected a directory path, got ''"),
]

LIGHTNING_ERRORS = [
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (["--batch-size", "-64"], "argument --batch-size: expected a positive integer, got '-64'"),
    (["--lr", "0"], "argument --lr: expected a finite positive number, got '0'"),
    (
        ["--noise-multiplier", "0"],
        "argument --noise-multiplier: expected a finite positive number, got '0'",
    ),
    (
        ["--max-grad-norm", "inf"],
        "argument --max-grad-norm: expected a finite positive number, got 'inf'",
    ),
    (
        ["--delta", "1.5"],
        "argument --delta: expected a number between 0 and 1 (exclusive), got '1.5'",
    ),
    (["--log-every", "0"], "argument --log-every: expected a positive integer, got '0'"),
    (
        ["--epsilon-every", "0"],
        "argument --epsilon-every: expected a positive integer, got '0'",
    ),
    (["--logdir", " "], "argument --logdir: expected a directory path, got ' '"),
    (
        ["--seed", "4294967296"],
        "argument --seed: expected an integer from 0 to 4294967295, got '4294967296'",
    ),
]

PRIVACY_COST_ERRORS = [
    (
        ["--histogram-noise", "2", "0"],
        "argument --histogram-noise: expected a finite positive number, got '0'",
    ),
    (["--log-every", "1", "0"], "argument --log-every: expected a positive integer, got '0'"),
    (
        ["--accountant", "moments"],
        # Only the start: argparse formats the list of choices that follows.
        "argument --accountant: invalid choice: 'moments'",
    ),
    (["--epochs", "0"], "argument --epochs: expected a positive integer, got '0'"),
    (
        ["--delta", "0"],
        "argument --delta: expected a number between 0 and 1 (exclusive), got '0'",
    ),
]


def load_example(name: str, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    # The scripts import each other and arguments.py from their own directory.
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return importlib.import_module(name)


def usage_error(parse, argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """Return what ``parse(argv)`` printed to stderr, after checking exit status 2."""
    with pytest.raises(SystemExit) as raised:
        parse(argv)
    assert raised.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


@pytest.mark.parametrize(("argv", "message"), TRAINING_ERRORS)
def test_training_flag_rejected(argv, message, monkeypatch, capsys):
    train_digits = load_example("train_digits", monkeypatch)

    err = usage_error(train_digits.parse_args, argv, capsys)

    assert f": error: {message}" in err
    assert err.endswith(" (see --help)\n")
    assert err.count("\n") == 1


@pytest.mark.parametrize(("argv", "message"), LIGHTNING_ERRORS)
def test_lightning_flag_rejected(argv, message, monkeypatch, capsys):
    lightning_example = load_example("train_digits_lightning", monkeypatch)

    err = usage_error(lightning_example.parse_args, argv, capsys)

    assert f": error: {message}" in err
    assert err.endswith(" (see --help)\n")
    assert err.count("\n") == 1


@pytest.mark.parametrize(("argv", "message"), PRIVACY_COST_ERRORS)
def test_privacy_cost_flag_rejected(argv, message, monkeypatch, capsys):
    privacy_cost = load_example("privacy_cost", monkeypatch)

    err = usage_error(privacy_cost.parse_args, argv, capsys)

    assert f": error: {message}" in err
    assert err.endswith(" (see --help)\n")
    assert err.count("\n") == 1


def test_training_flags_accept_edge_values(monkeypatch):
    train_digits = load_example("train_digits", monkeypatch)

    args = train_digits.parse_args(
        [
            "--epochs", "1",
            "--max-grad-norm", "1e30",
            "--noise-multiplier", "1e-3",
            "--physical-batch-size", "1",
            "--lr", "3e38",
            "--delta", "0.999",
            "--seed", "4294967295",
            "--logdir", "runs/x",
        ]
    )

    assert args.epochs == 1
    assert args.max_grad_norm == 1e30
    assert args.noise_multiplier == 1e-3
    assert args.physical_batch_size == 1
    assert args.lr == 3e38
    assert args.delta == 0.999
    assert args.seed == 4294967295
    assert args.logdir == Path("runs/x")


def test_default_flags_unchanged(monkeypatch):
    train_digits = load_example("train_digits", monkeypatch)
    lightning_example = load_example("train_digits_lightning", monkeypatch)
    privacy_cost = load_example("privacy_cost", monkeypatch)

    training = train_digits.parse_args([])
    assert (training.epochs, training.batch_size, training.physical_batch_size) == (15, 128, 32)
    assert (training.max_grad_norm, training.noise_multiplier, training.lr) == (1.0, 1.0, 0.5)
    assert (training.log_every, training.delta, training.seed) == (1, 1e-5, 0)
    assert training.logdir is None

    lightning_args = lightning_example.parse_args([])
    assert (lightning_args.epochs, lightning_args.batch_size, lightning_args.seed) == (5, 64, 0)
    assert (lightning_args.log_every, lightning_args.epsilon_every) == (1, 10)
    assert lightning_args.logdir == Path("runs/lightning")

    cost, cost_training = privacy_cost.parse_args([])
    assert cost.histogram_noise == [2.0, 5.0]
    assert cost.log_every == [1, 10]
    assert cost_training.epochs == 15


@pytest.mark.parametrize(
    ("script", "first_work"),
    [("train_digits", "load_data"), ("train_digits_lightning", "DigitsClassifier")],
)
def test_bad_flag_stops_before_training(script, first_work, monkeypatch, capsys):
    example = load_example(script, monkeypatch)

    def fail(*args, **kwargs):
        raise AssertionError("training started despite an invalid flag")

    monkeypatch.setattr(example, first_work, fail)

    err = usage_error(example.main, ["--epochs", "0"], capsys)

    assert "argument --epochs: expected a positive integer, got '0'" in err


def test_digits_script_bad_flag_one_line():
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "train_digits.py"), "--physical-batch-size", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=checkout_env(),
    )

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr == (
        "train_digits.py: error: argument --physical-batch-size: expected a positive "
        "integer, got '0' (see --help)\n"
    )


def test_costly_epsilon_stops_before_training(tmp_path, monkeypatch):
    train_digits = load_example("train_digits", monkeypatch)

    def fail(*args, **kwargs):
        raise AssertionError("training started although epsilon could not be computed")

    monkeypatch.setattr(train_digits, "GradNormCallback", fail)

    with pytest.raises(SystemExit) as raised:
        train_digits.main(["--noise-multiplier", "0.05", "--logdir", str(tmp_path / "run")])

    assert str(raised.value.code).startswith(
        "train_digits.py: error: the prv accountant would compute epsilon on"
    )
    assert "180 steps at noise multiplier 0.05" in str(raised.value.code)
