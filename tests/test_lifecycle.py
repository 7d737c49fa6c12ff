"""Attach, detach and close in every order, and the optimizer's step hook around them."""

from __future__ import annotations

import gc

import numpy as np
import pytest
from torch.utils.tensorboard import SummaryWriter

from conftest import brute_force_norms, make_private, read_events
from dp_grad_callbacks import GradNormCallback
from training import train


def accountant_steps(private) -> int:
    return sum(num_steps for _, _, num_steps in private.engine.accountant.history)


def assert_unpatched(optimizer) -> None:
    assert "pre_step" not in optimizer.__dict__
    assert "clip_and_accumulate" not in optimizer.__dict__


def test_second_detach_does_nothing(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path).attach(private.optimizer)

    callback.detach()
    callback.detach()

    assert not callback.attached
    assert_unpatched(private.optimizer)
    callback.close()


def test_detach_before_attach_does_nothing(tmp_path):
    private = make_private()
    with GradNormCallback(tmp_path) as callback:
        callback.detach()
        assert not callback.attached
        callback.attach(private.optimizer)
        assert callback.attached


def test_attach_after_detach_logs_again(tmp_path):
    private = make_private(poisson=False)
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        train(private, 2)
        callback.detach()
        train(private, 2)
        assert callback.step == 2

        callback.attach(private.optimizer)
        x, y = next(iter(private.loader))
        reference = brute_force_norms(private.model, x, y)
        train(private, 1)

    assert callback.last_record.step == 2
    np.testing.assert_allclose(callback.last_record.before, reference, rtol=1e-5)
    assert [event.step for event in read_events(tmp_path).Scalars("grad_norm/samples")] == [0, 1, 2]


def test_use_after_close_raises(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path)
    callback.close()

    with pytest.raises(RuntimeError, match="closed; create a new one"):
        callback.attach(private.optimizer)
    with pytest.raises(RuntimeError, match="closed; create a new one"):
        callback.flush()
    with pytest.raises(RuntimeError, match="closed; create a new one"):
        with callback:
            pass
    callback.close()
    callback.detach()
    assert_unpatched(private.optimizer)


def test_close_while_attached_restores_optimizer(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    train(private, 1)

    callback.close()

    assert not callback.attached
    assert_unpatched(private.optimizer)
    train(private, 1)
    assert callback.step == 1


def test_close_keeps_user_writer_open(tmp_path):
    private = make_private()
    writer = SummaryWriter(str(tmp_path))
    with GradNormCallback(writer) as callback:
        callback.attach(private.optimizer)
        train(private, 1)

    writer.add_scalar("user/after_close", 1.0, 0)
    writer.close()
    assert read_events(tmp_path).Scalars("user/after_close")[0].value == 1.0


def test_second_callback_rejected(tmp_path):
    private = make_private()
    first = GradNormCallback(tmp_path / "first").attach(private.optimizer)
    second = GradNormCallback(tmp_path / "second")

    with pytest.raises(RuntimeError, match="another GradNormCallback is attached"):
        second.attach(private.optimizer)
    assert not second.attached

    train(private, 2)
    assert first.last_record.step == 1
    assert second.last_record is None

    first.close()
    second.attach(private.optimizer)
    train(private, 1)
    assert second.last_record.step == 0
    second.close()


def test_same_callback_attached_twice_rejected(tmp_path):
    private = make_private()
    other = make_private(seed=1)
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        with pytest.raises(RuntimeError, match="already attached"):
            callback.attach(other.optimizer)
        assert_unpatched(other.optimizer)


def test_accountant_hook_survives_attach_detach(tmp_path):
    private = make_private()
    hook = private.optimizer.step_hook
    assert hook is not None

    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    assert private.optimizer.step_hook is hook
    train(private, 3)
    assert accountant_steps(private) == 3

    callback.close()
    assert private.optimizer.step_hook is hook
    train(private, 2)
    assert accountant_steps(private) == 5


def test_user_hook_survives_attach_detach(tmp_path):
    private = make_private()
    accountant_hook = private.optimizer.step_hook
    calls = []

    def user_hook(optimizer):
        calls.append(optimizer)
        accountant_hook(optimizer)

    private.optimizer.attach_step_hook(user_hook)
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    assert private.optimizer.step_hook is user_hook
    train(private, 3)

    callback.detach()
    assert private.optimizer.step_hook is user_hook
    train(private, 1)

    assert len(calls) == 4
    assert all(optimizer is private.optimizer for optimizer in calls)
    assert accountant_steps(private) == 4
    assert callback.last_record.step == 2
    callback.close()


def test_unclosed_callback_writer_closed_by_gc(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    train(private, 1)
    writer = callback._writer
    callback.detach()

    del callback
    gc.collect()

    # SummaryWriter.close() drops its file writers; a later add_* would open a new file.
    assert writer.all_writers is None

