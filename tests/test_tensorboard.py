"""Writing records as one TensorBoard event per logged step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_private, read_events
from training import train_epochs
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from torch.utils.tensorboard import SummaryWriter

from dp_grad_callbacks import GradNormCallback, GradNormRecord
from dp_grad_callbacks.stats import bucket_limits, clipped_norms
from dp_grad_callbacks.tensorboard import StepSummary, write_logged_step, write_record

TAGS = {
    "grad_norm/samples",
    "grad_norm/max_grad_norm",
    "grad_norm/clipped_fraction",
    "grad_norm/median",
    "grad_norm/p90",
    "grad_norm/max",
    "grad_norm/nonfinite",
    "grad_norm/before_clipping",
    "grad_norm/after_clipping",
}


def summary_events(logdir: Path) -> list:
    """Return every event with a summary from the one event file in ``logdir``."""
    (path,) = logdir.glob("events.out.tfevents.*")
    return [event for event in EventFileLoader(str(path)).Load() if event.HasField("summary")]


def record_events(logdir: Path) -> list:
    """Return the events that carry values of a record's tags (not the attach-time header)."""
    return [
        event
        for event in summary_events(logdir)
        if any(value.tag in TAGS for value in event.summary.value)
    ]


def make_record(step: int, seed: int = 0) -> GradNormRecord:
    before = np.random.default_rng(seed).lognormal(-0.5, 0.8, 32)
    return GradNormRecord(step, before, clipped_norms(before, 1.0), 1.0)


def test_one_event_per_logged_step(tmp_path):
    private = make_private(poisson=False)
    with GradNormCallback(tmp_path, log_every=1) as callback:
        callback.attach(private.optimizer)
        train_epochs(private)

    events = record_events(tmp_path)
    assert [event.step for event in events] == [0, 1, 2, 3]
    for event in events:
        assert {value.tag for value in event.summary.value} == TAGS


def test_step_summary_reads_back_like_writer(tmp_path):
    limits = bucket_limits(1.0)
    records = [make_record(step, seed=step) for step in range(3)]
    with SummaryWriter(tmp_path / "direct") as writer:
        for record in records:
            write_record(writer, record, prefix="grad_norm", limits=limits)
    with SummaryWriter(tmp_path / "batched") as writer:
        for record in records:
            summary = StepSummary(writer)
            write_record(summary, record, prefix="grad_norm", limits=limits)
            summary.write()

    direct = read_events(tmp_path / "direct")
    batched = read_events(tmp_path / "batched")
    assert set(batched.Tags()["scalars"]) == set(direct.Tags()["scalars"])
    assert set(batched.Tags()["histograms"]) == set(direct.Tags()["histograms"])
    for tag in direct.Tags()["scalars"]:
        expected = [(s.step, s.value) for s in direct.Scalars(tag)]
        assert [(s.step, s.value) for s in batched.Scalars(tag)] == expected
    for tag in direct.Tags()["histograms"]:
        expected = [(h.step, h.histogram_value) for h in direct.Histograms(tag)]
        assert [(h.step, h.histogram_value) for h in batched.Histograms(tag)] == expected
    assert len(summary_events(tmp_path / "batched")) == 3
    assert len(summary_events(tmp_path / "direct")) == 3 * len(TAGS)


@pytest.mark.parametrize(("one_event", "values_per_event"), [(True, len(TAGS)), (False, 1)])
def test_write_logged_step_events(tmp_path, one_event, values_per_event):
    limits = bucket_limits(1.0)
    with SummaryWriter(tmp_path) as writer:
        for step in range(3):
            write_logged_step(
                writer, make_record(step, seed=step), prefix="grad_norm", limits=limits,
                one_event=one_event,
            )

    events = record_events(tmp_path)
    assert len(events) == 3 * len(TAGS) // values_per_event
    assert all(len(event.summary.value) == values_per_event for event in events)
    scalars = read_events(tmp_path).Scalars("grad_norm/samples")
    assert [(s.step, s.value) for s in scalars] == [(0, 32.0), (1, 32.0), (2, 32.0)]


def test_step_summary_splits_events_by_step(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        summary = StepSummary(writer)
        summary.add_scalar("a", 1.0, 5)
        summary.add_scalar("b", 2.0, 5)
        summary.add_scalar("a", 3.0, 6)
        summary.write()
        summary.write()

    events = summary_events(tmp_path)
    assert [(e.step, [v.tag for v in e.summary.value]) for e in events] == [
        (5, ["a", "b"]),
        (6, ["a"]),
    ]


def test_step_summary_rejects_mismatched_buckets(tmp_path):
    with SummaryWriter(tmp_path) as writer:
        summary = StepSummary(writer)
        with pytest.raises(ValueError, match="'h'.*same length.*3 and 2"):
            summary.add_histogram_raw("h", 0.0, 1.0, 2, 1.0, 1.0, [0.5, 1.0, 2.0], [1.0, 1.0], 0)


class CountingWriter(SummaryWriter):
    """A SummaryWriter whose add_scalar override must see every scalar."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.scalar_tags: list[str] = []

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
        self.scalar_tags.append(tag)
        return super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)


def test_step_summary_supports_plain_writer(tmp_path):
    with SummaryWriter(tmp_path / "plain") as writer:
        assert StepSummary.supports(writer)
    with CountingWriter(str(tmp_path / "subclass")) as writer:
        assert not StepSummary.supports(writer)
    with SummaryWriter(tmp_path / "instance") as writer:
        writer.add_histogram_raw = lambda *args, **kwargs: None
        assert not StepSummary.supports(writer)
    assert not StepSummary.supports(object())


def test_writer_override_sees_every_scalar(tmp_path):
    private = make_private(poisson=False)
    writer = CountingWriter(str(tmp_path))
    with GradNormCallback(writer, log_every=1) as callback:
        callback.attach(private.optimizer)
        train_epochs(private)
    writer.close()

    scalar_tags = TAGS - {"grad_norm/before_clipping", "grad_norm/after_clipping"}
    assert set(writer.scalar_tags) >= scalar_tags
    assert writer.scalar_tags.count("grad_norm/median") == 4


def test_fallback_writes_event_per_value(tmp_path, monkeypatch):
    monkeypatch.setattr(StepSummary, "supports", staticmethod(lambda writer: False))
    private = make_private(poisson=False)
    with GradNormCallback(tmp_path, log_every=1) as callback:
        callback.attach(private.optimizer)
        train_epochs(private)

    events = record_events(tmp_path)
    assert len(events) == 4 * len(TAGS)
    assert all(len(event.summary.value) == 1 for event in events)
    scalars = read_events(tmp_path).Scalars("grad_norm/samples")
    assert [(s.step, s.value) for s in scalars] == [(0, 16.0), (1, 16.0), (2, 16.0), (3, 16.0)]
