"""Noisy histograms of per-sample gradient norms, and statistics derived from them alone.

A release counts the norms in fixed buckets and adds independent Gaussian noise N(0, s^2) to
every count. Under add/remove-one adjacency one example changes one count by 1, so the L2
sensitivity is 1 and the release is a Gaussian mechanism with noise multiplier s. All other
functions here read only noisy counts and bucket limits that were fixed before training, so
their results are post-processing and cost no privacy.

Bucket limits come from :func:`~dp_grad_callbacks.stats.bucket_limits`: upper limits, the first
bucket open below and the last one open above. This module imports neither Opacus nor
TensorBoard.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from .stats import bucket_counts


class GaussianNoise(Protocol):
    """A source of independent zero-mean Gaussian noise."""

    def draw(self, std: float, size: int) -> np.ndarray:
        """Return ``size`` independent draws from N(0, std^2) as float64."""
        ...


class SeededGaussianNoise:
    """Gaussian noise from a numpy generator of its own, reproducible by seed.

    The generator is seeded with the child ``SeedSequence(seed).spawn(1)[0]``, so a caller that
    seeds another generator with the same ``seed`` gets an independent stream. Neither numpy's
    nor torch's global random state is used.
    """

    def __init__(self, seed: int | None) -> None:
        self._generator = np.random.default_rng(np.random.SeedSequence(seed).spawn(1)[0])

    def draw(self, std: float, size: int) -> np.ndarray:
        """Return ``size`` independent draws from N(0, std^2)."""
        return self._generator.normal(0.0, std, size)


class SecureGaussianNoise:
    """Gaussian noise from the operating system's random source, for Opacus's secure mode.

    Draws come from :class:`secrets.SystemRandom` (``os.urandom``) and cannot be seeded. As in
    ``_generate_noise`` of opacus 1.6.0, each value is the sum of four draws with standard
    deviation ``std``, halved. The sum keeps the standard deviation and hides the low bits of a
    single draw, which floating-point attacks on Gaussian noise read (Opacus cites
    arXiv 2107.10138, section 5.1).
    """

    def __init__(self) -> None:
        self._random = secrets.SystemRandom()

    def draw(self, std: float, size: int) -> np.ndarray:
        """Return ``size`` independent draws from N(0, std^2)."""
        normal = self._random.normalvariate
        values = [sum(normal(0.0, std) for _ in range(4)) / 2 for _ in range(size)]
        return np.array(values, dtype=np.float64)


@dataclass(frozen=True)
class HistogramSummary:
    """The fields of a TensorBoard ``HistogramProto``, estimated from bucket counts.

    Attributes:
        min: Lower edge of the first non-empty bucket.
        max: Upper edge of the last non-empty bucket.
        num: Sum of the counts.
        sum: Sum of count times bucket midpoint.
        sum_squares: Sum of count times squared bucket midpoint.
    """

    min: float
    max: float
    num: float
    sum: float
    sum_squares: float


def noisy_bucket_counts(
    norms: np.ndarray, limits: np.ndarray, *, std: float, noise: GaussianNoise
) -> np.ndarray:
    """Count ``norms`` per bucket and add independent N(0, std^2) noise to every count.

    This is the only function here that reads private values. The result is an unbiased
    estimate of the true counts and can be negative.
    """
    counts = bucket_counts(norms, limits)
    return counts + noise.draw(std, counts.size)


def clip_negative_counts(noisy_counts: np.ndarray) -> np.ndarray:
    """Return the noisy counts with negative values replaced by zero.

    NOTE: clipping biases each empty bucket upwards by s / sqrt(2 pi), about 0.4 s, the mean of
    max(0, N(0, s^2)). Over the 52 default buckets, totals and the clipped fraction run high
    when most buckets are empty.
    """
    return np.maximum(np.asarray(noisy_counts, dtype=np.float64), 0.0)


def bucket_edges(limits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return finite lower and upper edges of every bucket, in the units of the norms.

    The first bucket starts at 0 because norms are non-negative. The last bucket is open
    above, so it gets the width of one more log-spaced bucket: from its lower edge L to
    ``L * r``, where r is the ratio of the two limits before it.

    Raises:
        ValueError: If ``limits`` has fewer than 3 entries.
    """
    limits = np.asarray(limits, dtype=np.float64)
    if limits.size < 3:
        raise ValueError(f"limits must contain at least 3 bucket limits, got {limits.size}")
    lower = np.concatenate(([0.0], limits[:-1]))
    upper = limits.copy()
    upper[-1] = limits[-2] * (limits[-2] / limits[-3])
    return lower, upper


