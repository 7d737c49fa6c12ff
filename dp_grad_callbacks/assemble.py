"""Turning the norms of one logical step's physical batches into a :class:`GradNormRecord`.

The readers in :mod:`.capture` leave one :class:`~.capture.BatchNorms` per physical batch on
the training device. :func:`collect_step` moves them to the CPU, computes the norms after
clipping for each batch with that batch's bounds, and joins the batches.
:class:`StepNorms` converts to and from a plain float64 matrix, which is what the ranks
exchange in distributed training.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .capture import BatchNorms
from .record import GradNormRecord
from .stats import OPACUS_CLIP_EPS, clip_factors

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepNorms:
    """The per-sample norms of one logical step, as float64 arrays on the CPU.

    Attributes:
        before: Norms before clipping, shape ``(samples,)``.
        after: Norms of the clipped gradients, shape ``(samples,)``.
        clipped: True where a norm exceeded its bound, shape ``(samples,)``.
        max_grad_norm: The bound C of the step's last physical batch.
        names: Parameter names of the per-layer view, or ``()`` without the view.
        layer_before: Per-parameter norms before clipping, shape ``(samples, len(names))``.
        layer_after: Per-parameter norms after clipping, same shape.
        layer_bounds: Per-layer clipping only: the bound of each named parameter.
    """

    before: np.ndarray
    after: np.ndarray
    clipped: np.ndarray
    max_grad_norm: float
    names: tuple[str, ...] = ()
    layer_before: np.ndarray | None = None
    layer_after: np.ndarray | None = None
    layer_bounds: np.ndarray | None = None

    @property
    def width(self) -> int:
        """Number of columns of :meth:`to_rows`."""
        return 3 + 2 * len(self.names)

    def to_rows(self) -> np.ndarray:
        """Return one row per sample: before, after, clipped, then the per-layer columns."""
        columns = [self.before[:, None], self.after[:, None], self.clipped[:, None]]
        if self.names:
            columns += [self.layer_before, self.layer_after]
        return np.concatenate(columns, axis=1).astype(np.float64)

    def with_rows(self, rows: np.ndarray) -> StepNorms:
        """Return a copy whose samples are ``rows``, laid out as :meth:`to_rows` makes them."""
        size = len(self.names)
        return StepNorms(
            before=rows[:, 0].copy(),
            after=rows[:, 1].copy(),
            clipped=rows[:, 2] != 0,
            max_grad_norm=self.max_grad_norm,
            names=self.names,
            layer_before=rows[:, 3 : 3 + size].copy() if size else None,
            layer_after=rows[:, 3 + size :].copy() if size else None,
            layer_bounds=self.layer_bounds,
        )


def collect_step(
    batches: Sequence[BatchNorms], names: Mapping[int, str] | None
) -> StepNorms | None:
    """Join the physical batches of one logical step.

    Args:
        batches: What the reader took from each physical batch, in order.
        names: Parameter name by ``id(parameter)`` for the per-layer view, or None
            without the view.

    Returns:
        The step's norms, or None when there is no batch.
    """
    if not batches:
        return None

    parts = [_batch_arrays(batch) for batch in batches]
    step = StepNorms(
        before=np.concatenate([part[0] for part in parts]),
        after=np.concatenate([part[1] for part in parts]),
        clipped=np.concatenate([part[2] for part in parts]),
        max_grad_norm=batches[-1].max_grad_norm,
    )
    if names is None:
        return step

    if any(batch.param_norms is None for batch in batches):
        return step
    columns = {tuple(names[id(p)] for p in batch.params) for batch in batches}
    if len(columns) != 1:
        # The trainable parameters changed between physical batches of this step.
        logger.warning(
            "per-layer view skipped at a step whose physical batches clipped different "
            "parameters: %s",
            sorted(columns),
        )
        return step
    bounds = batches[-1].max_grad_norms
    return StepNorms(
        before=step.before,
        after=step.after,
        clipped=step.clipped,
        max_grad_norm=step.max_grad_norm,
        names=next(iter(columns)),
        layer_before=np.concatenate([part[3] for part in parts]),
        layer_after=np.concatenate([part[4] for part in parts]),
        layer_bounds=None if bounds is None else np.asarray(bounds, dtype=np.float64),
    )


# An infinite norm has the clip factor 0 and gives inf * 0 = NaN, as in Opacus, which is
# no reason for a RuntimeWarning.
@np.errstate(invalid="ignore")
def _batch_arrays(
    batch: BatchNorms,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
    """Return before, after, clipped, and the per-layer before and after of one batch."""
    assert batch.norms is not None
    before = _to_numpy(batch.norms)
    layer_before = None if batch.param_norms is None else _to_numpy(batch.param_norms)

    if batch.max_grad_norms is None:
        factors = clip_factors(before, batch.max_grad_norm)
        after = before * factors
        clipped = before > batch.max_grad_norm
        layer_after = None if layer_before is None else layer_before * factors[:, None]
        return before, after, clipped, layer_before, layer_after

    # Per-layer clipping scales each parameter by its own factor, so the clipped gradient's
    # norm is the L2 norm of the clipped per-parameter norms.
    assert layer_before is not None
    bounds = np.asarray(batch.max_grad_norms, dtype=np.float64)
    layer_after = layer_before * np.minimum(1.0, bounds / (layer_before + OPACUS_CLIP_EPS))
    after = np.sqrt(np.square(layer_after).sum(axis=1))
    clipped = (layer_before > bounds).any(axis=1)
    return before, after, clipped, layer_before, layer_after


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    # One float per sample (and parameter) leaves the device here.
    return tensor.detach().cpu().numpy().astype(np.float64)


def build_record(step: int, norms: StepNorms) -> GradNormRecord:
    """Return the record of logical step ``step``."""
    layer_before: dict[str, np.ndarray] = {}
    layer_after: dict[str, np.ndarray] = {}
    layer_bounds: dict[str, float] = {}
    for j, name in enumerate(norms.names):
        assert norms.layer_before is not None and norms.layer_after is not None
        layer_before[name] = norms.layer_before[:, j]
        layer_after[name] = norms.layer_after[:, j]
        if norms.layer_bounds is not None:
            layer_bounds[name] = float(norms.layer_bounds[j])
    return GradNormRecord(
        step,
        norms.before,
        norms.after,
        norms.max_grad_norm,
        clipped=norms.clipped,
        layer_before=layer_before,
        layer_after=layer_after,
        layer_max_grad_norms=layer_bounds,
    )
