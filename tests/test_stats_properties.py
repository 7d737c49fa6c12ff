"""Property tests of the pure norm functions on arbitrary arrays, checked against plain Python."""

from __future__ import annotations

import bisect
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dp_grad_callbacks.stats import (
    LAST_BUCKET_LIMIT,
    OPACUS_CLIP_EPS,
    bucket_counts,
    bucket_limits,
    clipped_fraction,
    clipped_norms,
    norm_quantiles,
)

SPECIAL_VALUES = [0.0, 5e-324, 1e-300, 1e-6, 1.0, 1e300, 1.7976931348623157e308, math.inf, math.nan]
MILLION = 1_000_000

norm_values = st.one_of(
    st.sampled_from(SPECIAL_VALUES),
    st.floats(min_value=0.0, allow_infinity=True),
)
norm_arrays = hnp.arrays(np.float64, st.integers(0, 64), elements=norm_values)
finite_norm_arrays = hnp.arrays(
    np.float64, st.integers(1, 64), elements=st.floats(min_value=0.0, max_value=1e300)
)
max_grad_norms = st.floats(min_value=1e-12, max_value=1e12)
# The clip factor C / (n + 1e-6) and the product n * factor are each rounded, so a clipped
# norm can exceed C by an ulp or two, in Opacus as here. When the factor is subnormal
# (n above about 4.5e307 C) it keeps too few bits for any such bound.
CLIP_BOUND_SLACK = 1 + 1e-15
SMALLEST_NORMAL = float(np.finfo(np.float64).tiny)
quantile_levels = st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=5)


@st.composite
def million_norms(draw: st.DrawFn) -> np.ndarray:
    """A million log-normal norms with a few special values at random positions."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    norms = rng.lognormal(0.0, 2.0, MILLION)
    specials = draw(st.lists(st.sampled_from(SPECIAL_VALUES), max_size=8))
    norms[rng.integers(0, MILLION, len(specials))] = specials
    return norms


def reference_clipped(norm: float, max_grad_norm: float) -> float:
    if not math.isfinite(norm):
        return math.nan
    return norm * min(1.0, max_grad_norm / (norm + OPACUS_CLIP_EPS))


def reference_quantile(norms: list[float], level: float) -> float:
    """Linear interpolation between order statistics, with infinities as ordered values."""
    if any(math.isnan(norm) for norm in norms):
        return math.nan
    ordered = sorted(norms)
    position = level * (len(ordered) - 1)
    lower = ordered[math.floor(position)]
    upper = ordered[math.ceil(position)]
    if lower == upper:
        return lower
    if math.isinf(upper):
        return math.inf
    return lower + (position - math.floor(position)) * (upper - lower)


@given(norms=norm_arrays, max_grad_norm=max_grad_norms)
def test_clipped_norms_match_reference(norms, max_grad_norm):
    clipped = clipped_norms(norms, max_grad_norm)

    assert clipped.shape == norms.shape
    assert clipped.dtype == np.float64
    for norm, value in zip(norms.tolist(), clipped.tolist()):
        expected = reference_clipped(norm, max_grad_norm)
        if math.isnan(expected):
            assert math.isnan(value)
        else:
            assert value == expected
            assert 0.0 <= value <= norm
            if max_grad_norm / (norm + OPACUS_CLIP_EPS) >= SMALLEST_NORMAL:
                assert value <= max_grad_norm * CLIP_BOUND_SLACK


@given(norms=norm_arrays, max_grad_norm=max_grad_norms)
def test_clipped_fraction_matches_reference(norms, max_grad_norm):
    fraction = clipped_fraction(norms, max_grad_norm)

    if norms.size == 0:
        assert math.isnan(fraction)
        return
    clipped = sum(1 for norm in norms.tolist() if norm > max_grad_norm)
    assert fraction == clipped / norms.size
    assert 0.0 <= fraction <= 1.0


@given(norms=norm_arrays, levels=quantile_levels)
@settings(deadline=None)
def test_norm_quantiles_match_reference(norms, levels):
    quantiles = norm_quantiles(norms, tuple(levels))

    assert len(quantiles) == len(levels)
    if norms.size == 0:
        assert all(math.isnan(value) for value in quantiles)
        return
    for level, value in zip(levels, quantiles):
        expected = reference_quantile(norms.tolist(), level)
        if math.isnan(expected):
            assert math.isnan(value)
        else:
            # numpy's formula rounds differently from this one, by a few ulp at most.
            assert value == pytest.approx(expected, rel=1e-12, abs=1e-320)


@given(norms=finite_norm_arrays, levels=quantile_levels)
@settings(deadline=None)
def test_norm_quantiles_ordered_within_range(norms, levels):
    levels = sorted(levels)
    quantiles = norm_quantiles(norms, tuple(levels))

    assert all(norms.min() <= value <= norms.max() for value in quantiles)
    assert list(quantiles) == sorted(quantiles)


@given(norms=norm_arrays, max_grad_norm=max_grad_norms)
def test_bucket_counts_match_reference(norms, max_grad_norm):
    limits = bucket_limits(max_grad_norm)
    counts = bucket_counts(norms, limits)

    limit_list = limits.tolist()
    expected = np.zeros(len(limits))
    for norm in norms.tolist():
        if not math.isnan(norm):
            expected[min(bisect.bisect_right(limit_list, norm), len(limits) - 1)] += 1
    assert counts.tolist() == expected.tolist()
    assert counts.sum() == np.count_nonzero(~np.isnan(norms))


@given(max_grad_norm=st.floats(min_value=1e-300, max_value=1e306))
def test_bucket_limits_increasing_with_c(max_grad_norm):
    limits = bucket_limits(max_grad_norm)

    assert np.all(np.diff(limits) > 0)
    assert limits[0] > 0
    assert limits[-1] == LAST_BUCKET_LIMIT
    assert max_grad_norm in limits.tolist()


@given(
    max_grad_norm=st.one_of(
        st.floats(max_value=0.0),
        st.sampled_from([math.nan, math.inf, 1e307, 1.7976931348623157e308, 5e-324]),
    )
)
def test_bucket_limits_invalid_c_raises(max_grad_norm):
    with pytest.raises(ValueError, match="max_grad_norm must"):
        bucket_limits(max_grad_norm)


@given(norms=million_norms(), max_grad_norm=max_grad_norms)
@settings(max_examples=5, deadline=None)
def test_million_norms_match_numpy(norms, max_grad_norm):
    finite = norms[np.isfinite(norms)]
    limits = bucket_limits(max_grad_norm)

    clipped = clipped_norms(norms, max_grad_norm)
    assert np.array_equal(np.isnan(clipped), ~np.isfinite(norms))
    assert np.all(clipped[np.isfinite(norms)] <= max_grad_norm * CLIP_BOUND_SLACK)

    expected_fraction = np.count_nonzero(norms > max_grad_norm) / MILLION
    assert clipped_fraction(norms, max_grad_norm) == expected_fraction

    median, p90 = norm_quantiles(finite, (0.5, 0.9))
    assert (median, p90) == tuple(np.quantile(finite, (0.5, 0.9)))
    if np.isnan(norms).any():
        assert all(math.isnan(value) for value in norm_quantiles(norms))

    counts = bucket_counts(norms, limits)
    assert counts.sum() == np.count_nonzero(~np.isnan(norms))
    assert counts[0] == np.count_nonzero(norms < limits[0])
