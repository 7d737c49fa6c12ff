"""The Lightning digits example, run end to end as a user would."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import checkout_env, read_events

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_digits_lightning.py"


def test_lightning_example_logs_dashboard(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), "--epochs", "1", "--logdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=checkout_env(),
    )

    assert result.returncode == 0, result.stderr
    # Opacus's Poisson loader draws as many batches as the original one: ceil(1437 / 64).
    assert "steps: 23, test accuracy:" in result.stdout
    run = tmp_path / "digits" / "version_0"
    assert f"TensorBoard run: {run}" in result.stdout

    events = read_events(run)
    histogram_steps = [event.step for event in events.Histograms("grad_norm/before_clipping")]
    assert histogram_steps == list(range(23))
    assert [event.step for event in events.Scalars("privacy/epsilon")] == [0, 10, 20, 22]
    assert "custom_scalars__config__" in events.Tags()["tensors"]
    assert "grad_norm/dp_settings/text_summary" in events.Tags()["tensors"]
    assert "train/loss" in events.Tags()["scalars"]
