"""Reading runs back: bucket edges, density points, tag roots and step listings."""

from __future__ import annotations

import dataclasses
import logging
import warnings

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import HistogramValue
from torch.utils.tensorboard import SummaryWriter

from dp_grad_callbacks.record import GradNormRecord
from dp_grad_callbacks.runs import (
    DamagedEventFileWarning,
    RunReadError,
    bucket_edges,
    describe_steps,
    histogram_points,
    load_norm_series,
    select_series,
)
from dp_grad_callbacks.stats import LAST_BUCKET_LIMIT, bucket_limits, clipped_norms
from dp_grad_callbacks.tensorboard import write_noisy_record, write_record


def histogram(limits, counts, *, low, high):
    counts = [float(c) for c in counts]
    return HistogramValue(
        min=low, max=high, num=sum(counts), sum=0.0, sum_squares=0.0,
        bucket_limit=list(limits), bucket=counts,
    )


def write_run(logdir, records, *, prefix="grad_norm"):
    with SummaryWriter(str(logdir)) as writer:
        for record in records:
            write_record(writer, record, prefix=prefix, limits=bucket_limits(record.max_grad_norm))


def real_record(step, norms, max_grad_norm=1.0, *, synthetic=False):
    norms = np.asarray(norms, dtype=np.float64)
    return GradNormRecord(step, norms, clipped_norms(norms, max_grad_norm), max_grad_norm,
                          synthetic=synthetic)


def test_bucket_edges_closed_buckets_reuse_limits():
    value = histogram([1.0, 2.0, 4.0, 8.0], [0, 3, 1, 0], low=1.5, high=5.0)

    lower, upper = bucket_edges(value)

    assert lower.tolist() == [0.5, 1.0, 2.0, 4.0]
    assert upper.tolist() == [1.0, 2.0, 4.0, 8.0]


def test_bucket_edges_open_last_bucket_uses_max():
    value = histogram([1.0, 2.0, 4.0, LAST_BUCKET_LIMIT], [0, 1, 1, 2], low=1.5, high=30.0)

    lower, upper = bucket_edges(value)

    assert lower[-1] == 4.0
    assert upper[-1] == 30.0


def test_open_last_bucket_minimum_width():
    value = histogram([1.0, 2.0, 4.0, LAST_BUCKET_LIMIT], [0, 1, 1, 2], low=1.5, high=4.5)

    _, upper = bucket_edges(value)

    assert upper[-1] == 8.0


def test_bucket_edges_open_first_bucket_uses_min():
    value = histogram([1.0, 2.0, 4.0], [2, 1, 0], low=0.01, high=3.0)

    lower, _ = bucket_edges(value)

    assert lower[0] == 0.01


def test_bucket_edges_non_positive_limits_step_linearly():
    value = histogram([-1.0, 0.0, 1.0], [0, 1, 1], low=-0.5, high=0.5)

    lower, upper = bucket_edges(value)

    assert lower.tolist() == [-2.0, -1.0, 0.0]
    assert upper.tolist() == [-1.0, 0.0, 1.0]


