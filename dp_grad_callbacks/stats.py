"""Pure functions over per-sample gradient norms: clipping, fractions, quantiles, buckets.

Nothing here depends on Opacus or TensorBoard. Inputs are 1-D arrays of norms; non-finite
entries are the caller's concern unless a docstring says otherwise.
"""

from __future__ import annotations

import numpy as np

# Opacus adds this to the norm before dividing, in every optimizer's clip_and_accumulate
# (opacus 1.6.0): factor = min(1, C / (norm + 1e-6)).
OPACUS_CLIP_EPS = 1e-6

# Upper limit of the open-ended last bucket; TensorFlow writes the same for its default buckets.
LAST_BUCKET_LIMIT = float(np.finfo(np.float64).max)


def clip_factors(norms: np.ndarray, max_grad_norm: float) -> np.ndarray:
    """Return the factor Opacus multiplies each per-sample gradient by: ``min(1, C/(n+1e-6))``."""
    norms = np.asarray(norms, dtype=np.float64)
    return np.minimum(1.0, max_grad_norm / (norms + OPACUS_CLIP_EPS))


def clipped_norms(norms: np.ndarray, max_grad_norm: float) -> np.ndarray:
    """Return the norms after clipping to ``max_grad_norm`` as Opacus clips them.

    NaN and infinite norms give NaN. For an infinite norm Opacus's clip factor is 0, and
    the clipped gradient is ``inf * 0 = NaN`` as well.

    Example:
        >>> clipped_norms(np.array([0.5, 4.0]), 1.0).round(6).tolist()
        [0.5, 1.0]
    """
    norms = np.asarray(norms, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        return norms * clip_factors(norms, max_grad_norm)


def clipped_fraction(norms: np.ndarray, max_grad_norm: float) -> float:
    """Return the fraction of norms above ``max_grad_norm``; NaN for an empty array.

    An infinite norm counts as clipped and a NaN norm as not clipped.
    """
    norms = np.asarray(norms, dtype=np.float64)
    if norms.size == 0:
        return float("nan")
    return float(np.count_nonzero(norms > max_grad_norm) / norms.size)


def norm_quantiles(norms: np.ndarray, qs: tuple[float, ...] = (0.5, 0.9)) -> tuple[float, ...]:
    """Return the linear-interpolation quantiles of ``norms``.

    Every quantile is NaN for an empty array or one that contains NaN. Infinite norms
    take part as ordered values, so a quantile that interpolates towards ``inf`` is
    ``inf``.
    """
    norms = np.asarray(norms, dtype=np.float64).ravel()
    if norms.size == 0 or np.isnan(norms).any():
        return tuple(float("nan") for _ in qs)
    if np.isfinite(norms).all():
        return tuple(float(v) for v in np.quantile(norms, qs))

    # numpy interpolates as upper - (upper - lower) * (1 - t) for t >= 0.5, which is
    # inf - inf = NaN when upper is infinite. The two order statistics themselves are exact.
    lower = np.quantile(norms, qs, method="lower")
    upper = np.quantile(norms, qs, method="higher")
    with np.errstate(invalid="ignore"):
        linear = np.quantile(norms, qs)
    towards_inf = np.where(np.isposinf(upper) & ~np.isneginf(lower), np.inf, np.nan)
    towards_inf = np.where(np.isneginf(lower) & ~np.isposinf(upper), -np.inf, towards_inf)
    values = np.where(np.isfinite(lower) & np.isfinite(upper), linear, towards_inf)
    values = np.where(lower == upper, lower, values)
    return tuple(float(v) for v in values)


def bucket_limits(
    max_grad_norm: float, *, decades_below: int = 3, decades_above: int = 2, per_decade: int = 10
) -> np.ndarray:
    """Return fixed histogram bucket upper limits, log-spaced around the clipping bound.

    The limits are ``C * 10**(k / per_decade)`` for ``k`` from ``-decades_below * per_decade``
    to ``decades_above * per_decade``, then :data:`LAST_BUCKET_LIMIT` for the open last bucket.
    ``C`` itself is a limit, so every clipped norm (just below C after clipping) lands in the
    bucket that ends at C and the pile-up shows as one tall bar. The limits depend on the
    options alone, never on data.

    Raises:
        ValueError: If ``max_grad_norm`` is not finite and positive, or so close to the
            float64 range that the limits would not be finite, positive and increasing.
    """
    if not (np.isfinite(max_grad_norm) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm must be finite and positive, got {max_grad_norm!r}")
    k = np.arange(-decades_below * per_decade, decades_above * per_decade + 1)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        limits = np.append(max_grad_norm * 10.0 ** (k / per_decade), LAST_BUCKET_LIMIT)
        increasing = bool(limits[0] > 0 and np.all(np.diff(limits) > 0))
    if not increasing:
        raise ValueError(
            f"max_grad_norm must leave the bucket limits from C / 10**{decades_below} to "
            f"C * 10**{decades_above} finite, positive and increasing in float64, "
            f"got {max_grad_norm!r}"
        )
    return limits


def bucket_counts(values: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Count values per bucket, where bucket ``i`` contains ``limits[i-1] <= v < limits[i]``.

    The first bucket is open below. NaN values are not counted; ``+inf`` goes to the last
    bucket and ``-inf`` to the first.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[~np.isnan(values)]
    index = np.searchsorted(limits, values, side="right")
    np.minimum(index, len(limits) - 1, out=index)
    return np.bincount(index, minlength=len(limits)).astype(np.float64)
