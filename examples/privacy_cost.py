"""Print epsilon of the digits example without and with private gradient-norm diagnostics.

Reads the training options and defaults of train_digits.py (epochs, batch size, noise
multiplier, delta, seed) and prints a Markdown table, one row per histogram noise level
and log_every, from dp_grad_callbacks.preview_epsilon. Nothing is trained.

    python examples/privacy_cost.py --histogram-noise 2 5 --log-every 1 10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arguments import ArgumentParser, parse_positive_float, parse_positive_int
from torch.utils.data import DataLoader
from train_digits import load_data
from train_digits import parse_args as parse_training_args

from dp_grad_callbacks import preview_epsilon
from dp_grad_callbacks.epsilon import AccountantError, EpsilonCostError


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """Parse this script's options, and pass the others on to train_digits.py's parser."""
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Other options (--epochs, --batch-size, --noise-multiplier, --delta, --seed) "
        "are those of train_digits.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--histogram-noise",
        type=parse_positive_float,
        nargs="+",
        default=[2.0, 5.0],
        help="standard deviations of the noise on each bucket count",
    )
    parser.add_argument(
        "--log-every",
        type=parse_positive_int,
        nargs="+",
        default=[1, 10],
        help="logical steps between logs",
    )
    parser.add_argument(
        "--accountant",
        choices=["prv", "rdp", "gdp"],
        default="prv",
        help="Opacus accountant; train_digits.py uses PrivacyEngine's default, prv",
    )
    args, rest = parser.parse_known_args(argv)
    return args, parse_training_args(rest)


def main(argv: list[str] | None = None) -> None:
    args, training = parse_args(argv)
    train_set, _ = load_data(training.seed)
    # make_private charges every optimizer step at sample rate 1 / len(data_loader), and
    # its Poisson loader draws len(data_loader) batches per epoch.
    batches = len(DataLoader(train_set, batch_size=training.batch_size))
    sample_rate = 1 / batches
    steps = training.epochs * batches

    print(
        f"digits example: {len(train_set)} training samples, noise multiplier "
        f"{training.noise_multiplier:g}, sample rate 1/{batches}, {steps} steps "
        f"({training.epochs} epochs), delta {training.delta:g}, {args.accountant} accountant"
    )
    print()
    print(
        "| histogram noise s | log_every | epsilon without diagnostics "
        "| epsilon with diagnostics |"
    )
    print("|---:|---:|---:|---:|")
    for histogram_noise in args.histogram_noise:
        for log_every in args.log_every:
            if args.accountant == "gdp" and log_every > 1:
                # The gdp accountant cannot mix noise multipliers, so the callback rejects it.
                print(f"| {histogram_noise:g} | {log_every} | | rejected: gdp needs log_every 1 |")
                continue
            try:
                preview = preview_epsilon(
                    noise_multiplier=training.noise_multiplier,
                    histogram_noise=histogram_noise,
                    sample_rate=sample_rate,
                    steps=steps,
                    delta=training.delta,
                    log_every=log_every,
                    accountant=args.accountant,
                )
            except (EpsilonCostError, AccountantError) as error:
                sys.exit(f"{Path(__file__).name}: error: {error}")
            print(
                f"| {histogram_noise:g} | {log_every} | {preview.without_diagnostics:.2f} "
                f"| {preview.with_diagnostics:.2f} |"
            )


if __name__ == "__main__":
    main()
