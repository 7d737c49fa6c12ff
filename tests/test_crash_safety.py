"""What was logged before an exception, a kill or an exit without close() stays readable."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from tensorboard.summary.writer.record_writer import RecordWriter

from conftest import checkout_env, make_private, read_events
from dp_grad_callbacks import GradNormCallback
from training import train

TESTS_DIR = Path(__file__).parent

# Trains with a callback that owns its writer and is never closed, and prints each step's
# index once optimizer.step() has returned. A negative step count runs until killed. With a
# signal number, the child sends that signal to itself right after step ``kill_step``.
# Every event record takes RECORD_DELAY more seconds to reach the file, as on a slow
# disk, so that events still queued in the writer's background thread would be lost.
CHILD = textwrap.dedent(
    """
    import os
    import sys
    import time
    sys.path.insert(0, sys.argv[1])
    from tensorboard.summary.writer.record_writer import RecordWriter
    from conftest import make_private
    from training import train
    from dp_grad_callbacks import GradNormCallback

    log_dir, steps, kill_step, kill_signal = sys.argv[2], *map(int, sys.argv[3:6])
    record_delay = float(sys.argv[6])
    write_record = RecordWriter.write

    def slow_write(self, data):
        time.sleep(record_delay)
        write_record(self, data)

    RecordWriter.write = slow_write
    private = make_private()
    callback = GradNormCallback(log_dir).attach(private.optimizer)
    step = 0
    while step != steps:
        train(private, 1)
        if step == kill_step:
            os.kill(os.getpid(), kill_signal)
        print(step, flush=True)
        step += 1
    """
)
SCALAR_TAGS = [
    "grad_norm/samples",
    "grad_norm/max_grad_norm",
    "grad_norm/nonfinite",
    "grad_norm/clipped_fraction",
    "grad_norm/median",
    "grad_norm/p90",
    "grad_norm/max",
]
HISTOGRAM_TAGS = ["grad_norm/before_clipping", "grad_norm/after_clipping"]
# The step after which the child is killed, by the parent or by itself.
KILL_AFTER_STEP = 4
RECORD_DELAY = 0.005


def start_child(
    log_dir: Path, steps: int, *, kill_step: int = -1, kill_signal: int = 0
) -> subprocess.Popen[str]:
    arguments = [TESTS_DIR, log_dir, steps, kill_step, kill_signal, RECORD_DELAY]
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, *map(str, arguments)],
        env=checkout_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def assert_steps_readable(log_dir: Path, last_step: int) -> None:
    """Check that every tag contains every step from 0 to ``last_step``.

    A kill can land while the next step is being written, so later steps may be there too.
    """
    events = read_events(log_dir)
    for tag in SCALAR_TAGS:
        steps = [event.step for event in events.Scalars(tag)]
        assert steps[: last_step + 1] == list(range(last_step + 1)), tag
    for tag in HISTOGRAM_TAGS:
        steps = [event.step for event in events.Histograms(tag)]
        assert steps[: last_step + 1] == list(range(last_step + 1)), tag


def test_sigterm_from_parent_keeps_steps(tmp_path):
    child = start_child(tmp_path, steps=-1)
    printed = []
    try:
        for line in child.stdout:
            printed.append(int(line))
            if printed[-1] == KILL_AFTER_STEP:
                child.send_signal(signal.SIGTERM)
                break
        remaining, errors = child.communicate(timeout=120)
    finally:
        child.kill()

    assert printed[-1:] == [KILL_AFTER_STEP], errors
    assert child.returncode == -signal.SIGTERM
    printed += [int(line) for line in remaining.split()]
    assert printed == list(range(len(printed)))
    assert_steps_readable(tmp_path, printed[-1])


@pytest.mark.parametrize(
    "kill_signal", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"]
)
def test_killed_right_after_step_keeps_it(tmp_path, kill_signal):
    child = start_child(tmp_path, steps=-1, kill_step=KILL_AFTER_STEP, kill_signal=kill_signal)
    output, errors = child.communicate(timeout=120)

    assert child.returncode == -kill_signal, errors
    assert output.split() == [str(step) for step in range(KILL_AFTER_STEP)]
    assert_steps_readable(tmp_path, KILL_AFTER_STEP)


def test_exit_without_close_keeps_steps(tmp_path):
    child = start_child(tmp_path, steps=3)
    output, errors = child.communicate(timeout=120)

    assert child.returncode == 0, errors
    assert output.split() == ["0", "1", "2"]
    assert_steps_readable(tmp_path, 2)
    assert [event.step for event in read_events(tmp_path).Scalars("grad_norm/samples")] == [0, 1, 2]


def test_exception_keeps_logged_steps(tmp_path, monkeypatch):
    write_record = RecordWriter.write

    def slow_write(self, data):
        time.sleep(RECORD_DELAY)
        write_record(self, data)

    monkeypatch.setattr(RecordWriter, "write", slow_write)
    private = make_private()
    callback = GradNormCallback(tmp_path).attach(private.optimizer)

    def fail_at_step_3(step, x):
        if step == 3:
            raise RuntimeError("loss diverged")
        return x

    with pytest.raises(RuntimeError, match="loss diverged"):
        train(private, 10, corrupt=fail_at_step_3)

    # Read before close(): the per-step flush alone must have written steps 0 to 2.
    assert_steps_readable(tmp_path, 2)
    assert [event.step for event in read_events(tmp_path).Scalars("grad_norm/samples")] == [0, 1, 2]
    callback.close()


def test_exception_in_with_block_keeps_steps(tmp_path):
    private = make_private()

    with pytest.raises(RuntimeError, match="loss diverged"):
        with GradNormCallback(tmp_path) as callback:
            callback.attach(private.optimizer)
            train(private, 2)
            raise RuntimeError("loss diverged")

    assert not callback.attached
    assert_steps_readable(tmp_path, 1)
