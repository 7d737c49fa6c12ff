"""Reading per-sample gradient norms out of Opacus, one physical batch at a time.

Opacus 1.6 clips in a different place in each training mode, so each mode has its own reader:

* :class:`FlatReader` for one bound C over all parameters together: ``DPOptimizer``,
  ``DistributedDPOptimizer`` and ``AdaClipDPOptimizer`` clip in ``clip_and_accumulate`` and
  keep the norms in a local variable.
* :class:`PerLayerReader` for ``DPPerLayerOptimizer`` and
  ``SimpleDistributedPerLayerOptimizer``, which clip each parameter with its own bound in
  ``clip_and_accumulate``.
* :class:`GhostReader` for ghost clipping (``DPOptimizerFastGradientClipping`` and its
  distributed variant). Per-sample gradients never exist there: the backward pass leaves the
  norms on the module's ``per_sample_gradient_norms``, and ``clip_and_accumulate`` does nothing.

:func:`select_reader` picks the reader for an optimizer, or raises
:class:`UnsupportedModeError`. For the flat modes, the norms can be had in two ways:

* :func:`flat_norms` computes them again from ``optimizer.grad_samples`` with the same
  operations Opacus uses, so the values are bitwise equal. It works on any optimizer that
  exposes ``grad_samples`` but costs a second pass over the per-sample gradients.
* :func:`clip_and_accumulate_keeping_norms` runs the clipping itself, operation for operation
  as ``DPOptimizer.clip_and_accumulate`` in opacus 1.6, and returns the norms it computed, so
  nothing is computed twice. :func:`supports_fast_clip` decides when it is safe to use.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal

import opacus
import torch
from opacus.grad_sample import GradSampleHooksFastGradientClipping
from opacus.optimizers import (
    AdaClipDPOptimizer,
    DistributedDPOptimizer,
    DistributedDPOptimizerFastGradientClipping,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
    FSDPOptimizerFastGradientClipping,
)
from opacus.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

logger = logging.getLogger(__name__)

# The opacus releases whose DPOptimizer.clip_and_accumulate was compared line by line with
# clip_and_accumulate_keeping_norms below.
_FAST_CLIP_OPACUS_VERSIONS = ("1.6.0",)
_FULL_PRECISION = (torch.float32, torch.float64)

Capture = Literal["count", "norms", "param_norms"]
"""The part of a physical batch that a reader keeps at a logged step: the sample count alone
(dry run), the per-sample norms, or the norms and each parameter's per-sample norms."""


class UnsupportedModeError(TypeError):
    """Raised by ``attach`` for an Opacus training mode whose clipped norms cannot be read."""


@dataclass(frozen=True)
class BatchNorms:
    """The sample count and norms of one physical batch, on the device where Opacus made them.

    Attributes:
        count: Number of samples in the batch.
        max_grad_norm: The bound C that clipped the batch. Under per-layer clipping, the L2
            norm of the per-parameter bounds, as Opacus stores it in ``max_grad_norm``.
        norms: Per-sample L2 norms over all clipped parameters together, shape ``(count,)``;
            None when only the count was requested.
        param_norms: Per-sample norms of each parameter, shape ``(count, len(params))``;
            None unless requested or needed for per-layer clipping.
        params: The parameters of the columns of ``param_norms``, in that order.
        max_grad_norms: Per-layer clipping only: the bound of each parameter in ``params``.
    """

    count: int
    max_grad_norm: float
    norms: torch.Tensor | None = None
    param_norms: torch.Tensor | None = None
    params: tuple[torch.Tensor, ...] = ()
    max_grad_norms: tuple[float, ...] | None = None


