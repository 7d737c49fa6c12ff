"""Synthetic per-sample gradient norms drawn from a log-normal distribution.

Per-sample gradient norms of a network are positive and right-skewed, so a log-normal with
median ``C * exp(-0.5)`` (about 0.61 C) and sigma 0.8 is a plausible stand-in when no real
norms exist: for dashboard previews, dry runs and the callback's fallback.

The point-list functions return ``[{"x": norm, "y": density}, ...]`` sorted by ``x``, the
format that existing front ends consume. Every function takes ``seed`` (an ``int``, a
``numpy.random.Generator`` or ``None``) and never touches numpy's global random state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

DEFAULT_SIGMA = 0.8
DEFAULT_MEDIAN_RATIO = math.exp(-0.5)

Points = list[dict[str, float]]
Seed = int | np.random.Generator | None


def _check_clipping_norm(clipping_norm: Any) -> float:
    if isinstance(clipping_norm, bool) or not isinstance(clipping_norm, numbers.Real):
        raise ValueError(f"clipping_norm must be a finite positive number, got {clipping_norm!r}")
    value = float(clipping_norm)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"clipping_norm must be a finite positive number, got {clipping_norm!r}")
    return value


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _check_log_params(median_ratio: Any, sigma: Any) -> tuple[float, float]:
    for name, value in (("median_ratio", median_ratio), ("sigma", sigma)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")
        if not (math.isfinite(float(value)) and value > 0):
            raise ValueError(f"{name} must be a finite positive number, got {value!r}")
    return float(median_ratio), float(sigma)


def _rng(seed: Seed) -> np.random.Generator:
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is not None and (
        isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0
    ):
        raise ValueError(
            f"seed must be a non-negative integer, a numpy.random.Generator or None, got {seed!r}"
        )
    return np.random.default_rng(seed)


def lognormal_density(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    """Evaluate the log-normal probability density at ``x`` (zero where ``x <= 0``)."""
    x = np.asarray(x, dtype=np.float64)
    density = np.zeros_like(x)
    positive = x > 0
    # Far in the tails the terms overflow or underflow, and the density rounds to 0.
    with np.errstate(over="ignore", under="ignore"):
        z = (np.log(x[positive]) - mu) / sigma
        density[positive] = np.exp(-0.5 * z * z) / (x[positive] * sigma * math.sqrt(2 * math.pi))
    return density


def sample_gradient_norms(
    clipping_norm: float,
    num_samples: int,
    *,
    median_ratio: float = DEFAULT_MEDIAN_RATIO,
    sigma: float = DEFAULT_SIGMA,
    seed: Seed = None,
) -> np.ndarray:
    """Draw synthetic per-sample gradient norms.

    Args:
        clipping_norm: The clipping bound C; finite and positive.
        num_samples: How many norms to draw; a non-negative integer.
        median_ratio: Median of the norms as a multiple of C. The default, ``exp(-0.5)``,
            gives ``mu = ln(C) - 0.5``.
        sigma: Standard deviation of ``ln(norm)``.
        seed: An ``int``, a ``numpy.random.Generator`` (advanced in place) or ``None``.

    Returns:
        A float64 array of ``num_samples`` finite positive norms. Draws beyond the float64
        range are clamped to the largest finite value and the smallest positive one.

    Raises:
        ValueError: If an argument is out of range, or ``clipping_norm * median_ratio``
            overflows or underflows.

    Example:
        >>> norms = sample_gradient_norms(1.0, 4, seed=0)
        >>> norms.shape, bool((norms > 0).all())
        ((4,), True)
    """
    clipping_norm = _check_clipping_norm(clipping_norm)
    num_samples = _check_count("num_samples", num_samples)
    median_ratio, sigma = _check_log_params(median_ratio, sigma)
    median = clipping_norm * median_ratio
    if not (math.isfinite(median) and median > 0):
        raise ValueError(
            "clipping_norm * median_ratio must be a finite positive number, got "
            f"{clipping_norm!r} * {median_ratio!r} = {median!r}"
        )

    rng = _rng(seed)
    norms = rng.normal(math.log(median), sigma, num_samples)
    # The draws of Generator.lognormal up to rounding, but one vectorised exp over the array
    # instead of a scalar exp per draw: about 1.4 times faster in benchmarks/generator.py.
    with np.errstate(over="ignore", under="ignore"):
        np.exp(norms, out=norms)
    finfo = np.finfo(np.float64)
    return np.clip(norms, finfo.smallest_subnormal, finfo.max, out=norms)


def _points(x: np.ndarray, y: np.ndarray) -> Points:
    order = np.argsort(x, kind="stable")
    # tolist() converts to Python floats in C, faster than float() on each numpy scalar.
    return [{"x": a, "y": b} for a, b in zip(x[order].tolist(), y[order].tolist())]


def generate_gradient_norms(
    clipping_norm: float, num_points: int = 100, *, seed: Seed = None
) -> Points:
    """Draw synthetic norms as ``{"x": norm, "y": density}`` points sorted by ``x``.

    ``y`` is the exact log-normal density (``mu = ln(C) - 0.5``, ``sigma = 0.8``) at ``x``.

    Raises:
        ValueError: If ``clipping_norm`` is not finite and positive, or ``num_points`` is
            not a non-negative integer.
    """
    clipping_norm = _check_clipping_norm(clipping_norm)
    num_points = _check_count("num_points", num_points)
    norms = sample_gradient_norms(clipping_norm, num_points, seed=seed)
    mu = math.log(clipping_norm) - 0.5
    return _points(norms, lognormal_density(norms, mu, DEFAULT_SIGMA))


def generate_clipped_gradients(
    clipping_norm: float,
    original_gradients: Iterable[Mapping[str, float]] | None = None,
    num_points: int = 100,
    *,
    seed: Seed = None,
) -> Points:
    """Clip points to the bound: ``x`` becomes ``min(x, C)`` and ``y`` stays.

    Args:
        clipping_norm: The clipping bound C.
        original_gradients: An iterable of ``{"x": norm, "y": density}`` points, such as
            the list from :func:`generate_gradient_norms` or a generator, which is read
            once. When ``None``, ``num_points`` new points are drawn first.
        num_points: Used only when ``original_gradients`` is ``None``.
        seed: Used only when ``original_gradients`` is ``None``.

    Raises:
        ValueError: On an invalid bound or count, or points without ``x`` and ``y``.
    """
    clipping_norm = _check_clipping_norm(clipping_norm)
    if original_gradients is None:
        original_gradients = generate_gradient_norms(clipping_norm, num_points, seed=seed)
    try:
        # A string or a mapping can be iterated but contains no points.
        if isinstance(original_gradients, (str, bytes, Mapping)):
            raise TypeError("expected an iterable of points")
        # A generator can be iterated only once.
        points = list(original_gradients)
        x = np.array([point["x"] for point in points], dtype=np.float64)
        y = np.array([point["y"] for point in points], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(
            "original_gradients must be an iterable of {'x': norm, 'y': density} points, "
            f"got {type(original_gradients).__name__}: {error}"
        ) from error
    return _points(np.minimum(x, clipping_norm), y)


def generate_gradient_info(
    clipping_norm: float, num_points: int = 100, *, seed: Seed = None
) -> dict[str, Points]:
    """Return ``{"before_clipping": points, "after_clipping": points}`` for synthetic norms.

    Example:
        >>> info = generate_gradient_info(1.0, 3, seed=0)
        >>> sorted(info), len(info["after_clipping"])
        (['after_clipping', 'before_clipping'], 3)
    """
    before = generate_gradient_norms(clipping_norm, num_points, seed=seed)
    return {
        "before_clipping": before,
        "after_clipping": generate_clipped_gradients(clipping_norm, before),
    }


def gradient_info_from_norms(
    before: np.ndarray, after: np.ndarray, *, bins: int | str = "auto"
) -> dict[str, Points]:
    """Convert real norms to the point lists of :func:`generate_gradient_info`.

    Each point is a histogram bin: ``x`` is the bin centre and ``y`` the density of the norms
    there (``numpy.histogram(..., density=True)``). Non-finite values are dropped, and an
    empty input gives an empty list. A density above the float64 range, from norms that
    span less than about 1e-308, is ``inf``.
    """
    return {
        "before_clipping": _density_points(before, bins),
        "after_clipping": _density_points(after, bins),
    }


def _density_points(values: np.ndarray, bins: int | str) -> Points:
    values = np.asarray(values, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return []
    value_range = None
    if values.min() == values.max():
        # For equal values numpy uses the range v - 0.5 to v + 0.5, which float64 cannot
        # split into bins once v exceeds about 1e15. The half-width grows with v instead.
        half_width = max(0.5, abs(float(values[0])) * 1e-12)
        value_range = (values[0] - half_width, values[0] + half_width)
    with np.errstate(over="ignore"):
        density, edges = np.histogram(values, bins=bins, range=value_range, density=True)
    centres = (edges[:-1] + edges[1:]) / 2
    return _points(centres, density)
