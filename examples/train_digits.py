"""Train a small MLP with DP-SGD on scikit-learn's handwritten digits and log gradient norms.

Uses Opacus with Poisson sampling and a BatchMemoryManager whose physical batches are smaller
than the logical ones, with GradNormCallback attached. Runs on two CPU cores in under a
minute; the data set ships with scikit-learn, so nothing is downloaded.

    python examples/train_digits.py --epochs 10 --max-grad-norm 1.0
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from arguments import (
    MAX_SEED,
    ArgumentParser,
    parse_clipping_bound,
    parse_delta,
    parse_directory,
    parse_learning_rate,
    parse_positive_float,
    parse_positive_int,
    parse_seed,
)
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from opacus.utils.batch_memory_manager import BatchMemoryManager
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from dp_grad_callbacks import GradNormCallback
from dp_grad_callbacks.epsilon import EpsilonCostError, check_epsilon_cost


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, exiting with status 2 and one line on stderr for a bad flag."""
    parser = ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--epochs", type=parse_positive_int, default=15, help="passes over the training set"
    )
    parser.add_argument(
        "--max-grad-norm", type=parse_clipping_bound, default=1.0, help="clipping bound C"
    )
    parser.add_argument(
        "--noise-multiplier",
        type=parse_positive_float,
        default=1.0,
        help="noise std as a multiple of C",
    )
    parser.add_argument(
        "--batch-size",
        type=parse_positive_int,
        default=128,
        help="expected logical (Poisson) batch size",
    )
    parser.add_argument(
        "--physical-batch-size",
        type=parse_positive_int,
        default=32,
        help="max samples per backward pass",
    )
    parser.add_argument("--lr", type=parse_learning_rate, default=0.5, help="SGD learning rate")
    parser.add_argument(
        "--log-every", type=parse_positive_int, default=1, help="logical steps between logs"
    )
    parser.add_argument(
        "--delta", type=parse_delta, default=1e-5, help="delta of (epsilon, delta)-DP, in (0, 1)"
    )
    parser.add_argument(
        "--seed",
        type=parse_seed,
        default=0,
        help=f"seed of data split, model, noise, from 0 to {MAX_SEED}",
    )
    parser.add_argument(
        "--logdir",
        type=parse_directory,
        default=None,
        help="TensorBoard run directory (default: runs/digits-<date>-<time>)",
    )
    return parser.parse_args(argv)


def load_data(seed: int) -> tuple[TensorDataset, TensorDataset]:
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)  # pixel values 0..16 to 0..1
    y = torch.tensor(digits.target, dtype=torch.long)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.2, random_state=seed, stratify=y
    )
    return TensorDataset(x_train, y_train), TensorDataset(x_test, y_test)


def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logdir = args.logdir or Path("runs") / time.strftime("digits-%Y%m%d-%H%M%S")
    torch.manual_seed(args.seed)
    train_set, test_set = load_data(args.seed)

    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(train_set, batch_size=args.batch_size)
    # Opacus advises secure_mode for production, and torch notes that backward hooks fire
    # for inputs without gradients: both expected in this demonstration.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        privacy_engine = PrivacyEngine()
        model, optimizer, loader = privacy_engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=args.noise_multiplier,
            max_grad_norm=args.max_grad_norm,
            poisson_sampling=True,
            noise_generator=torch.Generator().manual_seed(args.seed),
        )
    criterion = nn.CrossEntropyLoss()
    # Opacus's default prv accountant needs memory that grows with the run and with the
    # privacy loss per step, and the epsilon after the last step is the costliest.
    final = create_accountant(privacy_engine.accountant.mechanism())
    final.history = [(args.noise_multiplier, loader.sample_rate, args.epochs * len(loader))]
    try:
        check_epsilon_cost(final, args.delta)
    except EpsilonCostError as error:
        sys.exit(f"{Path(__file__).name}: error: {error}")

    with GradNormCallback(logdir, log_every=args.log_every, seed=args.seed) as callback:
        callback.attach(optimizer)
        for epoch in range(1, args.epochs + 1):
            model.train()
            with BatchMemoryManager(
                data_loader=loader,
                max_physical_batch_size=args.physical_batch_size,
                optimizer=optimizer,
            ) as physical_loader:
                for x, y in physical_loader:
                    optimizer.zero_grad()
                    criterion(model(x), y).backward()
                    optimizer.step()

            model.eval()
            record = callback.last_record
            clipped = (record.before > record.max_grad_norm).mean() if record.before.size else 0.0
            print(
                f"epoch {epoch:3d}  step {callback.step:4d}  "
                f"test accuracy {accuracy(model, test_set):.3f}  "
                f"clipped {clipped:.0%}  epsilon {privacy_engine.get_epsilon(args.delta):.2f}"
            )

    print(f"final test accuracy: {accuracy(model, test_set):.3f}")
    print(f"epsilon: {privacy_engine.get_epsilon(args.delta):.3f} at delta = {args.delta:g}")
    print(f"gradient norms logged to {logdir}")
    # The tensorboard script sits next to this interpreter, which may not be on PATH.
    tensorboard = Path(sys.executable).with_name("tensorboard")
    command = tensorboard if tensorboard.exists() else "tensorboard"
    print(f"open them with: {command} --logdir {logdir.parent}")


if __name__ == "__main__":
    main()
