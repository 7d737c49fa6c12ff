"""Noisy bucket counts and the statistics derived from them, tested on their own."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dp_grad_callbacks.noisy_histogram import (
    SecureGaussianNoise,
    SeededGaussianNoise,
    after_clipping_counts,
    bucket_edges,
    clip_negative_counts,
    count_quantiles,
    fraction_at_or_above,
    noisy_bucket_counts,
    summarize_counts,
)
from dp_grad_callbacks.stats import bucket_counts, bucket_limits, clipped_norms

LIMITS = bucket_limits(1.0)
CLIP_INDEX = 30  # bucket_limits puts C after 3 decades of 10 buckets below it


def test_clip_index_is_where_c_sits():
    assert LIMITS[CLIP_INDEX] == 1.0
    assert LIMITS.size == 52


def test_bucket_edges_are_finite_and_contiguous():
    lower, upper = bucket_edges(LIMITS)

    assert lower[0] == 0.0
    np.testing.assert_array_equal(lower[1:], LIMITS[:-1])
    np.testing.assert_array_equal(upper[:-1], LIMITS[:-1])
    # The open last bucket, from 100 C, is as wide in log scale as the one before it.
    assert upper[-1] == pytest.approx(100.0 * 10**0.1)
    assert np.all(np.isfinite(upper))
    assert np.all(upper > lower)


def test_bucket_edges_reject_short_limits():
    with pytest.raises(ValueError, match="at least 3 bucket limits, got 2"):
        bucket_edges(np.array([1.0, 2.0]))


def test_clip_negative_counts_sets_negatives_to_zero():
    clipped = clip_negative_counts(np.array([-2.5, 0.0, 3.25]))
    np.testing.assert_array_equal(clipped, [0.0, 0.0, 3.25])


def test_after_clipping_moves_counts_into_c_bucket():
    counts = np.zeros(52)
    counts[[5, 29, 30, 31, 50, 51]] = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]

    after = after_clipping_counts(counts, LIMITS, 1.0)

    expected = np.zeros(52)
    expected[[5, 29, 30]] = [1.0, 2.0, 3.0 + 4.0 + 5.0 + 6.0]
    np.testing.assert_array_equal(after, expected)
    assert after.sum() == counts.sum()


@settings(max_examples=60, deadline=None)
@given(
    log_c=st.floats(min_value=math.log10(5e-6), max_value=3.0),
    scaled=st.lists(st.floats(min_value=0.0, max_value=1e4), min_size=1, max_size=40),
    near_c=st.lists(st.floats(min_value=-3e-6, max_value=3e-6), max_size=10),
)
def test_after_clipping_matches_counting_clipped_norms(log_c, scaled, near_c):
    c = 10.0**log_c
    limits = bucket_limits(c)
    norms = np.concatenate([np.array(scaled) * c / 100, c + np.array(near_c)])
    norms = norms[norms >= 0]

    derived = after_clipping_counts(bucket_counts(norms, limits), limits, c)
    counted = bucket_counts(clipped_norms(norms, c), limits)

    np.testing.assert_array_equal(derived, counted)


def test_after_clipping_rejects_c_off_the_limits():
    with pytest.raises(ValueError, match=r"max_grad_norm 2\.0 is not a bucket limit"):
        after_clipping_counts(np.zeros(52), LIMITS, 2.0)


def test_fraction_at_or_above_counts_buckets_from_c():
    counts = np.zeros(52)
    counts[[10, 30, 31, 51]] = [1.0, 2.0, 3.0, 2.0]

    # Bucket 30 ends at C and contains norms below it; 31 and 51 start at or above C.
    assert fraction_at_or_above(counts, LIMITS, 1.0) == pytest.approx(5.0 / 8.0)


def test_zero_counts_fraction_is_nan():
    assert math.isnan(fraction_at_or_above(np.zeros(52), LIMITS, 1.0))


def test_quantiles_interpolate_inside_bucket():
    counts = np.zeros(52)
    counts[31] = 4.0  # one bucket, from C to C * 10**0.1
    lower, upper = LIMITS[30], LIMITS[31]

    median, p90, maximum = count_quantiles(counts, LIMITS, (0.5, 0.9, 1.0))

    assert median == pytest.approx(lower + 0.5 * (upper - lower))
    assert p90 == pytest.approx(lower + 0.9 * (upper - lower))
    assert maximum == pytest.approx(upper)


def test_quantiles_walk_cumulative_counts():
    counts = np.zeros(52)
    counts[[0, 20, 40]] = [1.0, 1.0, 2.0]

    low, median, high = count_quantiles(counts, LIMITS, (0.0, 0.5, 1.0))

    assert low == 0.0  # the first bucket starts at 0
    assert median == pytest.approx(LIMITS[20])  # the second of 4 ends bucket 20
    assert high == pytest.approx(LIMITS[40])


def test_quantiles_of_zero_counts_are_nan():
    assert all(math.isnan(q) for q in count_quantiles(np.zeros(52), LIMITS))


def test_quantile_in_open_last_bucket_stays_finite():
    counts = np.zeros(52)
    counts[51] = 3.0
    (maximum,) = count_quantiles(counts, LIMITS, (1.0,))
    assert maximum == pytest.approx(100.0 * 10**0.1)


def test_summary_uses_bucket_midpoints():
    counts = np.zeros(52)
    counts[[0, 31]] = [2.0, 3.0]
    first_mid = LIMITS[0] / 2
    second_mid = (LIMITS[30] + LIMITS[31]) / 2

    summary = summarize_counts(counts, LIMITS)

    assert summary is not None
    assert summary.min == 0.0
    assert summary.max == LIMITS[31]
    assert summary.num == 5.0
    assert summary.sum == pytest.approx(2 * first_mid + 3 * second_mid)
    assert summary.sum_squares == pytest.approx(2 * first_mid**2 + 3 * second_mid**2)


def test_summary_of_zero_counts_is_none():
    assert summarize_counts(np.zeros(52), LIMITS) is None


def noise_errors(noise, std, releases):
    norms = np.array([0.002, 0.5, 0.9, 1.0, 1.7, 30.0, 500.0])
    true_counts = bucket_counts(norms, LIMITS)
    noisy = np.stack(
        [noisy_bucket_counts(norms, LIMITS, std=std, noise=noise) for _ in range(releases)]
    )
    return noisy - true_counts


def test_seeded_noise_is_unbiased_with_configured_std():
    std, releases = 2.5, 4000
    errors = noise_errors(SeededGaussianNoise(seed=12345), std, releases)
    size = errors.size

    # Each bound is 5 standard errors of its estimate.
    assert abs(errors.mean()) < 5 * std / math.sqrt(size)
    assert np.abs(errors.mean(axis=0)).max() < 5 * std / math.sqrt(releases)
    assert errors.std() == pytest.approx(std, abs=5 * std / math.sqrt(2 * size))
    adjacent = np.corrcoef(errors[:, 29], errors[:, 30])[0, 1]
    assert abs(adjacent) < 5 / math.sqrt(releases)


def test_secure_noise_is_unbiased_with_configured_std():
    std, releases = 0.7, 600
    errors = noise_errors(SecureGaussianNoise(), std, releases)
    size = errors.size

    # Unseeded, so the bounds are 6 standard errors: a false failure is below 1e-8.
    assert abs(errors.mean()) < 6 * std / math.sqrt(size)
    assert errors.std() == pytest.approx(std, abs=6 * std / math.sqrt(2 * size))


def test_seeded_noise_reproducible_and_separate():
    first = SeededGaussianNoise(seed=3).draw(1.0, 52)
    again = SeededGaussianNoise(seed=3).draw(1.0, 52)
    plain = np.random.default_rng(3).normal(0.0, 1.0, 52)

    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, plain)


def test_noise_leaves_global_random_state_alone():
    name, keys, position, *_ = np.random.get_state()
    SeededGaussianNoise(seed=None).draw(1.0, 52)
    SecureGaussianNoise().draw(1.0, 52)
    after_name, after_keys, after_position, *_ = np.random.get_state()
    assert np.array_equal(after_keys, keys)
    assert after_position == position