def clip_bucket_index(limits: np.ndarray, max_grad_norm: float) -> int:
    """Return the index of the bucket whose upper limit is the clipping bound C.

    Raises:
        ValueError: If C is not one of ``limits``.
    """
    matches = np.flatnonzero(np.asarray(limits) == max_grad_norm)
    if matches.size == 0:
        raise ValueError(
            f"max_grad_norm {max_grad_norm!r} is not a bucket limit; build the limits with "
            "stats.bucket_limits(max_grad_norm)"
        )
    return int(matches[0])


def after_clipping_counts(
    counts: np.ndarray, limits: np.ndarray, max_grad_norm: float
) -> np.ndarray:
    """Return the histogram of the norms after clipping, from the counts before clipping.

    Opacus scales a norm n to ``n * min(1, C / (n + 1e-6))``. Norms below ``C - 1e-6`` keep
    their value, and every larger norm ends just below C. Because C is a bucket limit, the
    counts at or above C all move into the bucket that ends at C, and the others stay.

    NOTE: exact only when ``C - 1e-6`` is above the limit below C, which holds for
    C >= 5e-6 with the default 10 buckets per decade. For smaller C, norms within 1e-6 below C
    may belong one bucket lower after clipping.
    """
    at_clip = clip_bucket_index(limits, max_grad_norm)
    after = np.array(counts, dtype=np.float64)
    after[at_clip] = after[at_clip:].sum()
    after[at_clip + 1 :] = 0.0
    return after


def fraction_at_or_above(counts: np.ndarray, limits: np.ndarray, max_grad_norm: float) -> float:
    """Return the fraction of the counts in buckets at or above C; NaN when all are zero."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total <= 0:
        return float("nan")
    at_clip = clip_bucket_index(limits, max_grad_norm)
    return float(counts[at_clip + 1 :].sum() / total)


def count_quantiles(
    counts: np.ndarray, limits: np.ndarray, qs: tuple[float, ...] = (0.5, 0.9)
) -> tuple[float, ...]:
    """Estimate quantiles from non-negative bucket counts; NaN each when all counts are zero.

    Each quantile lies in the first non-empty bucket whose cumulative count reaches
    ``q * total``. Within that bucket it is interpolated linearly between the edges of
    :func:`bucket_edges`, as if the norms there were spread evenly.
    """
    counts = np.asarray(counts, dtype=np.float64)
    cumulative = np.cumsum(counts)
    total = cumulative[-1]
    if total <= 0:
        return tuple(float("nan") for _ in qs)

    lower, upper = bucket_edges(limits)
    quantiles = []
    for q in qs:
        target = q * total
        index = int(np.flatnonzero((cumulative >= target) & (counts > 0))[0])
        below = cumulative[index] - counts[index]
        share = min(max((target - below) / counts[index], 0.0), 1.0)
        quantiles.append(float(lower[index] + share * (upper[index] - lower[index])))
    return tuple(quantiles)


def summarize_counts(counts: np.ndarray, limits: np.ndarray) -> HistogramSummary | None:
    """Estimate a histogram's min, max, count, sum and sum of squares from its bucket counts.

    Every norm counts as the midpoint of its bucket's :func:`bucket_edges`. Returns None when
    all counts are zero.
    """
    counts = np.asarray(counts, dtype=np.float64)
    nonzero = np.flatnonzero(counts > 0)
    if nonzero.size == 0:
        return None

    lower, upper = bucket_edges(limits)
    midpoints = (lower + upper) / 2
    return HistogramSummary(
        min=float(lower[nonzero[0]]),
        max=float(upper[nonzero[-1]]),
        num=float(counts.sum()),
        sum=float(counts @ midpoints),
        sum_squares=float(counts @ (midpoints * midpoints)),
    )
