"""Tests of GradNormMonitor: real Lightning trainers training a tiny MLP under Opacus on CPU."""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest
import torch
from lightning_utilities.core.rank_zero import rank_zero_only
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.grad_sample import GradSampleModuleExpandedWeights
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader

import dp_grad_callbacks.callback
import dp_grad_callbacks.lightning
import lightning.pytorch
import pytorch_lightning
from dp_grad_callbacks.lightning import GradNormMonitor
from opacus.lightning import DPLightningDataModule

from conftest import make_dataset, make_mlp, read_events
from reference_norms import brute_force_param_norms, per_layer_clipped, total_norms

NAMESPACES = {"lightning.pytorch": lightning.pytorch, "pytorch_lightning": pytorch_lightning}
DELTA = 1e-5
BATCH_SIZE = 16
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
# Per-layer bounds in NAMES order. The small bound of 2.bias clips samples whose total norm
# stays below the overall bound.
PER_LAYER_BOUNDS = [1.0, 0.5, 1.0, 0.05]


def make_classes(pl: ModuleType) -> tuple[type, type]:
    """Build a LightningModule and a LightningDataModule class of the namespace ``pl``."""

    class Digits(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DataLoader(make_dataset(64), batch_size=BATCH_SIZE)

    class Classifier(pl.LightningModule):
        """make_private runs in configure_optimizers, as in Opacus's Lightning example."""

        def __init__(
            self,
            *,
            private: bool = True,
            fail_at_step: int | None = None,
            skip_at_step: int | None = None,
            private_options: dict[str, Any] | None = None,
        ) -> None:
            super().__init__()
            self.net = make_mlp()
            self.private = private
            self.fail_at_step = fail_at_step
            self.skip_at_step = skip_at_step
            self.private_options = {"max_grad_norm": 0.5, **(private_options or {})}
            # Ghost clipping's criterion returns a DPTensorFastGradientClipping, not a
            # Tensor, which Lightning's automatic optimization rejects. So training_step
            # then runs backward and the optimizer step itself.
            self.automatic_optimization = self.private_options.get("grad_sample_mode") != "ghost"
            self.privacy_engine = PrivacyEngine(accountant="rdp")
            self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
            self.reference_norms: dict[int, np.ndarray] = {}
            self.reference_param_norms: dict[int, dict[str, np.ndarray]] = {}

        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
            if not self.private:
                return optimizer
            loader = self.trainer.datamodule.train_dataloader()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = self.privacy_engine.make_private(
                    module=self.net,
                    optimizer=optimizer,
                    data_loader=loader,
                    noise_multiplier=1.0,
                    poisson_sampling=isinstance(loader, DPDataLoader),
                    **self.private_options,
                )
            module, optimizer = result[0], result[1]
            if len(result) == 4:
                self.criterion = result[2]
            if isinstance(module, nn.Module):
                self.net = module
            else:
                # With wrap_model=False, make_private returns a hooks object that works on
                # self.net in place.
                self.grad_sample_hooks = module
            self.dp_optimizer = optimizer
            return optimizer

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
            if self.trainer.global_step == self.fail_at_step:
                raise RuntimeError("training step failed on purpose")
            if self.trainer.global_step == self.skip_at_step:
                # Opacus clips this batch but defers noise and update to the next step,
                # as BatchMemoryManager does for a physical batch inside a logical one.
                self.dp_optimizer.signal_skip_step(do_skip=True)
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
            param_norms = brute_force_param_norms(self.net, x, y)
            self.reference_param_norms[self.trainer.global_step] = param_norms
            self.reference_norms[self.trainer.global_step] = total_norms(param_norms, len(x))
            self.batches = []

    return Classifier, Digits


def poisson_datamodule(pl: ModuleType, digits: Any) -> Any:
    """Wrap ``digits`` so that its training loader samples batches by Poisson sampling.

    Opacus's DPLightningDataModule does this for the pytorch_lightning namespace only.
    """
    if pl is pytorch_lightning:
        return DPLightningDataModule(digits)

    class PoissonDigits(pl.LightningDataModule):
        def train_dataloader(self) -> DataLoader:
            return DPDataLoader.from_data_loader(digits.train_dataloader())

    return PoissonDigits()


def fit(
    pl: ModuleType,
    module: Any,
    *,
    callbacks: list,
    logger: Any = False,
    max_steps: int = 4,
) -> Any:
    _, digits_class = make_classes(pl)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=poisson_datamodule(pl, digits_class()))
    return trainer


