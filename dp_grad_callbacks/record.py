"""The record of one logged step."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .noisy_histogram import clip_negative_counts, fraction_at_or_above
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
        noisy_counts: In a private record, the count of norms before clipping in each
            bucket plus Gaussian noise with standard deviation ``histogram_noise``. These
            counts are unbiased and can be negative. ``before`` and ``after`` are then
            empty. None in a raw record.
        bucket_limits: In a private record, the upper limit of each bucket of
            ``noisy_counts``, from ``stats.bucket_limits(max_grad_norm)``.
        histogram_noise: In a private record, the standard deviation of the noise on
            each count.
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
    noisy_counts: np.ndarray | None = None
    bucket_limits: np.ndarray | None = None
    histogram_noise: float | None = None

    @property
    def private(self) -> bool:
        """Whether the record contains noisy bucket counts instead of per-sample norms."""
        return self.noisy_counts is not None

    @property
    def num_samples(self) -> int:
        """Number of samples in the step.

        In a private record, the sum of the noisy counts with negative counts set to zero,
        rounded to the nearest integer.
        """
        if self.noisy_counts is not None:
            return int(round(float(np.maximum(self.noisy_counts, 0.0).sum())))
        return int(self.before.size)

    @property
    def clipped_fraction(self) -> float:
        """Fraction of the samples with a finite norm whose norm exceeded its bound.

        NaN when no norm is finite, as for an empty step. In a private record, the share of
        the noisy counts at or above C, with negative counts set to zero.
        """
        if self.noisy_counts is not None and self.bucket_limits is not None:
            counts = clip_negative_counts(self.noisy_counts)
            return fraction_at_or_above(counts, self.bucket_limits, self.max_grad_norm)
        finite = np.isfinite(self.before)
        if self.clipped is None:
            return clipped_fraction(self.before[finite], self.max_grad_norm)
        clipped = self.clipped[finite]
        if clipped.size == 0:
            return float("nan")
        return float(np.count_nonzero(clipped) / clipped.size)

    @property
    def num_nonfinite(self) -> int:
        """Number of norms before clipping that are NaN or infinite."""
        return int(np.count_nonzero(~np.isfinite(self.before)))