def test_histogram_points_match_numpy_density():
    rng = np.random.default_rng(5)
    norms = rng.lognormal(mean=-0.5, sigma=0.8, size=500)
    edges = 10.0 ** (np.arange(-30, 21) / 10)
    counts, _ = np.histogram(norms, bins=edges)
    value = histogram(edges[1:], counts, low=float(norms.min()), high=float(norms.max()))

    points = histogram_points(value)

    density, _ = np.histogram(norms, bins=edges, density=True)
    used = slice(np.flatnonzero(counts)[0], np.flatnonzero(counts)[-1] + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    assert [p["x"] for p in points] == pytest.approx(centres[used].tolist(), rel=1e-12)
    assert [p["y"] for p in points] == pytest.approx(density[used].tolist(), rel=1e-9)


def test_histogram_points_integrate_to_one():
    value = histogram([1.0, 2.0, 4.0, LAST_BUCKET_LIMIT], [1, 5, 3, 2], low=0.7, high=9.0)

    points = histogram_points(value)

    lower, upper = bucket_edges(value)
    assert sum(p["y"] * (hi - lo) for p, lo, hi in zip(points, lower, upper)) == pytest.approx(1.0)
    assert [p["x"] for p in points] == sorted(p["x"] for p in points)


def test_histogram_points_empty_histogram():
    value = histogram([1.0, 2.0], [0, 0], low=0.0, high=0.0)

    assert histogram_points(value) == []


def test_describe_steps_short_and_long():
    assert describe_steps([]) == "none"
    assert describe_steps([0, 5, 9]) == "0, 5, 9"
    assert describe_steps(list(range(0, 1000, 10))) == "0, 10, 20, ..., 990 (100 steps)"


def test_load_norm_series_finds_real_and_synthetic_roots(tmp_path):
    write_run(tmp_path / "a", [real_record(0, [0.5, 2.0]), real_record(1, [0.1], synthetic=True)])
    with SummaryWriter(str(tmp_path / "b")) as writer:
        writer.add_scalar("loss", 1.0, 0)

    series = load_norm_series(tmp_path)

    assert [(item.run, item.tag_root, item.synthetic) for item in series] == [
        ("a", "grad_norm", False),
        ("a", "grad_norm/synthetic", True),
    ]


def test_load_norm_series_ignores_histogram_only_roots(tmp_path):
    with SummaryWriter(str(tmp_path)) as writer:
        writer.add_histogram("grad_norm/layer/fc.weight/before_clipping", np.ones(3), 0)
    write_run(tmp_path, [real_record(0, [0.5])])

    series = load_norm_series(tmp_path)

    assert [item.tag_root for item in series] == ["grad_norm"]


def test_summary_skips_empty_last_step(tmp_path):
    write_run(tmp_path, [real_record(0, [0.5, 2.0, 3.0]), real_record(1, [])])

    summary = load_norm_series(tmp_path)[0].summarize()

    assert summary.logged_steps == 2
    assert summary.last_step == 0
    assert summary.clipped_fraction == pytest.approx(2 / 3, rel=1e-6)
    assert summary.median == pytest.approx(2.0, rel=1e-6)


def test_summary_private_run_reports_noise(tmp_path):
    record = GradNormRecord(0, np.empty(0), np.empty(0), 1.0)
    limits = bucket_limits(1.0)
    counts = np.zeros(limits.size)
    counts[25:30] = [3.5, 10.0, 20.25, 8.0, 1.0]
    private = dataclasses.replace(
        record, noisy_counts=counts, bucket_limits=limits, histogram_noise=2.5
    )
    with SummaryWriter(str(tmp_path)) as writer:
        write_noisy_record(writer, private, prefix="grad_norm")

    summary = load_norm_series(tmp_path)[0].summarize()

    assert summary.histogram_noise == 2.5
    assert summary.synthetic is False
    assert summary.last_step == 0


def test_summarize_only_empty_steps_gives_none(tmp_path):
    write_run(tmp_path, [real_record(0, []), real_record(1, [])])

    summary = load_norm_series(tmp_path)[0].summarize()

    assert summary.logged_steps == 2
    assert summary.last_step is None
    assert summary.median is None
    assert summary.suggested_max_grad_norm is None


def test_select_series_ambiguous_names_choices(tmp_path):
    write_run(tmp_path, [real_record(0, [0.5]), real_record(1, [0.1], synthetic=True)])
    series = load_norm_series(tmp_path)

    with pytest.raises(RunReadError, match=r"\.:grad_norm, \.:grad_norm/synthetic"):
        select_series(series)

    assert select_series(series, tag_root="grad_norm/synthetic").synthetic


def test_gradient_info_unknown_step_lists_steps(tmp_path):
    write_run(tmp_path, [real_record(0, [0.5]), real_record(4, [0.7])])
    series = load_norm_series(tmp_path)[0]

    with pytest.raises(RunReadError, match="step 3 not found.*Logged steps: 0, 4"):
        series.gradient_info(3)


def damaged_run(logdir, damage):
    """Write ten logged steps, then let ``damage(data)`` rewrite the event file's bytes."""
    write_run(logdir, [real_record(step, [0.5, 2.0]) for step in range(10)])
    (path,) = logdir.glob("events.out.tfevents.*")
    path.write_bytes(damage(path.read_bytes()))
    return path


def flip_byte_at_two_thirds(data):
    damaged = bytearray(data)
    damaged[2 * len(data) // 3] ^= 0xFF
    return bytes(damaged)


def test_damaged_file_warns_keeps_earlier_steps(tmp_path):
    path = damaged_run(tmp_path, flip_byte_at_two_thirds)

    with pytest.warns(DamagedEventFileWarning, match="fails its CRC check") as caught:
        (series,) = load_norm_series(tmp_path)

    assert len(caught) == 1
    assert str(path) in str(caught[0].message)
    assert 0 < len(series.logged_steps) < 10
    assert series.logged_steps == list(range(len(series.logged_steps)))


def test_truncated_file_warns_incomplete(tmp_path):
    damaged_run(tmp_path, lambda data: data[:-5])

    with pytest.warns(DamagedEventFileWarning, match="incomplete record"):
        (series,) = load_norm_series(tmp_path)

    # The cut takes the last record, which can be any of step 9's events.
    assert series.logged_steps[:9] == list(range(9))


def test_intact_file_no_warning(tmp_path, caplog):
    write_run(tmp_path, [real_record(step, [0.5, 2.0]) for step in range(3)])
    tensorboard_logger = logging.getLogger("tensorboard")
    level = tensorboard_logger.level

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (series,) = load_norm_series(tmp_path)

    assert series.logged_steps == [0, 1, 2]
    assert tensorboard_logger.level == level
    assert not tensorboard_logger.filters
    assert [r for r in caplog.records if r.name.startswith("tensorboard")] == []


def test_histogram_steps_skip_non_finite(tmp_path):
    write_run(tmp_path, [real_record(0, [0.5]), real_record(1, [np.nan, np.inf]),
                         real_record(2, [])])

    (series,) = load_norm_series(tmp_path)

    assert series.steps_with_samples == [0, 1]
    assert series.steps_with_histograms == [0]


def test_damaged_then_intact_file_warns_once(tmp_path):
    damaged_run(tmp_path, flip_byte_at_two_thirds)
    write_run(tmp_path, [real_record(20, [0.5])])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (series,) = load_norm_series(tmp_path)

    damaged = [w for w in caught if issubclass(w.category, DamagedEventFileWarning)]
    assert len(damaged) == 1
    assert series.logged_steps[-1] == 20