@pytest.mark.parametrize("namespace", sorted(NAMESPACES))
def test_monitor_logs_through_tensorboard_logger(tmp_path: Path, namespace: str) -> None:
    pl = NAMESPACES[namespace]
    torch.manual_seed(0)
    classifier_class, _ = make_classes(pl)
    module = classifier_class()
    monitor = GradNormMonitor(privacy_engine=module.privacy_engine, delta=DELTA, epsilon_every=2)
    logger = pl.loggers.TensorBoardLogger(save_dir=str(tmp_path))
    trainer = fit(pl, module, callbacks=[monitor], logger=logger)

    events = read_events(Path(logger.log_dir))
    histograms = events.Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == [0, 1, 2, 3]
    assert [event.step for event in events.Scalars("privacy/epsilon")] == [0, 2, 3]
    assert "grad_norm/dp_settings/text_summary" in events.Tags()["tensors"]

    record = monitor.callback.last_record
    assert record is not None
    assert record.step == 3
    np.testing.assert_allclose(record.before, module.reference_norms[3], rtol=1e-5)

    optimizer = trainer.optimizers[0]
    assert isinstance(optimizer, DPOptimizer)
    assert "pre_step" not in optimizer.__dict__
    assert "clip_and_accumulate" not in optimizer.__dict__
    assert not monitor.callback.attached


