"""Reading per-sample gradient norms out of an Opacus optimizer, one physical batch at a time.

Opacus 1.6 computes the per-sample norms inside ``DPOptimizer.clip_and_accumulate`` and keeps
them in a local variable. Two ways to get them:

* :func:`flat_norms` computes them again from ``optimizer.grad_samples`` with the same
  operations Opacus uses, so the values are bitwise equal. It works on any optimizer that
  exposes ``grad_samples`` but costs a second pass over the per-sample gradients.
* :func:`clip_and_accumulate_keeping_norms` runs the clipping itself, operation for operation
  as ``DPOptimizer.clip_and_accumulate`` in opacus 1.6, and returns the norms it computed, so
  nothing is computed twice. :func:`supports_fast_clip` decides when it is safe to use.
"""

from __future__ import annotations

import logging

import opacus
import torch
from opacus.optimizers import DPOptimizer
from opacus.optimizers.optimizer import _check_processed_flag, _mark_as_processed

logger = logging.getLogger(__name__)

# The opacus releases whose DPOptimizer.clip_and_accumulate was compared line by line with
# clip_and_accumulate_keeping_norms below.
_FAST_CLIP_OPACUS_VERSIONS = ("1.6.0",)
_FULL_PRECISION = (torch.float32, torch.float64)


def flat_norms(grad_samples: list[torch.Tensor]) -> torch.Tensor:
    """Return each sample's L2 norm over all parameters' per-sample gradients together.

    Mirrors the norm in ``DPOptimizer.clip_and_accumulate``. Per-sample gradients in half
    precision are upcast to float32 first, so a norm of 1e5 stays finite. The result stays
    on the device of the first parameter.
    """
    if len(grad_samples[0]) == 0:
        return torch.zeros(0, device=grad_samples[0].device)
    per_param = [_upcast(g).reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
    device = per_param[0].device
    per_param = [norm.to(device) for norm in per_param]
    return torch.stack(per_param, dim=1).norm(2, dim=1)


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


def clip_and_accumulate_keeping_norms(optimizer: DPOptimizer) -> torch.Tensor | None:
    """Clip and accumulate exactly as ``DPOptimizer.clip_and_accumulate`` (opacus 1.6.0).

    Returns:
        The per-sample norms that clipped the batch, or ``None`` when the per-sample
        gradients are not all float32 or float64. In that case the optimizer's own method
        has already done the work, and the caller must compute the norms itself.
    """
    grad_samples = optimizer.grad_samples
    if any(g.dtype not in _FULL_PRECISION for g in grad_samples):
        DPOptimizer.clip_and_accumulate(optimizer)
        return None

    if len(grad_samples[0]) == 0:
        per_sample_norms = torch.zeros((0,), device=grad_samples[0].device)
        per_sample_clip_factor = per_sample_norms
    else:
        per_param_norms = [g.reshape(len(g), -1).norm(2, dim=-1) for g in grad_samples]
        target_device = per_param_norms[0].device
        per_param_norms = [norm.to(target_device) for norm in per_param_norms]
        per_sample_norms = torch.stack(per_param_norms, dim=1).norm(2, dim=1)
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

    return per_sample_norms
