"""Non-finite per-sample gradient norms: counted, left out of histograms, never raised."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils.tensorboard import SummaryWriter

from conftest import brute_force_norms, make_private, read_events
from dp_grad_callbacks import GradNormCallback, GradNormRecord
from dp_grad_callbacks.assemble import build_record, collect_step
from dp_grad_callbacks.capture import BatchNorms
from dp_grad_callbacks.stats import bucket_limits, clipped_norms
from dp_grad_callbacks.tensorboard import write_record
from training import train

CORRUPTED = 3
BATCH = 16
WARNING_TEXT = "NaN or infinite"


def corrupt_first_step(step: int, x: torch.Tensor) -> torch.Tensor:
    """Make the first CORRUPTED inputs of step 0 infinite.

    Their norms are NaN, and the NaN gradients they add make every parameter NaN, so that
    every norm of the later steps is NaN too: a diverged run.
    """
    if step != 0:
        return x
    x = x.clone()
    x[:CORRUPTED] = math.inf
    return x


def nonfinite_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "dp_grad_callbacks.callback" and WARNING_TEXT in record.getMessage()
    ]


def test_write_record_drops_nonfinite_values(tmp_path):
    norms = np.array([np.nan, np.inf, 1.0, 2.0])
    record = GradNormRecord(0, norms, clipped_norms(norms, 1.5), 1.5)
    with SummaryWriter(tmp_path) as writer:
        write_record(writer, record, prefix="g", limits=bucket_limits(1.5))

    events = read_events(tmp_path)
    assert events.Scalars("g/samples")[0].value == 4
    assert events.Scalars("g/nonfinite")[0].value == 2
    assert events.Scalars("g/median")[0].value == pytest.approx(1.5)
    assert events.Scalars("g/max")[0].value == 2.0
    assert events.Scalars("g/clipped_fraction")[0].value == pytest.approx(0.5)

    before = events.Histograms("g/before_clipping")[0].histogram_value
    assert before.num == 2
    assert before.max == 2.0
    assert before.sum == 3.0
    assert sum(before.bucket) == 2

    after = events.Histograms("g/after_clipping")[0].histogram_value
    assert after.num == 2
    assert after.max == pytest.approx(1.5, rel=1e-6)


def test_write_record_all_nonfinite_skips_histograms(tmp_path):
    norms = np.array([np.nan, np.inf, -np.inf])
    record = GradNormRecord(7, norms, clipped_norms(norms, 1.0), 1.0)
    with SummaryWriter(tmp_path) as writer:
        write_record(writer, record, prefix="g", limits=bucket_limits(1.0))

    events = read_events(tmp_path)
    assert events.Tags()["histograms"] == []
    assert sorted(events.Tags()["scalars"]) == ["g/max_grad_norm", "g/nonfinite", "g/samples"]
    assert events.Scalars("g/nonfinite")[0].value == 3
    assert events.Scalars("g/nonfinite")[0].step == 7


def test_write_record_finite_has_zero_nonfinite(tmp_path):
    norms = np.array([0.5, 1.0])
    record = GradNormRecord(0, norms, clipped_norms(norms, 1.0), 1.0)
    with SummaryWriter(tmp_path) as writer:
        write_record(writer, record, prefix="g", limits=bucket_limits(1.0))

    assert read_events(tmp_path).Scalars("g/nonfinite")[0].value == 0


def test_infinite_norm_record_without_warning():
    batch = BatchNorms(count=3, max_grad_norm=1.0, norms=torch.tensor([0.5, 2.0, math.inf]))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        record = build_record(0, collect_step([batch], None))

    assert record.num_nonfinite == 1
    assert record.after[0] == 0.5
    assert record.after[1] == pytest.approx(1.0, rel=1e-6)
    assert math.isnan(record.after[2])
    # Only the finite norms count: one of 0.5 and 2.0 exceeds C.
    assert record.clipped_fraction == 0.5


def test_nonfinite_inputs_do_not_raise(tmp_path, caplog):
    private = make_private(poisson=False, batch_size=BATCH)
    x, y = next(iter(private.loader))
    reference = brute_force_norms(private.model, x[CORRUPTED:], y[CORRUPTED:])
    records = []

    with caplog.at_level(logging.WARNING), GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        with warnings.catch_warnings():
            # Non-finite norms must not make numpy warn either.
            warnings.simplefilter("error", RuntimeWarning)
            for step in range(5):
                train(private, 1, corrupt=corrupt_first_step if step == 0 else None)
                records.append(callback.last_record)

    assert callback.write_failures == 0
    assert [record.num_nonfinite for record in records] == [CORRUPTED] + [BATCH] * 4
    np.testing.assert_allclose(records[0].before[CORRUPTED:], reference, rtol=1e-5)
    assert all(torch.isnan(p).all() for p in private.model.parameters())

    events = read_events(tmp_path)
    nonfinite = [event.value for event in events.Scalars("grad_norm/nonfinite")]
    assert nonfinite == [CORRUPTED] + [BATCH] * 4
    assert [event.value for event in events.Scalars("grad_norm/samples")] == [BATCH] * 5
    # Only step 0 has finite norms, so only step 0 has histograms and quantiles.
    for tag in ("grad_norm/before_clipping", "grad_norm/after_clipping"):
        histograms = events.Histograms(tag)
        assert [event.step for event in histograms] == [0]
        assert histograms[0].histogram_value.num == BATCH - CORRUPTED
    for tag in ("grad_norm/median", "grad_norm/p90", "grad_norm/max", "grad_norm/clipped_fraction"):
        scalars = events.Scalars(tag)
        assert [event.step for event in scalars] == [0]
        assert math.isfinite(scalars[0].value)
    assert events.Scalars("grad_norm/max")[0].value == pytest.approx(reference.max(), rel=1e-5)


def test_nonfinite_warning_is_rate_limited(tmp_path, caplog):
    private = make_private(poisson=False, batch_size=BATCH)

    with caplog.at_level(logging.WARNING), GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        train(private, 12, corrupt=corrupt_first_step)

    warnings = nonfinite_warnings(caplog)
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING
    assert f"{CORRUPTED} of {BATCH}" in warnings[0].getMessage()
    assert "grad_norm/nonfinite" in warnings[0].getMessage()
    assert callback.last_record.step == 11
    assert callback.last_record.num_nonfinite == BATCH


def test_finite_norms_log_no_warning(tmp_path, caplog):
    private = make_private()

    with caplog.at_level(logging.WARNING), GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        train(private, 3)

    assert nonfinite_warnings(caplog) == []
    nonfinite = [event.value for event in read_events(tmp_path).Scalars("grad_norm/nonfinite")]
    assert nonfinite == [0, 0, 0]
