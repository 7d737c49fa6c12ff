"""The main example, run end to end as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import checkout_env, read_events

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits.py"


def test_digits_example_leaves_readable_histograms(tmp_path):
    logdir = tmp_path / "digits"
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "1", "--logdir", str(logdir)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=checkout_env(),
    )

    assert result.returncode == 0, result.stderr
    assert "final test accuracy" in result.stdout
    assert "epsilon" in result.stdout
    assert f"tensorboard --logdir {tmp_path}" in result.stdout

    events = read_events(logdir)
    before = events.Histograms("grad_norm/before_clipping")
    samples = events.Scalars("grad_norm/samples")
    # Opacus's Poisson loader draws as many batches as the original one: ceil(1437 / 128).
    assert len(samples) == 12
    assert [h.step for h in before] == [s.step for s in samples if s.value > 0]
    assert sum(s.value for s in samples) > 1000
    assert all(h.histogram_value.num > 32 for h in before)
