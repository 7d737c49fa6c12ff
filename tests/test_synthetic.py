"""The synthetic log-normal generator and its point-list format."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dp_grad_callbacks import synthetic


def test_log_norms_have_documented_moments():
    norms = synthetic.sample_gradient_norms(2.0, 200_000, seed=0)
    logs = np.log(norms)
    assert logs.mean() == pytest.approx(math.log(2.0) - 0.5, abs=0.01)
    assert logs.std() == pytest.approx(0.8, abs=0.01)


def test_sampler_matches_numpy_lognormal():
    # Equal up to rounding in exp, because the sampler draws the same normals.
    norms = synthetic.sample_gradient_norms(2.0, 10_000, sigma=1.3, seed=3)
    expected = np.random.default_rng(3).lognormal(math.log(2.0) - 0.5, 1.3, 10_000)
    np.testing.assert_allclose(norms, expected, rtol=1e-15, atol=0)


def test_point_lists_have_documented_moments():
    points = synthetic.generate_gradient_norms(1.5, 100_000, seed=1)
    logs = np.log([p["x"] for p in points])
    assert logs.mean() == pytest.approx(math.log(1.5) - 0.5, abs=0.01)
    assert logs.std() == pytest.approx(0.8, abs=0.01)


def test_points_sorted_with_exact_density():
    points = synthetic.generate_gradient_norms(1.0, 50, seed=2)
    x = np.array([p["x"] for p in points])
    y = np.array([p["y"] for p in points])
    z = (np.log(x) + 0.5) / 0.8
    expected = np.exp(-0.5 * z**2) / (x * 0.8 * math.sqrt(2 * math.pi))
    assert np.all(np.diff(x) >= 0)
    np.testing.assert_allclose(y, expected, rtol=1e-12)


def test_clipping_moves_x_and_keeps_y():
    before = synthetic.generate_gradient_norms(1.0, 200, seed=3)
    after = synthetic.generate_clipped_gradients(1.0, before)
    assert [p["x"] for p in after] == [min(p["x"], 1.0) for p in before]
    assert [p["y"] for p in after] == [p["y"] for p in before]
    assert any(p["x"] > 1.0 for p in before)


def test_clipping_reads_generator_of_points_once():
    before = synthetic.generate_gradient_norms(1.0, 50, seed=3)
    from_list = synthetic.generate_clipped_gradients(1.0, before)

    assert synthetic.generate_clipped_gradients(1.0, (point for point in before)) == from_list
    assert synthetic.generate_clipped_gradients(1.0, tuple(before)) == from_list
    assert len(from_list) == 50


@pytest.mark.parametrize(
    "points",
    [
        ({"x": 1.0} for _ in range(3)),
        iter([{"x": 1.0, "y": 0.5}, 7]),
        ({"x": "far", "y": 0.5} for _ in range(2)),
    ],
    ids=["missing y", "not a point", "not a number"],
)
def test_clipping_rejects_malformed_generator(points):
    with pytest.raises(ValueError, match="original_gradients must be an iterable of"):
        synthetic.generate_clipped_gradients(1.0, points)


def test_gradient_info_shape():
    info = synthetic.generate_gradient_info(1.0, 30, seed=4)
    assert set(info) == {"before_clipping", "after_clipping"}
    assert len(info["before_clipping"]) == len(info["after_clipping"]) == 30
    assert all(set(p) == {"x", "y"} for p in info["after_clipping"])
    assert max(p["x"] for p in info["after_clipping"]) <= 1.0


def test_default_arguments_keep_original_signature():
    assert len(synthetic.generate_gradient_norms(1.0)) == 100
    assert len(synthetic.generate_clipped_gradients(1.0)) == 100
    assert len(synthetic.generate_gradient_info(1.0)["before_clipping"]) == 100
    assert synthetic.generate_gradient_norms(1.0, 0) == []


@pytest.mark.parametrize(
    "function",
    [
        synthetic.generate_gradient_norms,
        synthetic.generate_clipped_gradients,
        synthetic.generate_gradient_info,
    ],
)
def test_seed_reproduces_and_generator_advances(function):
    assert function(1.0, num_points=20, seed=5) == function(1.0, num_points=20, seed=5)
    assert function(1.0, num_points=20, seed=5) != function(1.0, num_points=20, seed=6)
    rng = np.random.default_rng(5)
    assert function(1.0, num_points=20, seed=rng) != function(1.0, num_points=20, seed=rng)


def test_global_numpy_state_untouched():
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    synthetic.generate_gradient_info(1.0, 1000)
    synthetic.sample_gradient_norms(1.0, 1000)
    assert np.array_equal(np.random.get_state()[1], state)


def test_never_returns_infinite_norm():
    norms = synthetic.sample_gradient_norms(1.0, 1_000_000, seed=7)
    assert np.all(np.isfinite(norms))
    assert np.all(norms > 0)


@pytest.mark.parametrize("clipping_norm", [0, -1.0, float("nan"), float("inf"), "1", None, True])
def test_invalid_clipping_norm_raises(clipping_norm):
    with pytest.raises(ValueError, match="clipping_norm"):
        synthetic.generate_gradient_info(clipping_norm)


@pytest.mark.parametrize("num_points", [-1, 2.5, "10", None, False])
def test_invalid_num_points_raises(num_points):
    with pytest.raises(ValueError, match="num_points"):
        synthetic.generate_gradient_norms(1.0, num_points)


@pytest.mark.parametrize(("option", "value"), [("median_ratio", 0.0), ("sigma", -0.1)])
def test_invalid_sampler_parameters_raise(option, value):
    with pytest.raises(ValueError, match=option):
        synthetic.sample_gradient_norms(1.0, 10, **{option: value})


def test_median_ratio_sets_median():
    norms = synthetic.sample_gradient_norms(2.0, 200_000, median_ratio=0.25, seed=8)
    assert np.median(norms) == pytest.approx(0.5, rel=0.01)


def test_points_from_real_norms():
    rng = np.random.default_rng(9)
    before = rng.lognormal(0.0, 0.5, 5000)
    after = np.minimum(before, 1.0)
    info = synthetic.gradient_info_from_norms(before, after, bins=20)
    xs = [p["x"] for p in info["before_clipping"]]
    widths = np.diff(np.histogram_bin_edges(before, bins=20))
    assert len(xs) == 20
    assert xs == sorted(xs)
    assert sum(p["y"] for p in info["before_clipping"]) * widths[0] == pytest.approx(1.0)
    assert max(p["x"] for p in info["after_clipping"]) < 1.0


def test_points_from_empty_norms():
    info = synthetic.gradient_info_from_norms(np.array([]), np.array([np.nan]))
    assert info == {"before_clipping": [], "after_clipping": []}
