"""Command-line value checks shared by the example scripts.

Each ``parse_*`` function is an argparse ``type=``: it converts one flag's text or raises
``argparse.ArgumentTypeError`` with what was expected and the text that came. argparse
adds the flag's name, so a bad value ends the script with one line such as
``train_digits.py: error: argument --epochs: expected a positive integer, got '0' (see
--help)`` before any training starts.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import NoReturn, TypeVar

import torch

from dp_grad_callbacks.cli import MAX_CLIPPING_BOUND, MIN_CLIPPING_BOUND

# scikit-learn's random_state and Lightning's seed_everything both take 0 to 2**32 - 1.
MAX_SEED = 2**32 - 1
# SGD scales the gradients of the float32 parameters by the learning rate, and torch 2.13
# raises "value cannot be converted to type float without overflow" for a larger one.
MAX_LEARNING_RATE = float(torch.finfo(torch.float32).max)
EXIT_USAGE = 2

Number = TypeVar("Number", int, float)


class ArgumentParser(argparse.ArgumentParser):
    """An argument parser that reports an invalid command line as one line on stderr.

    The exit status stays argparse's 2, but the multi-line usage text is replaced by a
    pointer to ``--help``.
    """

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def parse_positive_int(text: str) -> int:
    """Parse an integer of at least 1, such as a number of epochs or a batch size."""
    value = _convert(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def parse_positive_float(text: str) -> float:
    """Parse a finite number above 0, such as a noise multiplier."""
    value = _convert(text, float, "a finite positive number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def parse_clipping_bound(text: str) -> float:
    """Parse a clipping bound C that the callback's histograms and scalars can represent.

    The range is that of ``dp-grad-callbacks dry-run --max-grad-norm``: TensorBoard stores
    scalars as float32, and the histogram buckets span C / 1000 to 100 C.
    """
    value = parse_positive_float(text)
    if not MIN_CLIPPING_BOUND <= value <= MAX_CLIPPING_BOUND:
        raise argparse.ArgumentTypeError(
            f"expected a clipping bound between {MIN_CLIPPING_BOUND:g} and "
            f"{MAX_CLIPPING_BOUND:g}, got {text!r}"
        )
    return value


def parse_learning_rate(text: str) -> float:
    """Parse a learning rate above 0 and at most :data:`MAX_LEARNING_RATE`."""
    value = parse_positive_float(text)
    if value > MAX_LEARNING_RATE:
        raise argparse.ArgumentTypeError(
            f"expected a learning rate of at most {MAX_LEARNING_RATE:g}, got {text!r}"
        )
    return value


def parse_delta(text: str) -> float:
    """Parse the delta of (epsilon, delta)-DP, a number strictly between 0 and 1."""
    value = _convert(text, float, "a number between 0 and 1 (exclusive)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(
            f"expected a number between 0 and 1 (exclusive), got {text!r}"
        )
    return value


def parse_seed(text: str) -> int:
    """Parse a random seed from 0 to :data:`MAX_SEED`."""
    expected = f"an integer from 0 to {MAX_SEED}"
    value = _convert(text, int, expected)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
    return value


def parse_directory(text: str) -> Path:
    """Parse a directory path that is not empty or blank.

    An empty path would make TensorBoard's ``SummaryWriter`` fall back to its default
    ``./runs/<date>_<host>``.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a directory path, got {text!r}")
    return Path(text)


def _convert(text: str, kind: type[Number], expected: str) -> Number:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
