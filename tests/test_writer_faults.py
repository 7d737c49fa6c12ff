"""Writer faults: a bad log directory fails early, a failing write never stops training."""

from __future__ import annotations

import logging

import pytest
from tensorboard.compat.proto import event_pb2
from tensorboard.summary.writer.record_writer import RecordWriter
from torch.utils.tensorboard import SummaryWriter

import dp_grad_callbacks.callback
from conftest import make_private, read_events
from dp_grad_callbacks import GradNormCallback
from training import assert_bitwise_equal, parameters, train

STEPS = 6
# The writer's background thread ends with the injected error, which pytest reports.
DEAD_THREAD_EXPECTED = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnhandledThreadExceptionWarning"
)


class FlakyWriter(SummaryWriter):
    """A real SummaryWriter whose add_scalar raises at chosen global steps."""

    def __init__(self, log_dir: str, failing_steps: set[int]) -> None:
        super().__init__(log_dir)
        self.failing_steps = failing_steps

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
        if global_step in self.failing_steps:
            raise OSError(28, "No space left on device")
        return super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)


class FailingFlushWriter(SummaryWriter):
    """A real SummaryWriter whose flush always raises."""

    def flush(self):
        raise OSError(5, "Input/output error")


def kill_writer_thread_at_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    """Make the first summary of logged ``step`` fail in the writer's background thread.

    The thread stores the error, stops, and the SummaryWriter raises that error from every
    later call.
    """
    write = RecordWriter.write
    failed = []

    def write_or_fail(self, data):
        event = event_pb2.Event.FromString(data)
        if not failed and event.step == step and event.summary.value:
            failed.append(event)
            raise OSError(28, "No space left on device")
        write(self, data)

    monkeypatch.setattr(RecordWriter, "write", write_or_fail)


def failure_logs(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == "dp_grad_callbacks.callback" and record.levelno == logging.ERROR
    ]


def trained_without_callback():
    private = make_private()
    train(private, STEPS)
    return parameters(private)


def test_log_dir_under_file_fails(tmp_path):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    log_dir = blocker / "runs"

    with pytest.raises(OSError, match="failed to create the TensorBoard log directory") as raised:
        GradNormCallback(log_dir)

    assert str(log_dir) in str(raised.value)
    assert "SummaryWriter" in str(raised.value)
    assert not log_dir.exists()


def test_log_dir_is_file_fails(tmp_path):
    log_dir = tmp_path / "events"
    log_dir.write_text("")

    with pytest.raises(OSError, match="failed to create the TensorBoard log directory") as raised:
        GradNormCallback(str(log_dir))

    assert str(log_dir) in str(raised.value)


def test_failed_writes_logged_and_counted(tmp_path, caplog):
    expected = trained_without_callback()
    private = make_private()
    writer = FlakyWriter(str(tmp_path), failing_steps={1, 2})

    with caplog.at_level(logging.ERROR), GradNormCallback(writer) as callback:
        callback.attach(private.optimizer)
        train(private, STEPS)
    writer.close()

    assert callback.write_failures == 2
    assert callback.last_record.step == STEPS - 1
    assert_bitwise_equal(parameters(private), expected)

    # The second failure comes within the rate limit's interval of the first.
    logs = failure_logs(caplog)
    assert len(logs) == 1
    assert "step 1" in logs[0].getMessage()
    assert "No space left on device" in logs[0].getMessage()
    assert logs[0].exc_info is not None

    # Failed steps are lost, and the steps after them are written.
    events = read_events(tmp_path)
    for tag in ("grad_norm/samples", "grad_norm/median"):
        assert [event.step for event in events.Scalars(tag)] == [0, 3, 4, 5]
    assert [event.step for event in events.Histograms("grad_norm/before_clipping")] == [0, 3, 4, 5]


def test_failed_flush_counted_not_raised(tmp_path, caplog):
    expected = trained_without_callback()
    private = make_private()
    writer = FailingFlushWriter(str(tmp_path))

    with caplog.at_level(logging.ERROR):
        with pytest.raises(ValueError, match="from the training loop"):
            with GradNormCallback(writer) as callback:
                callback.attach(private.optimizer)
                train(private, STEPS)
                raise ValueError("from the training loop")

    assert callback.write_failures == STEPS
    assert_bitwise_equal(parameters(private), expected)
    messages = [record.getMessage() for record in failure_logs(caplog)]
    assert any("Input/output error" in message for message in messages)
    assert any("on close" in message for message in messages)
    writer.close()


def test_failed_record_build_counted(tmp_path, caplog, monkeypatch):
    expected = trained_without_callback()
    private = make_private()

    def broken_build_record(*args, **kwargs):
        raise FloatingPointError("broken on purpose")

    monkeypatch.setattr(dp_grad_callbacks.callback, "build_record", broken_build_record)
    with caplog.at_level(logging.ERROR), GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        train(private, STEPS)

    assert callback.write_failures == STEPS
    assert callback.last_record is None
    assert_bitwise_equal(parameters(private), expected)
    logs = failure_logs(caplog)
    assert len(logs) == 1
    assert "broken on purpose" in logs[0].getMessage()


@DEAD_THREAD_EXPECTED
def test_dead_owned_writer_replaced(tmp_path, caplog, monkeypatch):
    expected = trained_without_callback()
    private = make_private()
    kill_writer_thread_at_step(monkeypatch, 2)
    with caplog.at_level(logging.ERROR), GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        train(private, STEPS)

    assert callback.write_failures == 1
    assert_bitwise_equal(parameters(private), expected)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert any("No space left on device" in record.getMessage() for record in failure_logs(caplog))

    # The background thread of the first writer died at step 2, so step 2 is lost. Without
    # a new writer every later step would fail with the same error.
    events = read_events(tmp_path)
    assert [event.step for event in events.Scalars("grad_norm/samples")] == [0, 1, 3, 4, 5]
    assert [event.step for event in events.Histograms("grad_norm/after_clipping")] == [0, 1, 3, 4, 5]


@DEAD_THREAD_EXPECTED
def test_dead_user_writer_keeps_failing(tmp_path, monkeypatch):
    private = make_private()
    kill_writer_thread_at_step(monkeypatch, 2)
    writer = SummaryWriter(str(tmp_path))
    with GradNormCallback(writer) as callback:
        callback.attach(private.optimizer)
        train(private, STEPS)

    # The callback cannot replace a writer it did not create.
    assert callback.write_failures == STEPS - 2
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
