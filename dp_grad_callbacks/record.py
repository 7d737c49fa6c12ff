"""The record of one logged step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .stats import clipped_fraction


@dataclass(frozen=True)
class GradNormRecord:
    """Per-sample gradient norms of one logical optimizer step.

    Attributes:
        step: 0-based count of logical steps (``optimizer.step()`` calls that Opacus did
            not skip) since the callback was created.
        before: Per-sample norms before clipping, one float per sample, in batch order.
        after: The norm of each sample's clipped gradient,
            ``before * min(1, C / (before + 1e-6))``; under per-layer clipping, the L2 norm
            of the clipped per-parameter norms.
        max_grad_norm: The clipping bound C that clipped this step. Under per-layer
            clipping, the L2 norm of the per-parameter bounds (Opacus's ``max_grad_norm``),
            which bounds ``after``. Under ghost clipping, the module's ``max_grad_norm``.
        synthetic: True when the norms were drawn from the log-normal generator instead
            of read from Opacus.
        clipped: Per-sample flags, True where a norm exceeded its bound. Set under
            per-layer clipping, where a sample counts as clipped when any parameter's norm
            exceeds that parameter's bound. None means ``before > max_grad_norm``.
        layer_before: Per-sample norms of each parameter before clipping, by parameter
            name, for the per-layer view; empty when the view is off.
        layer_after: The same after clipping, by parameter name.
        layer_max_grad_norms: Each parameter's bound, by name, under per-layer clipping
            with the per-layer view on; empty otherwise.
    """

    step: int
    before: np.ndarray
    after: np.ndarray
    max_grad_norm: float
    synthetic: bool = False
    clipped: np.ndarray | None = None
    layer_before: Mapping[str, np.ndarray] = field(default_factory=dict)
    layer_after: Mapping[str, np.ndarray] = field(default_factory=dict)
    layer_max_grad_norms: Mapping[str, float] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        """Number of samples in the step."""
        return int(self.before.size)

    @property
    def clipped_fraction(self) -> float:
        """Fraction of samples whose norm exceeded its bound, or NaN for an empty step."""
        if self.clipped is None:
            return clipped_fraction(self.before, self.max_grad_norm)
        if self.clipped.size == 0:
            return float("nan")
        return float(np.count_nonzero(self.clipped) / self.clipped.size)