def test_monitor_falls_back_to_log_dir(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    monitor = GradNormMonitor(tmp_path / "norms", log_every=2)
    fit(pl, classifier_class(), callbacks=[monitor], logger=pl.loggers.CSVLogger(tmp_path))

    histograms = read_events(tmp_path / "norms").Histograms("grad_norm/after_clipping")
    assert [event.step for event in histograms] == [0, 2]


def test_monitor_accepts_numpy_integers(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    module = classifier_class()
    monitor = GradNormMonitor(
        tmp_path / "norms",
        log_every=np.int64(2),
        seed=np.int64(1),
        privacy_engine=module.privacy_engine,
        delta=DELTA,
        epsilon_every=np.int32(1),
    )
    fit(pl, module, callbacks=[monitor], logger=pl.loggers.CSVLogger(tmp_path))

    events = read_events(tmp_path / "norms")
    histograms = events.Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == [0, 2]
    assert [event.step for event in events.Scalars("privacy/epsilon")] == [0, 2, 3]


def test_monitor_step_in_second_fit(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, digits_class = make_classes(pl)
    module = classifier_class()
    monitor = GradNormMonitor(tmp_path, log_every=2)
    trainer = fit(pl, module, callbacks=[monitor], max_steps=3)
    first_callback = monitor.callback

    # A second fit on the same trainer continues from global step 3 with a new callback
    # that counts from 0, so the records must follow trainer.global_step.
    trainer.fit_loop.epoch_loop.max_steps = 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=poisson_datamodule(pl, digits_class()))

    assert monitor.callback is not first_callback
    histograms = read_events(tmp_path).Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == [0, 2, 4, 6]
    record = monitor.callback.last_record
    assert record is not None
    np.testing.assert_allclose(record.before, module.reference_norms[6], rtol=1e-5)


def test_monitor_step_over_skipped_step(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    module = classifier_class(skip_at_step=1)
    monitor = GradNormMonitor(tmp_path)
    fit(pl, module, callbacks=[monitor], max_steps=4)

    # Lightning counts the skipped step and Opacus does not; records follow Lightning.
    histograms = read_events(tmp_path).Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == [0, 2, 3]


def test_monitor_detaches_on_exception(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    module = classifier_class(fail_at_step=2)
    monitor = GradNormMonitor(tmp_path)
    with pytest.raises(RuntimeError, match="failed on purpose"):
        fit(pl, module, callbacks=[monitor])

    assert "pre_step" not in module.dp_optimizer.__dict__
    assert not monitor.callback.attached
    histograms = read_events(tmp_path).Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == [0, 1]


def test_monitor_without_place_to_write_raises(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    with pytest.raises(
        pl.utilities.exceptions.MisconfigurationException,
        match=r"no TensorBoardLogger and log_dir is None",
    ):
        fit(pl, classifier_class(), callbacks=[GradNormMonitor()])


def test_monitor_without_dp_optimizer_raises(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    with pytest.raises(
        pl.utilities.exceptions.MisconfigurationException,
        match=r"found no Opacus DPOptimizer among trainer.optimizers \(\['SGD'\]\); return the "
        r"optimizer that PrivacyEngine.make_private returns",
    ):
        fit(pl, classifier_class(private=False), callbacks=[GradNormMonitor(tmp_path)])


def test_monitor_other_rank_attaches_without_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rank 1 of a process group, as Lightning, its loggers and the callback see it.
    pl = lightning.pytorch
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda trainer: False))
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    monkeypatch.setattr(dp_grad_callbacks.lightning, "process_rank", lambda: 1)
    monkeypatch.setattr(dp_grad_callbacks.callback, "process_rank", lambda: 1)
    classifier_class, _ = make_classes(pl)
    module = classifier_class()
    monitor = GradNormMonitor(
        per_layer=True, privacy_engine=module.privacy_engine, delta=DELTA, fallback="raise"
    )
    logger = pl.loggers.TensorBoardLogger(save_dir=str(tmp_path / "tensorboard"))
    trainer = fit(pl, module, callbacks=[monitor], logger=logger)

    assert trainer.global_step == 4
    record = monitor.callback.last_record
    assert record is not None
    assert record.step == 3
    np.testing.assert_allclose(record.before, module.reference_norms[3], rtol=1e-5)
    assert sorted(record.layer_before) == sorted(NAMES)
    assert not monitor.callback.attached
    assert list(tmp_path.rglob("*")) == []


def test_monitor_idle_without_process_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A non-zero rank for Lightning that torch.distributed would take for rank 0.
    pl = lightning.pytorch
    monkeypatch.setattr(pl.Trainer, "is_global_zero", property(lambda trainer: False))
    classifier_class, _ = make_classes(pl)
    monitor = GradNormMonitor(tmp_path / "norms")
    trainer = fit(pl, classifier_class(), callbacks=[monitor])

    assert trainer.global_step == 4
    assert monitor.callback is None
    assert not (tmp_path / "norms").exists()


@pytest.mark.parametrize("wrap_model", [True, False])
def test_monitor_ghost_matches_brute_force(tmp_path: Path, wrap_model: bool) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    torch.manual_seed(0)
    module = classifier_class(
        private_options={"grad_sample_mode": "ghost", "wrap_model": wrap_model}
    )
    monitor = GradNormMonitor(tmp_path, per_layer=True, fallback="raise")
    fit(pl, module, callbacks=[monitor])

    events = read_events(tmp_path)
    histograms = events.Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == [0, 1, 2, 3]
    for event in histograms:
        expected = module.reference_norms[event.step]
        assert event.histogram_value.num == len(expected)
        np.testing.assert_allclose(event.histogram_value.max, expected.max(), rtol=1e-5)
        np.testing.assert_allclose(event.histogram_value.sum, expected.sum(), rtol=1e-5)
    assert [event.value for event in events.Scalars("grad_norm/max_grad_norm")] == [0.5] * 4

    record = monitor.callback.last_record
    assert record is not None
    expected = module.reference_norms[3]
    np.testing.assert_allclose(record.before, expected, rtol=1e-5)
    np.testing.assert_allclose(
        record.after, expected * np.minimum(1.0, 0.5 / (expected + 1e-6)), rtol=1e-5
    )
    assert sorted(record.layer_before) == sorted(NAMES)
    for name in NAMES:
        np.testing.assert_allclose(
            record.layer_before[name], module.reference_param_norms[3][name], rtol=1e-5
        )


@pytest.mark.parametrize(
    "private_options",
    [
        {},
        {"wrap_model": False},
        {"clipping": "per_layer", "max_grad_norm": PER_LAYER_BOUNDS},
    ],
    ids=["flat", "unwrapped", "per_layer_clipping"],
)
def test_monitor_per_layer_matches_brute_force(
    tmp_path: Path, private_options: dict[str, Any]
) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    torch.manual_seed(0)
    module = classifier_class(private_options=private_options)
    monitor = GradNormMonitor(tmp_path, per_layer=True, fallback="raise")
    fit(pl, module, callbacks=[monitor])

    events = read_events(tmp_path)
    for name in NAMES:
        histograms = events.Histograms(f"grad_norm/layer/{name}/before_clipping")
        assert [event.step for event in histograms] == [0, 1, 2, 3]
        for event in histograms:
            expected = module.reference_param_norms[event.step][name]
            assert event.histogram_value.num == len(expected)
            np.testing.assert_allclose(event.histogram_value.sum, expected.sum(), rtol=1e-5)

    record = monitor.callback.last_record
    assert record is not None
    reference = module.reference_param_norms[3]
    assert sorted(record.layer_before) == sorted(NAMES)
    for name in NAMES:
        np.testing.assert_allclose(record.layer_before[name], reference[name], rtol=1e-5)
    if "clipping" in private_options:
        bounds = dict(zip(NAMES, PER_LAYER_BOUNDS))
        clipped = per_layer_clipped(reference, bounds)
        for name in NAMES:
            np.testing.assert_allclose(record.layer_after[name], clipped[name], rtol=1e-5)


@pytest.mark.parametrize(
    ("private_options", "monitor_options", "reason"),
    [
        (
            {"wrap_model": False},
            {"per_layer": True},
            "per_layer=True takes the parameter names from it",
        ),
        (
            {"wrap_model": False, "grad_sample_mode": "ghost"},
            {},
            "ghost clipping keeps the per-sample norms on it",
        ),
    ],
    ids=["per_layer", "ghost"],
)
def test_monitor_without_private_module_raises(
    tmp_path: Path,
    private_options: dict[str, Any],
    monitor_options: dict[str, Any],
    reason: str,
) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)

    class Forgetful(classifier_class):
        """Keeps neither the hooks object of wrap_model=False nor the ghost criterion."""

        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer = super().configure_optimizers()
            del self.grad_sample_hooks
            self.__dict__.pop("criterion", None)
            return optimizer

    module = Forgetful(private_options=private_options)
    with pytest.raises(
        pl.utilities.exceptions.MisconfigurationException,
        match=rf"found no Opacus GradSampleModule that contains the DP optimizer's parameters "
        rf"in Forgetful, but {reason}; keep the module that make_private returns as an "
        r"attribute of the LightningModule",
    ):
        fit(pl, module, callbacks=[GradNormMonitor(tmp_path, **monitor_options)])


def test_monitor_with_two_private_modules_raises(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)

    class TwoWrappers(classifier_class):
        """Keeps a second Opacus wrapper around the same model."""

        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer = super().configure_optimizers()
            self.spare = GradSampleModuleExpandedWeights(self.net._module)
            return optimizer

    with pytest.raises(
        pl.utilities.exceptions.MisconfigurationException,
        match=r"found 2 Opacus modules \(\['GradSampleModule', "
        r"'GradSampleModuleExpandedWeights'\]\) that contain the DP optimizer's parameters",
    ):
        fit(pl, TwoWrappers(), callbacks=[GradNormMonitor(tmp_path, per_layer=True)])


def test_training_identical_with_monitor(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)

    torch.manual_seed(5)
    plain = classifier_class()
    fit(pl, plain, callbacks=[])

    torch.manual_seed(5)
    observed = classifier_class()
    monitor = GradNormMonitor(tmp_path, privacy_engine=observed.privacy_engine, delta=DELTA)
    fit(pl, observed, callbacks=[monitor])

    assert monitor.callback is not None
    assert monitor.callback.last_record is not None
    for expected, actual in zip(plain.parameters(), observed.parameters()):
        assert torch.equal(expected, actual)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"log_dir": 3}, TypeError, r"log_dir must be a path or None, got int"),
        ({"log_dir": ""}, ValueError, r"log_dir must be a non-empty path or None, got ''"),
        ({"log_every": np.int64(0)}, ValueError, r"log_every must be .*np\.int64\(0\)"),
        ({"log_every": 0}, ValueError, r"log_every must be a positive integer, got 0"),
        ({"delta": 1e-5}, ValueError, r"privacy_engine and delta must be given together"),
        ({"epsilon_every": -2}, ValueError, r"epsilon_every must be a positive integer, got -2"),
    ],
)
def test_monitor_rejects_invalid_options(
    options: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        GradNormMonitor(**options)


def test_import_without_lightning_names_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("lightning", "lightning.pytorch", "pytorch_lightning"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "dp_grad_callbacks.lightning")

    with pytest.raises(ModuleNotFoundError, match=r"pip install 'dp-grad-callbacks\[lightning\]'"):
        importlib.import_module("dp_grad_callbacks.lightning")