def param_norm_matrix(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Return each sample's L2 norm of each parameter's gradient, shape ``(samples, params)``.

    Mirrors the per-parameter norms in ``DPOptimizer.clip_and_accumulate``. Per-sample
    gradients in half precision are upcast to float32 first, so a norm of 1e5 stays finite.
    The result is on the device of the first parameter.
    """
    if len(grad_samples[0]) == 0:
        return torch.zeros((0, len(grad_samples)), device=grad_samples[0].device)
    # NOTE: Opacus computes float16 norms in float16, so a norm above 65504 is inf there
    # and Opacus scales that sample's gradient by 0, while the logged ``after`` shows C.
    per_param = [_upcast(g).reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
    device = per_param[0].device
    per_param = [norm.to(device) for norm in per_param]
    return torch.stack(per_param, dim=1)


def flat_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Return each sample's L2 norm over all parameters' per-sample gradients together.

    Mirrors the norm in ``DPOptimizer.clip_and_accumulate``, as :func:`param_norm_matrix` does.
    """
    return param_norm_matrix(grad_samples).norm(2, dim=1)


def _upcast(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.dtype in _FULL_PRECISION else tensor.float()


def supports_fast_clip(optimizer: DPOptimizer) -> bool:
    """Tell whether :func:`clip_and_accumulate_keeping_norms` may replace the optimizer's own.

    True only for an optimizer class that inherits ``clip_and_accumulate`` unchanged from
    ``DPOptimizer`` (``DPOptimizer`` and ``DistributedDPOptimizer``) in an opacus release
    whose code was checked against ours.
    """
    if opacus.__version__ not in _FAST_CLIP_OPACUS_VERSIONS:
        logger.debug(
            "opacus %s is not among %s; norms are computed a second time",
            opacus.__version__,
            _FAST_CLIP_OPACUS_VERSIONS,
        )
        return False
    if type(optimizer).clip_and_accumulate is not DPOptimizer.clip_and_accumulate:
        logger.debug(
            "%s overrides clip_and_accumulate; norms are computed a second time",
            type(optimizer).__name__,
        )
        return False
    return True


def clip_and_accumulate_keeping_norms(
    optimizer: DPOptimizer,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Clip and accumulate exactly as ``DPOptimizer.clip_and_accumulate`` (opacus 1.6.0).

    Returns:
        The per-sample norms that clipped the batch and the per-parameter norms they were
        computed from (as in :func:`param_norm_matrix`), or ``None`` when the per-sample
        gradients are not all float32 or float64. In that case the optimizer's own method
        has already done the work, and the caller must compute the norms itself.
    """
    grad_samples = optimizer.grad_samples
    if any(g.dtype not in _FULL_PRECISION for g in grad_samples):
        DPOptimizer.clip_and_accumulate(optimizer)
        return None

    if len(grad_samples[0]) == 0:
        device = grad_samples[0].device
        per_param_matrix = torch.zeros((0, len(grad_samples)), device=device)
        per_sample_norms = torch.zeros((0,), device=device)
        per_sample_clip_factor = per_sample_norms
    else:
        per_param_norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
        target_device = per_param_norms[0].device
        per_param_norms = [norm.to(target_device) for norm in per_param_norms]
        per_param_matrix = torch.stack(per_param_norms, dim=1)
        per_sample_norms = per_param_matrix.norm(2, dim=1)
        per_sample_clip_factor = (optimizer.max_grad_norm / (per_sample_norms + 1e-6)).clamp(
            max=1.0
        )

    for p in optimizer.params:
        _check_processed_flag(p.grad_sample)
        grad_sample = optimizer._get_flat_grad_sample(p).to(p.dtype)
        clip_factor = per_sample_clip_factor.to(grad_sample.device).to(p.dtype)
        grad = torch.einsum("i,i...", clip_factor, grad_sample)
        if p.summed_grad is not None:
            p.summed_grad += grad
        else:
            p.summed_grad = grad
        _mark_as_processed(p.grad_sample)

    return per_sample_norms, per_param_matrix


# ---------------------------------------------------------------------- readers


class NormReader:
    """Reader of one physical batch's norms, at the two points where Opacus may clip.

    The callback calls :meth:`on_pre_step` before every ``pre_step`` and
    :meth:`on_clip_and_accumulate` in place of every ``clip_and_accumulate``. ``capture`` is
    None for a step that is not logged; the reader must then only let Opacus run.

    Attributes:
        reads_at: The optimizer method before or in which the reader takes the norms. A
            None batch there means that the batch had no readable norms.
        missing_reason: The likely cause of a step without norms, for the fallback message.
        distributed: Whether every rank of a process group clips its own samples.
    """

    reads_at: Literal["pre_step", "clip_and_accumulate"] = "clip_and_accumulate"
    missing_reason = (
        "the optimizer did not clip per-sample gradients in this step (are all parameters "
        "frozen, or is the model not wrapped by PrivacyEngine.make_private?)"
    )

    def __init__(self, *, distributed: bool) -> None:
        self.distributed = distributed

    def max_grad_norm(self, optimizer: DPOptimizer) -> float:
        """Return the bound C in force."""
        return float(optimizer.max_grad_norm)

    def on_pre_step(self, optimizer: DPOptimizer, capture: Capture | None) -> BatchNorms | None:
        """Return the batch's norms if this mode reads them before ``pre_step``, or None."""
        return None

    def on_clip_and_accumulate(
        self, optimizer: DPOptimizer, original: Callable[[], Any], capture: Capture | None
    ) -> tuple[Any, BatchNorms | None]:
        """Run Opacus's clipping and return its result with the batch's norms, or None."""
        if capture != "count":
            return original(), None
        return original(), BatchNorms(
            count=_physical_batch_size(optimizer), max_grad_norm=self.max_grad_norm(optimizer)
        )


class FlatReader(NormReader):
    """Reader for one bound C over all parameters (flat and adaptive clipping).

    With ``fast=True`` the reader clips in place of Opacus with
    :func:`clip_and_accumulate_keeping_norms`. Otherwise it computes the norms with
    :func:`param_norm_matrix` and then lets the optimizer's own method clip.
    """

    def __init__(self, *, distributed: bool, fast: bool) -> None:
        super().__init__(distributed=distributed)
        self.fast = fast

    def on_clip_and_accumulate(
        self, optimizer: DPOptimizer, original: Callable[[], Any], capture: Capture | None
    ) -> tuple[Any, BatchNorms | None]:
        if capture is None or capture == "count":
            return super().on_clip_and_accumulate(optimizer, original, capture)

        # C is read before clipping because adaptive clipping changes it later in pre_step.
        max_grad_norm = self.max_grad_norm(optimizer)
        params = tuple(optimizer.params)
        result = None
        computed = None
        if self.fast:
            computed = clip_and_accumulate_keeping_norms(optimizer)
        if computed is None:
            computed = _read_flat_norms(optimizer)
            if not self.fast:
                result = original()
        if computed is None:
            return result, None

        norms, param_norms = computed
        return result, BatchNorms(
            count=len(norms),
            max_grad_norm=max_grad_norm,
            norms=norms.detach(),
            param_norms=param_norms.detach() if capture == "param_norms" else None,
            params=params if capture == "param_norms" else (),
        )


class PerLayerReader(NormReader):
    """Reader for per-layer clipping, where parameter ``j`` is clipped to ``max_grad_norms[j]``.

    The per-parameter norms are computed with the expression ``DPPerLayerOptimizer`` uses,
    then the optimizer's own method clips. They are always kept, because the norm after
    clipping depends on each of them.
    """

    def on_clip_and_accumulate(
        self, optimizer: DPOptimizer, original: Callable[[], Any], capture: Capture | None
    ) -> tuple[Any, BatchNorms | None]:
        if capture is None or capture == "count":
            return super().on_clip_and_accumulate(optimizer, original, capture)

        # Opacus pairs the bounds with the parameters that currently require gradients by
        # position (zip), so a parameter frozen after make_private shifts the bounds. The
        # same pairing is used here, so the record shows what Opacus did.
        pairs = list(zip(optimizer.params, optimizer.max_grad_norms))
        max_grad_norm = self.max_grad_norm(optimizer)
        try:
            with torch.no_grad():
                columns = [_per_layer_norms(p) for p, _ in pairs]
                device = columns[0].device
                param_norms = torch.stack([c.to(device) for c in columns], dim=1)
        except Exception:  # noqa: BLE001 - Opacus raises its own error right after, if any
            logger.debug("could not read per-sample gradients", exc_info=True)
            return original(), None

        result = original()
        return result, BatchNorms(
            count=len(param_norms),
            max_grad_norm=max_grad_norm,
            norms=param_norms.norm(2, dim=1),
            param_norms=param_norms,
            params=tuple(p for p, _ in pairs),
            max_grad_norms=tuple(float(bound) for _, bound in pairs),
        )


class GhostReader(NormReader):
    """Reader for ghost clipping, which clips during the backward pass.

    ``DPLossFastGradientClipping.backward`` computes the norms in a first backward pass,
    stores them on the module's ``per_sample_gradient_norms``, and clips with
    ``min(1, C / (norm + 1e-6))`` using the module's ``max_grad_norm``. So the C in force is
    the module's, not the optimizer's, which only sets the noise scale. The reader takes the
    norms before ``pre_step`` and each parameter's norms from Opacus's ``_norm_sample``.
    """

    reads_at: Literal["pre_step", "clip_and_accumulate"] = "pre_step"
    missing_reason = (
        "ghost clipping computed no new norms since the previous step (was the loss computed "
        "with the criterion that make_private returned?)"
    )

    def __init__(self, module: GradSampleHooksFastGradientClipping, *, distributed: bool) -> None:
        super().__init__(distributed=distributed)
        self.module = module
        self._last_norms: torch.Tensor | None = None

    def max_grad_norm(self, optimizer: DPOptimizer) -> float:
        return float(self.module.max_grad_norm)

    def on_clip_and_accumulate(
        self, optimizer: DPOptimizer, original: Callable[[], Any], capture: Capture | None
    ) -> tuple[Any, BatchNorms | None]:
        # Ghost clipping's pre_step never calls it, and Opacus's version does nothing.
        return original(), None

    def on_pre_step(self, optimizer: DPOptimizer, capture: Capture | None) -> BatchNorms | None:
        norms = self._fresh_norms()
        if capture is None or norms is None:
            return None
        max_grad_norm = self.max_grad_norm(optimizer)
        if capture == "count":
            return BatchNorms(count=len(norms), max_grad_norm=max_grad_norm)

        param_norms = None
        params: tuple[torch.Tensor, ...] = ()
        if capture == "param_norms":
            params = tuple(self.module.trainable_parameters)
            try:
                # _norm_sample is private to opacus 1.6. GradSampleHooksFastGradientClipping
                # stores each parameter's per-sample norms there and stacks them, in
                # trainable_parameters order, into per_sample_gradient_norms.
                columns = [p._norm_sample.to(norms.device) for p in params]
                param_norms = torch.stack(columns, dim=1).detach()
            except (AttributeError, RuntimeError):
                logger.debug("could not read per-parameter norms", exc_info=True)
                param_norms, params = None, ()
        return BatchNorms(
            count=len(norms),
            max_grad_norm=max_grad_norm,
            norms=norms.detach(),
            param_norms=param_norms,
            params=params,
        )

    def _fresh_norms(self) -> torch.Tensor | None:
        """Return the latest backward pass's norms, or None if none came since the last call.

        Opacus never clears ``per_sample_gradient_norms``, so a step after a backward pass
        that skipped ``DPLossFastGradientClipping`` (and so clipped nothing) would otherwise
        show the previous batch again. Each backward pass stores a new tensor.
        """
        try:
            norms = self.module.per_sample_gradient_norms
        except AttributeError:
            return None
        if norms is self._last_norms:
            return None
        self._last_norms = norms
        return norms


# ---------------------------------------------------------------------- mode selection

# The Opacus optimizers that clip in a way no reader can follow, with the reason.
_UNSUPPORTED: tuple[tuple[type, str], ...] = (
    (
        DistributedPerLayerOptimizer,
        "per-layer clipping inside backward hooks (DistributedPerLayerOptimizer), which "
        "clips each parameter as its gradient arrives and never calls clip_and_accumulate; "
        "make_private(clipping='per_layer') builds SimpleDistributedPerLayerOptimizer instead",
    ),
    (
        FSDPOptimizerFastGradientClipping,
        "ghost clipping with FSDP (grad_sample_mode='ghost_fsdp'), which shards the "
        "per-sample norms across ranks",
    ),
)

_SUPPORTED_MODES = (
    "flat, per-layer and adaptive clipping with grad_sample_mode 'hooks', 'functorch' or "
    "'ew'; ghost clipping (grad_sample_mode='ghost'); and DistributedDPOptimizer, "
    "SimpleDistributedPerLayerOptimizer and DistributedDPOptimizerFastGradientClipping "
    "under DPDDP"
)


def select_reader(
    optimizer: DPOptimizer, module: object | None, *, fast_clip: bool
) -> NormReader:
    """Return the reader for the optimizer's training mode.

    The mode follows from which Opacus implementations of ``clip_and_accumulate`` and
    ``pre_step`` the optimizer's class uses, so a subclass that changes neither (for
    example one that only changes ``add_noise``) is read like its base class.

    Args:
        optimizer: The optimizer that ``make_private`` returned.
        module: The module that ``make_private`` returned; needed for ghost clipping.
        fast_clip: Whether the flat reader may clip in place of Opacus.

    Raises:
        UnsupportedModeError: If the optimizer clips in a way no reader follows.
        TypeError: If ghost clipping is used and ``module`` is missing or of the wrong type.
        ValueError: If ``module`` does not hold the optimizer's parameters.
    """
    cls = type(optimizer)
    name = f"{cls.__module__}.{cls.__qualname__}"
    for unsupported, reason in _UNSUPPORTED:
        if isinstance(optimizer, unsupported):
            raise UnsupportedModeError(
                f"GradNormCallback does not support {reason}; got {name}. "
                f"Supported: {_SUPPORTED_MODES}."
            )

    clip = cls.clip_and_accumulate
    pre_step = cls.pre_step
    distributed = isinstance(
        optimizer, (DistributedDPOptimizer, DistributedDPOptimizerFastGradientClipping)
    )
    if clip is DPOptimizer.clip_and_accumulate and pre_step is DPOptimizer.pre_step:
        fast = fast_clip and supports_fast_clip(optimizer)
        return FlatReader(distributed=distributed, fast=fast)
    if clip is AdaClipDPOptimizer.clip_and_accumulate and pre_step is AdaClipDPOptimizer.pre_step:
        return FlatReader(distributed=distributed, fast=False)
    if clip is DPPerLayerOptimizer.clip_and_accumulate and pre_step is DPOptimizer.pre_step:
        return PerLayerReader(distributed=distributed)
    if (
        clip is DPOptimizerFastGradientClipping.clip_and_accumulate
        and pre_step is DPOptimizerFastGradientClipping.pre_step
    ):
        return GhostReader(_ghost_module(optimizer, module), distributed=distributed)

    raise UnsupportedModeError(
        f"GradNormCallback does not support {name}: its clip_and_accumulate or pre_step is "
        "not one of Opacus's flat, per-layer, adaptive or ghost clipping methods, so the "
        f"norms it clips with cannot be read. Supported: {_SUPPORTED_MODES}."
    )


def _ghost_module(
    optimizer: DPOptimizer, module: object | None
) -> GradSampleHooksFastGradientClipping:
    if module is None:
        raise TypeError(
            "module is missing: ghost clipping keeps the per-sample norms on the module, not "
            "on the optimizer, so call attach(optimizer, module) with the module that "
            "make_private returned (the GradSampleModuleFastGradientClipping, or the hooks "
            "object with wrap_model=False)"
        )
    if not isinstance(module, GradSampleHooksFastGradientClipping):
        raise TypeError(
            "ghost clipping needs the GradSampleModuleFastGradientClipping (or, with "
            "wrap_model=False, the GradSampleHooksFastGradientClipping) that make_private "
            f"returned as module, got {type(module).__module__}.{type(module).__qualname__}"
        )
    if type(module).get_norm_sample is not GradSampleHooksFastGradientClipping.get_norm_sample:
        raise UnsupportedModeError(
            f"GradNormCallback does not support ghost clipping with {type(module).__name__}, "
            "which computes the per-sample norms across ranks or shards. "
            f"Supported: {_SUPPORTED_MODES}."
        )
    module_params = {id(p) for p in module._module.parameters()}
    if any(id(p) not in module_params for p in optimizer.params):
        raise ValueError(
            "module must be the module whose parameters the optimizer trains, but some of "
            f"the optimizer's parameters are not in the {type(module).__name__} given; pass "
            "the module that make_private returned together with this optimizer"
        )
    return module


# ---------------------------------------------------------------------- helpers


def _read_flat_norms(optimizer: DPOptimizer) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        with torch.no_grad():
            param_norms = param_norm_matrix(optimizer.grad_samples)
    except Exception:  # noqa: BLE001 - Opacus raises its own error right after, if any
        logger.debug("could not read per-sample gradients", exc_info=True)
        return None
    return param_norms.norm(2, dim=1), param_norms


def _per_layer_norms(p: torch.Tensor) -> torch.Tensor:
    """Return one parameter's per-sample norms with ``DPPerLayerOptimizer``'s expression.

    Pieces accumulated over several backward passes are normed one by one instead of
    concatenated first, which gives the same values without copying the gradients.
    """
    grad_sample = p.grad_sample
    pieces = grad_sample if isinstance(grad_sample, list) else [grad_sample]
    norms = [g.norm(2, dim=tuple(range(1, g.ndim))) for g in pieces]
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def _physical_batch_size(optimizer: DPOptimizer) -> int:
    """Return the number of samples in the physical batch from shapes alone."""
    for p in optimizer.params:
        grad_sample = getattr(p, "grad_sample", None)
        if isinstance(grad_sample, torch.Tensor):
            return len(grad_sample)
        if isinstance(grad_sample, list):
            return sum(len(g) for g in grad_sample)
    return 0
