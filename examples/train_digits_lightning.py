"""Train an MLP on scikit-learn's digits with Opacus through PyTorch Lightning, logging norms.

The LightningModule calls ``PrivacyEngine.make_private`` in ``configure_optimizers`` and
returns the DP optimizer, and Opacus's ``DPLightningDataModule`` draws the training
batches by Poisson sampling, as in Opacus's own Lightning example. ``GradNormMonitor``
finds the DP optimizer when training starts and writes the gradient-norm histograms,
the dashboard and epsilon into the run of the trainer's ``TensorBoardLogger``.

Run, then open TensorBoard on the log directory::

    python examples/train_digits_lightning.py --epochs 5
    tensorboard --logdir runs/lightning

The digits data set ships with scikit-learn, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np
import pytorch_lightning as pl
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
from opacus.data_loader import DPDataLoader
from opacus.lightning import DPLightningDataModule
from pytorch_lightning.loggers import TensorBoardLogger
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from dp_grad_callbacks.lightning import GradNormMonitor


class DigitsDataModule(pl.LightningDataModule):
    """The 8x8 digits as 64 features scaled to [0, 1], split 80/20 with a fixed seed."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        digits = load_digits()
        x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
        y = torch.tensor(digits.target, dtype=torch.long)
        x_train, x_test, y_train, y_test = train_test_split(
            x, y, test_size=0.2, random_state=0, stratify=y
        )
        self.train_set = TensorDataset(x_train, y_train)
        self.test_set = TensorDataset(x_test, y_test)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsClassifier(pl.LightningModule):
    """A 64 -> 128 -> 10 MLP trained with DP-SGD."""

    def __init__(self, *, lr: float, noise_multiplier: float, max_grad_norm: float) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
        self.lr = lr
        self.noise_multiplier = noise_multiplier
        self.max_grad_norm = max_grad_norm
        self.privacy_engine = PrivacyEngine(accountant="rdp")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        # Opacus's example reads the loader from a private trainer attribute; the
        # datamodule's own train_dataloader() gives a loader with the same sample rate.
        loader = self.trainer.datamodule.train_dataloader()
        self.net, optimizer, _ = self.privacy_engine.make_private(
            module=self.net,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.max_grad_norm,
            poisson_sampling=isinstance(loader, DPDataLoader),
        )
        return optimizer

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self.net(x), y)
        self.log("train/loss", loss, on_step=True, on_epoch=False)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        accuracy = (self.net(x).argmax(dim=1) == y).float().mean()
        self.log("test/accuracy", accuracy)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line, exiting with status 2 and one line on stderr for a bad flag."""
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=parse_positive_int, default=5,
                        help="number of training epochs")
    parser.add_argument("--batch-size", type=parse_positive_int, default=64,
                        help="expected batch size")
    parser.add_argument("--lr", type=parse_learning_rate, default=0.1, help="SGD learning rate")
    parser.add_argument("--noise-multiplier", type=parse_positive_float, default=1.0,
                        help="noise standard deviation as a multiple of C")
    parser.add_argument("--max-grad-norm", type=parse_clipping_bound, default=1.0,
                        help="per-sample clipping bound C")
    parser.add_argument("--delta", type=parse_delta, default=1e-5,
                        help="delta of the logged epsilon, in (0, 1)")
    parser.add_argument("--log-every", type=parse_positive_int, default=1,
                        help="optimizer steps between logged steps")
    parser.add_argument("--epsilon-every", type=parse_positive_int, default=10,
                        help="logged steps between privacy/epsilon scalars")
    parser.add_argument("--logdir", type=parse_directory, default="runs/lightning",
                        help="TensorBoard log directory")
    parser.add_argument("--seed", type=parse_seed, default=0,
                        help=f"seed of torch and Lightning, from 0 to {MAX_SEED}")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    # Opacus warns about its non-secure generator and Lightning about loader workers.
    warnings.filterwarnings("ignore", category=UserWarning)

    module = DigitsClassifier(
        lr=args.lr, noise_multiplier=args.noise_multiplier, max_grad_norm=args.max_grad_norm
    )
    monitor = GradNormMonitor(
        log_every=args.log_every,
        privacy_engine=module.privacy_engine,
        delta=args.delta,
        epsilon_every=args.epsilon_every,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=args.epochs,
        logger=TensorBoardLogger(save_dir=args.logdir, name="digits"),
        callbacks=[monitor],
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    data = DigitsDataModule(args.batch_size)
    trainer.fit(module, datamodule=DPLightningDataModule(data))
    results = trainer.test(module, datamodule=data, verbose=False)

    record = monitor.callback.last_record if monitor.callback else None
    epsilon = module.privacy_engine.get_epsilon(args.delta)
    print(f"steps: {trainer.global_step}, test accuracy: {results[0]['test/accuracy']:.3f}, "
          f"epsilon: {epsilon:.2f} at delta {args.delta:g}")
    if record is not None:
        print(f"last logged step {record.step}: median norm {np.median(record.before):.3f}, "
              f"C = {record.max_grad_norm:g}")
    print(f"TensorBoard run: {trainer.logger.log_dir}")


if __name__ == "__main__":
    main()
