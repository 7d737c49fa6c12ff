"""The fallback warning points at the caller's optimizer.step()."""

from __future__ import annotations

import pytest

from conftest import make_private
from dp_grad_callbacks import GradNormCallback


def test_fallback_warning_names_caller(tmp_path):
    private = make_private()
    for parameter in private.model.parameters():
        parameter.requires_grad_(False)

    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        with pytest.warns(RuntimeWarning, match="no per-sample gradient norms") as caught:
            private.optimizer.step()

    assert caught[0].filename == __file__
    assert callback.last_record.synthetic
