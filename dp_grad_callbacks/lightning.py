"""A PyTorch Lightning callback that logs the per-sample gradient norms Opacus clips.

Needs PyTorch Lightning: ``pip install 'dp-grad-callbacks[lightning]'``. The callback works
with the ``lightning.pytorch`` and the ``pytorch_lightning`` namespace alike, because
Lightning (2.6) calls callback hooks by name.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.grad_sample import AbstractGradSampleHooks
from opacus.optimizers import DPOptimizer, DPOptimizerFastGradientClipping
from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
from torch import nn
from torch.utils.tensorboard import SummaryWriter
from typing_extensions import override

from .callback import Fallback, GradNormCallback, check_options
from .dashboard import DEFAULT_EPSILON_EVERY
from .distributed import process_rank
from .privacy import Privacy

_INSTALL_HINT = "pip install 'dp-grad-callbacks[lightning]'"

try:
    from lightning.pytorch import Callback, LightningModule, Trainer
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
except ModuleNotFoundError:
    try:
        from pytorch_lightning import Callback, LightningModule, Trainer
        from pytorch_lightning.utilities.exceptions import MisconfigurationException
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "dp_grad_callbacks.lightning requires PyTorch Lightning (the lightning or "
            f"pytorch-lightning package), which is not installed; run: {_INSTALL_HINT}"
        ) from error


def _tensorboard_logger_classes() -> tuple[type, ...]:
    """Return the ``TensorBoardLogger`` classes of the installed Lightning namespaces."""
    classes: list[type] = []
    try:
        from lightning.pytorch.loggers import TensorBoardLogger

        classes.append(TensorBoardLogger)
    except ModuleNotFoundError:
        pass
    try:
        from pytorch_lightning.loggers import TensorBoardLogger as LegacyTensorBoardLogger

        classes.append(LegacyTensorBoardLogger)
    except ModuleNotFoundError:
        pass
    return tuple(classes)


def find_private_modules(
    pl_module: nn.Module, optimizer: DPOptimizer
) -> list[AbstractGradSampleHooks]:
    """Return the Opacus modules in ``pl_module`` that contain all of the optimizer's parameters.

    Candidates are the submodules that are an Opacus ``GradSampleModule``, and the plain
    attributes of ``pl_module`` and its submodules that are a hooks object of
    ``make_private(wrap_model=False)``. A ghost-clipping criterion among those attributes
    adds the module or hooks object that it keeps. Each object is returned once, in the
    order found.
    """
    found: dict[int, AbstractGradSampleHooks] = {}
    for submodule in pl_module.modules():
        for candidate in (submodule, *vars(submodule).values()):
            if isinstance(candidate, DPLossFastGradientClipping):
                candidate = candidate.module
            if isinstance(candidate, AbstractGradSampleHooks):
                found.setdefault(id(candidate), candidate)

    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return [
        candidate
        for candidate in found.values()
        if trained <= {id(p) for p in candidate._module.parameters()}
    ]


class GradNormMonitor(Callback):
    """Log the per-sample gradient norms of an Opacus-trained LightningModule to TensorBoard.

    When training starts, the monitor finds the Opacus ``DPOptimizer`` among
    ``trainer.optimizers`` and attaches a :class:`~dp_grad_callbacks.GradNormCallback` to
    it. It writes through the trainer's ``TensorBoardLogger`` when there is one, so the
    norms appear in the same run as the other metrics, and to ``log_dir`` otherwise. Records
    and TensorBoard steps use ``trainer.global_step``. The monitor detaches when training
    ends, also on an exception or a keyboard interrupt.

    ``configure_optimizers`` must return the optimizer that ``PrivacyEngine.make_private``
    made, as in Opacus's Lightning example. Ghost clipping and ``per_layer=True`` also need
    the module that ``make_private`` returned. The monitor finds it when the LightningModule
    keeps it as an attribute (``self.net, optimizer, ... = make_private(module=self.net,
    ...)``), or, with ``wrap_model=False``, keeps the hooks object or the ghost-clipping
    criterion as an attribute.

    Every rank attaches, so that under ``DPDDP`` each rank takes part in the exchange of
    norms at every logged step, and every record contains the global batch. Only global
    rank 0 writes.

    Args:
        log_dir: Log directory used when the trainer has no ``TensorBoardLogger``.
        log_every: Number of optimizer steps between logged steps; the global steps that
            are multiples of it are logged.
        tag_prefix: Prefix of every TensorBoard tag.
        dry_run: If True, log synthetic norms instead of reading per-sample gradients.
        fallback: ``"synthetic"`` or ``"raise"``, for a logged step without per-sample
            gradients; see :class:`~dp_grad_callbacks.GradNormCallback`.
        seed: Seed of the synthetic norms.
        per_layer: If True, also log each parameter's norms; see
            :class:`~dp_grad_callbacks.GradNormCallback`.
        privacy_engine: The ``PrivacyEngine`` whose ``make_private`` the LightningModule
            calls in ``configure_optimizers``. Given with ``delta``, the monitor writes
            ``privacy/epsilon``.
        delta: The delta of the ``privacy/epsilon`` scalar, between 0 and 1.
        epsilon_every: Number of logged steps between ``privacy/epsilon`` scalars.
        privacy: ``"raw"`` or ``"private"``; see :class:`~dp_grad_callbacks.GradNormCallback`.
        histogram_noise: Standard deviation of the noise on each bucket count, required
            with ``privacy="private"``.

    Raises:
        TypeError: If ``log_dir`` is not a path or ``privacy_engine`` not a ``PrivacyEngine``.
        ValueError: If an option is out of range, only one of ``privacy_engine`` and
            ``delta`` is given, or ``log_dir`` is an empty path.

    Note:
        A process that Lightning counts as a non-zero rank but that has no
        ``torch.distributed`` process group attaches nothing, because the callback would
        take it for rank 0 and write.

    Example::

        module = DigitsClassifier()  # creates self.privacy_engine = PrivacyEngine()
        monitor = GradNormMonitor(
            log_every=10, privacy_engine=module.privacy_engine, delta=1e-5
        )
        trainer = lightning.pytorch.Trainer(max_epochs=1, callbacks=[monitor])
        trainer.fit(module, datamodule=DPLightningDataModule(datamodule))
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str] | None = None,
        *,
        log_every: int = 1,
        tag_prefix: str = "grad_norm",
        dry_run: bool = False,
        fallback: Fallback = "synthetic",
        seed: int | None = None,
        per_layer: bool = False,
        privacy_engine: PrivacyEngine | None = None,
        delta: float | None = None,
        epsilon_every: int = DEFAULT_EPSILON_EVERY,
        privacy: Privacy = "raw",
        histogram_noise: float | None = None,
    ) -> None:
        if log_dir is not None and not isinstance(log_dir, (str, os.PathLike)):
            raise TypeError(f"log_dir must be a path or None, got {type(log_dir).__name__}")
        if log_dir is not None and not os.fspath(log_dir):
            raise ValueError(
                "log_dir must be a non-empty path or None, got ''; pass a directory such as "
                "'runs/digits', or None to write through the trainer's TensorBoardLogger"
            )
        self._options: dict[str, Any] = {
            "log_every": log_every,
            "tag_prefix": tag_prefix,
            "dry_run": dry_run,
            "fallback": fallback,
            "seed": seed,
            "per_layer": per_layer,
            "privacy_engine": privacy_engine,
            "delta": delta,
            "epsilon_every": epsilon_every,
            "privacy": privacy,
            "histogram_noise": histogram_noise,
        }
        check_options(**self._options)

        super().__init__()
        self.log_dir = log_dir
        self._callback: GradNormCallback | None = None
        self._optimizer: DPOptimizer | None = None

    @property
    def callback(self) -> GradNormCallback | None:
        """The callback of the current or last training run; None before the first one."""
        return self._callback

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Attach a new ``GradNormCallback`` to the DP optimizer, on every rank."""
        if not trainer.is_global_zero and process_rank() == 0:
            # Without a process group the callback would take this process for rank 0 and
            # write, and there are no ranks to exchange norms with.
            return
        optimizer = self._find_dp_optimizer(trainer)
        module = None
        if self._needs_module(optimizer):
            module = self._find_private_module(pl_module, optimizer)
        callback = GradNormCallback(self._writer(trainer), **self._options)
        callback.step = trainer.global_step
        self._callback = callback.attach(optimizer, module)
        self._optimizer = optimizer

    @override
    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Set the step of the coming record to ``trainer.global_step``, before clipping."""
        callback = self._callback
        if callback is not None and callback.attached and optimizer is self._optimizer:
            callback.step = trainer.global_step

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Detach and flush."""
        self._close()

    @override
    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, exception: BaseException
    ) -> None:
        """Detach and flush what was logged, before Lightning finalizes its loggers."""
        self._close()

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Detach and flush if no earlier hook did."""
        self._close()

    # ------------------------------------------------------------------ helpers

    def _close(self) -> None:
        if self._callback is not None:
            self._callback.close()
        self._optimizer = None

    def _find_dp_optimizer(self, trainer: Trainer) -> DPOptimizer:
        dp_optimizers = [opt for opt in trainer.optimizers if isinstance(opt, DPOptimizer)]
        if len(dp_optimizers) == 1:
            return dp_optimizers[0]

        found = [type(opt).__name__ for opt in trainer.optimizers]
        if not dp_optimizers:
            raise MisconfigurationException(
                "GradNormMonitor found no Opacus DPOptimizer among trainer.optimizers "
                f"({found}); return the optimizer that PrivacyEngine.make_private returns "
                "from configure_optimizers"
            )
        raise MisconfigurationException(
            f"GradNormMonitor found {len(dp_optimizers)} Opacus DPOptimizers among "
            f"trainer.optimizers ({found}) but logs exactly one; make only one optimizer "
            "private"
        )

    def _needs_module(self, optimizer: DPOptimizer) -> bool:
        ghost = isinstance(optimizer, DPOptimizerFastGradientClipping)
        return ghost or (self._options["per_layer"] and not self._options["dry_run"])

    def _find_private_module(
        self, pl_module: LightningModule, optimizer: DPOptimizer
    ) -> AbstractGradSampleHooks:
        """Return the one module that :func:`find_private_modules` finds, else raise."""
        modules = find_private_modules(pl_module, optimizer)
        if len(modules) == 1:
            return modules[0]

        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            reason = "ghost clipping keeps the per-sample norms on it"
        else:
            reason = "per_layer=True takes the parameter names from it"
        if not modules:
            raise MisconfigurationException(
                "GradNormMonitor found no Opacus GradSampleModule that contains the DP "
                f"optimizer's parameters in {type(pl_module).__name__}, but {reason}; keep the "
                "module that make_private returns as an attribute of the LightningModule "
                "(self.net, optimizer, ... = make_private(module=self.net, ...)) or, with "
                "wrap_model=False, keep the hooks object or the ghost-clipping criterion"
            )
        found = [type(module).__name__ for module in modules]
        raise MisconfigurationException(
            f"GradNormMonitor found {len(modules)} Opacus modules ({found}) that contain the "
            f"DP optimizer's parameters in {type(pl_module).__name__}, but can pass only one "
            "to the callback; keep only the module that make_private returned with this "
            "optimizer"
        )

    def _writer(self, trainer: Trainer) -> SummaryWriter | str | os.PathLike[str]:
        """Return the trainer's TensorBoard ``SummaryWriter``, else ``log_dir``.

        On a non-zero rank the logger's ``experiment`` is Lightning's dummy object, so its
        root directory is returned instead. The callback creates no writer for a path there.
        """
        tensorboard_loggers = _tensorboard_logger_classes()
        for logger in trainer.loggers:
            if isinstance(logger, tensorboard_loggers):
                return logger.experiment if trainer.is_global_zero else logger.root_dir
        if self.log_dir is None:
            raise MisconfigurationException(
                "GradNormMonitor has nowhere to write: the trainer has no "
                "TensorBoardLogger and log_dir is None; add "
                "logger=TensorBoardLogger(save_dir) to the Trainer or pass "
                "GradNormMonitor(log_dir=...)"
            )
        return self.log_dir
