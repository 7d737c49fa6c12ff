"""GradNormMonitor with privacy="private": Lightning training charged to the accountant."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch
from test_lightning import fit, make_classes

from conftest import read_events
from dp_grad_callbacks.lightning import GradNormMonitor
from dp_grad_callbacks.privacy import combined_noise_multiplier


def test_private_monitor_charges_logged_steps(tmp_path: Path) -> None:
    pl = lightning.pytorch
    classifier_class, _ = make_classes(pl)
    module = classifier_class()
    monitor = GradNormMonitor(tmp_path, log_every=2, privacy="private", histogram_noise=3.0)

    fit(pl, module, callbacks=[monitor], max_steps=4)

    z_eff = combined_noise_multiplier(1.0, 3.0)
    assert module.privacy_engine.accountant.history == [(z_eff, 0.25, 2), (1.0, 0.25, 2)]
    record = monitor.callback.last_record
    assert record is not None
    assert record.private
    assert record.step == 2
    assert record.before.size == 0
    events = read_events(tmp_path)
    assert [s.step for s in events.Scalars("grad_norm/histogram_noise")] == [0, 2]
