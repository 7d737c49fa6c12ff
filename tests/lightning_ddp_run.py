"""Train the tiny MLP under DPDDP in a two-process Lightning "ddp" run with GradNormMonitor.

Usage: ``python tests/lightning_ddp_run.py OUT_DIR MODE``, where MODE is a key of
``MODES``. Lightning starts rank 1 by running this script again with the same arguments.
Each rank trains on its own batches, of ``BATCH_SIZES[rank]`` samples, so a record that
contains the global batch has a sample count that no single rank has. Each rank saves its
batches' brute-force norms and its records to ``OUT_DIR/rank<r>.pkl``, and rank 0 also
saves the directory of the trainer's TensorBoard run. tests/test_lightning_ddp.py runs
this script and checks the files.
"""

from __future__ import annotations

import pickle
import sys
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import DDPStrategy
from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch.nn import functional as F
from torch.utils.data import DataLoader, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import make_dataset, make_mlp  # noqa: E402
from dp_grad_callbacks.lightning import GradNormMonitor  # noqa: E402
from reference_norms import brute_force_param_norms  # noqa: E402

WORLD_SIZE = 2
STEPS = 3
BATCH_SIZES = (3, 5)
# The make_private options of each training mode.
MODES: dict[str, dict[str, Any]] = {
    "per_layer": {"clipping": "per_layer", "max_grad_norm": [1.0, 0.5, 1.0, 0.05]},
    "ghost": {"grad_sample_mode": "ghost", "max_grad_norm": 0.5},
}


class Classifier(pl.LightningModule):
    """The tiny MLP, wrapped in DPDDP and made private in one of ``MODES``."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.net = make_mlp()
        self.private_options = MODES[mode]
        # Ghost clipping's criterion returns no Tensor, which automatic optimization needs.
        self.automatic_optimization = mode != "ghost"
        self.dataset = make_dataset(64)
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.reference_norms: dict[int, dict[str, Any]] = {}

    def train_dataloader(self) -> DataLoader:
        # Each rank reads its own half of the data, with its own batch size.
        rank = self.trainer.global_rank
        shard = Subset(self.dataset, range(rank, len(self.dataset), WORLD_SIZE))
        return DataLoader(shard, batch_size=BATCH_SIZES[rank])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # Lightning has set up the process group by now, so DPDDP can sync the weights and
        # make_private builds the distributed optimizer.
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = PrivacyEngine(accountant="rdp").make_private(
                module=DPDDP(self.net),
                optimizer=optimizer,
                data_loader=DataLoader(self.dataset, batch_size=8),
                noise_multiplier=1.0,
                poisson_sampling=False,
                noise_generator=torch.Generator().manual_seed(1),
                **self.private_options,
            )
        self.net, optimizer = result[0], result[1]
        if len(result) == 4:
            self.criterion = result[2]
        return optimizer

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        x, y = batch
        self.batches.append((x, y))
        if self.automatic_optimization:
            return F.cross_entropy(self.net(x), y)

        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.criterion(self.net(x), y).backward()
        optimizer.step()
        return None

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Runs before Opacus clips, with the weights that produced this step's gradients.
        x = torch.cat([batch[0] for batch in self.batches])
        y = torch.cat([batch[1] for batch in self.batches])
        self.reference_norms[self.trainer.global_step] = brute_force_param_norms(self.net, x, y)
        self.batches = []


class RecordKeeper(pl.Callback):
    """Keep the monitor's record of every step, taken right after the optimizer step."""

    def __init__(self, monitor: GradNormMonitor) -> None:
        self.monitor = monitor
        self.records: dict[int, Any] = {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        callback = self.monitor.callback
        self.records[trainer.global_step - 1] = callback.last_record if callback else None


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.manual_seed(0)
    module = Classifier(sys.argv[2])
    monitor = GradNormMonitor(per_layer=True, fallback="raise")
    keeper = RecordKeeper(monitor)
    logger = TensorBoardLogger(save_dir=str(out_dir / "tensorboard"), name="ddp")
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=WORLD_SIZE,
        # A rank that skips a collective makes the other fail after this instead of hanging.
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=60)),
        max_steps=STEPS,
        logger=logger,
        callbacks=[monitor, keeper],
        use_distributed_sampler=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module)

    rank = trainer.global_rank
    results = {
        "batch_size": BATCH_SIZES[rank],
        "reference_norms": module.reference_norms,
        "records": keeper.records,
        "attached_during_training": monitor.callback is not None,
    }
    if rank == 0:
        results["log_dir"] = logger.log_dir
    with open(out_dir / f"rank{rank}.pkl", "wb") as file:
        pickle.dump(results, file)


if __name__ == "__main__":
    main()
