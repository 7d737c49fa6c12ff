"""Property tests of the synthetic norm generator on arbitrary valid and invalid arguments."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from dp_grad_callbacks.synthetic import (
    generate_clipped_gradients,
    generate_gradient_info,
    generate_gradient_norms,
    gradient_info_from_norms,
    sample_gradient_norms,
)

positive_numbers = st.one_of(
    st.floats(min_value=5e-324, max_value=1.7976931348623157e308),
    st.integers(min_value=1, max_value=10**6),
    st.sampled_from([np.float32(0.5), np.float64(2.0), np.int64(3), Fraction(1, 3)]),
)
counts = st.one_of(st.integers(0, 200), st.sampled_from([np.int64(5), np.uint8(7)]))
seeds = st.one_of(st.none(), st.integers(0, 2**64 - 1))

not_positive_numbers = st.one_of(
    st.floats(max_value=0.0),
    st.sampled_from([math.nan, math.inf, -math.inf, True, False, None, "1.0", [1.0], 1j]),
)
not_counts = st.one_of(
    st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([True, False, None, "3", [3], np.float64(3.0)]),
)
not_seeds = st.one_of(
    st.integers(max_value=-1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([True, "0", [0], np.float64(1.0)]),
)


@given(
    clipping_norm=positive_numbers,
    num_samples=counts,
    median_ratio=st.floats(min_value=1e-3, max_value=1e3),
    sigma=st.one_of(st.floats(min_value=1e-3, max_value=10.0), st.sampled_from([1e300])),
    seed=seeds,
)
def test_sample_norms_finite_positive(clipping_norm, num_samples, median_ratio, sigma, seed):
    median = float(clipping_norm) * median_ratio
    if not (math.isfinite(median) and median > 0):
        with pytest.raises(ValueError, match="clipping_norm \\* median_ratio"):
            sample_gradient_norms(
                clipping_norm, num_samples, median_ratio=median_ratio, sigma=sigma
            )
        return

    norms = sample_gradient_norms(
        clipping_norm, num_samples, median_ratio=median_ratio, sigma=sigma, seed=seed
    )

    assert norms.shape == (num_samples,)
    assert norms.dtype == np.float64
    assert np.isfinite(norms).all()
    assert (norms > 0).all()
    if seed is not None:
        again = sample_gradient_norms(
            clipping_norm, num_samples, median_ratio=median_ratio, sigma=sigma, seed=seed
        )
        assert np.array_equal(norms, again)


@given(num_samples=st.integers(1, 50), seed=st.integers(0, 2**32 - 1))
def test_sample_norms_advance_generator(num_samples, seed):
    generator = np.random.default_rng(seed)
    first = sample_gradient_norms(1.0, num_samples, seed=generator)
    second = sample_gradient_norms(1.0, num_samples, seed=generator)

    expected = sample_gradient_norms(1.0, 2 * num_samples, seed=seed)
    assert np.array_equal(np.concatenate([first, second]), expected)


def test_sample_norms_leave_global_state():
    np.random.seed(0)
    state = np.random.get_state()[1].copy()

    sample_gradient_norms(1.0, 100)
    generate_gradient_info(1.0, 100)

    assert np.array_equal(np.random.get_state()[1], state)


@given(clipping_norm=not_positive_numbers)
def test_invalid_clipping_norm_raises(clipping_norm):
    for call in (
        lambda: sample_gradient_norms(clipping_norm, 3),
        lambda: generate_gradient_norms(clipping_norm, 3),
        lambda: generate_clipped_gradients(clipping_norm, num_points=3),
        lambda: generate_gradient_info(clipping_norm, 3),
    ):
        with pytest.raises(ValueError, match="clipping_norm must be a finite positive number"):
            call()


@given(count=not_counts)
def test_invalid_count_raises(count):
    with pytest.raises(ValueError, match="num_samples must be a non-negative integer"):
        sample_gradient_norms(1.0, count)
    for call in (
        lambda: generate_gradient_norms(1.0, count),
        lambda: generate_clipped_gradients(1.0, num_points=count),
        lambda: generate_gradient_info(1.0, count),
    ):
        with pytest.raises(ValueError, match="num_points must be a non-negative integer"):
            call()


@given(value=not_positive_numbers)
def test_invalid_log_params_raise(value):
    with pytest.raises(ValueError, match="median_ratio must be a finite positive number"):
        sample_gradient_norms(1.0, 3, median_ratio=value)
    with pytest.raises(ValueError, match="sigma must be a finite positive number"):
        sample_gradient_norms(1.0, 3, sigma=value)


@given(seed=not_seeds)
def test_invalid_seed_raises(seed):
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        sample_gradient_norms(1.0, 3, seed=seed)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        generate_gradient_info(1.0, 3, seed=seed)


@given(
    clipping_norm=st.floats(min_value=1e-300, max_value=1e300),
    num_points=st.integers(0, 200),
    seed=seeds,
)
@settings(deadline=None)
def test_gradient_info_points_valid(clipping_norm, num_points, seed):
    info = generate_gradient_info(clipping_norm, num_points, seed=seed)

    assert sorted(info) == ["after_clipping", "before_clipping"]
    before, after = info["before_clipping"], info["after_clipping"]
    assert len(before) == len(after) == num_points
    xs = [point["x"] for point in before]
    assert xs == sorted(xs)
    assert all(math.isfinite(x) and x > 0 for x in xs)
    assert all(math.isfinite(point["y"]) and point["y"] >= 0 for point in before)
    assert all(point["x"] <= clipping_norm for point in after)
    assert sorted(point["y"] for point in after) == sorted(point["y"] for point in before)
    assert [point["x"] for point in after] == sorted(min(x, clipping_norm) for x in xs)


@given(points=st.one_of(st.integers(), st.text(), st.lists(st.integers(), min_size=1)))
def test_malformed_points_raise(points):
    with pytest.raises(ValueError, match="original_gradients must be an iterable"):
        generate_clipped_gradients(1.0, points)


@given(
    before=hnp.arrays(
        np.float64,
        st.integers(0, 100),
        elements=st.floats(min_value=0.0, max_value=1e300, allow_infinity=False)
        | st.sampled_from([math.nan, math.inf]),
    )
)
@settings(deadline=None)
def test_info_from_norms_drops_nonfinite(before):
    after = np.minimum(before, 1.0)
    info = gradient_info_from_norms(before, after)

    for name, values in (("before_clipping", before), ("after_clipping", after)):
        points = info[name]
        assert (points == []) == (not np.isfinite(values).any())
        xs = [point["x"] for point in points]
        assert xs == sorted(xs)
        assert all(math.isfinite(point["x"]) for point in points)
        # The density is inf only for norms too close together for float64 to divide by.
        assert all(point["y"] >= 0 for point in points)
