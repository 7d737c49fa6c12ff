"""Pure functions over norms: clipping, fractions, quantiles and buckets."""

from __future__ import annotations

import numpy as np
import pytest

from dp_grad_callbacks import stats


def test_clipped_norms_match_opacus_factor():
    norms = np.array([0.0, 0.5, 1.0, 2.0, 1e6])
    factors = np.minimum(1.0, 1.0 / (norms + 1e-6))
    np.testing.assert_array_equal(stats.clipped_norms(norms, 1.0), norms * factors)


def test_clipped_fraction_counts_norms_above_bound():
    assert stats.clipped_fraction(np.array([0.5, 1.0, 1.5, 3.0]), 1.0) == 0.5
    assert np.isnan(stats.clipped_fraction(np.array([]), 1.0))


def test_quantiles_use_linear_interpolation():
    assert stats.norm_quantiles(np.array([1.0, 2.0, 3.0, 4.0])) == (2.5, pytest.approx(3.7))
    assert all(np.isnan(q) for q in stats.norm_quantiles(np.array([])))


def test_bucket_limits_are_log_spaced_around_bound():
    limits = stats.bucket_limits(2.0)
    ratios = limits[1:-1] / limits[:-2]
    assert 2.0 in limits
    assert limits[0] == pytest.approx(2e-3)
    assert limits[-2] == pytest.approx(200.0)
    assert limits[-1] == stats.LAST_BUCKET_LIMIT
    np.testing.assert_allclose(ratios, 10**0.1)


@pytest.mark.parametrize("bound", [0.0, -1.0, float("inf"), float("nan")])
def test_bucket_limits_reject_invalid_bound(bound):
    with pytest.raises(ValueError, match="max_grad_norm"):
        stats.bucket_limits(bound)


def test_bucket_counts_upper_limit_exclusive():
    limits = np.array([1.0, 2.0, stats.LAST_BUCKET_LIMIT])
    counts = stats.bucket_counts(np.array([0.0, 0.999, 1.0, 1.5, 2.0, 1e300, np.inf, np.nan]), limits)
    np.testing.assert_array_equal(counts, [2, 2, 3])


def test_clipped_norms_land_below_bound():
    limits = stats.bucket_limits(1.0)
    after = stats.clipped_norms(np.array([1.0, 5.0, 1e4]), 1.0)
    counts = stats.bucket_counts(after, limits)
    assert counts[np.flatnonzero(limits == 1.0)[0]] == 3
