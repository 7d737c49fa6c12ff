"""GradNormMonitor in a real two-process Lightning "ddp" run on the CPU (gloo, DPDDP)."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import checkout_env, read_events
from lightning_ddp_run import BATCH_SIZES, MODES, STEPS, WORLD_SIZE

SCRIPT = Path(__file__).resolve().parent / "lightning_ddp_run.py"
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]
GLOBAL_BATCH = sum(BATCH_SIZES)


@pytest.fixture(scope="module", params=sorted(MODES))
def ddp_run(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict]]:
    out_dir = tmp_path_factory.mktemp(f"lightning_ddp_{request.param}")
    env = checkout_env()
    # Gloo connects the ranks over the loopback interface, so nothing leaves the machine.
    env["GLOO_SOCKET_IFNAME"] = "lo"
    env["MASTER_ADDR"] = "127.0.0.1"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(out_dir), request.param],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-5000:]

    ranks = []
    for rank in range(WORLD_SIZE):
        with open(out_dir / f"rank{rank}.pkl", "rb") as file:
            ranks.append(pickle.load(file))
    return out_dir, ranks


def test_ddp_every_rank_attaches(ddp_run: tuple[Path, list[dict]]) -> None:
    _, ranks = ddp_run
    for rank in ranks:
        assert rank["attached_during_training"]
        assert sorted(rank["records"]) == list(range(STEPS))


def test_ddp_records_hold_global_batch(ddp_run: tuple[Path, list[dict]]) -> None:
    _, ranks = ddp_run
    assert [rank["batch_size"] for rank in ranks] == list(BATCH_SIZES)
    for step in range(STEPS):
        expected = {
            name: np.concatenate([rank["reference_norms"][step][name] for rank in ranks])
            for name in NAMES
        }
        total = np.sqrt(sum(np.square(values) for values in expected.values()))
        for rank in ranks:
            record = rank["records"][step]
            assert record.step == step
            assert record.num_samples == GLOBAL_BATCH
            np.testing.assert_allclose(record.before, total, rtol=1e-5)
            assert sorted(record.layer_before) == sorted(NAMES)
            for name in NAMES:
                np.testing.assert_allclose(record.layer_before[name], expected[name], rtol=1e-5)


def test_ddp_only_rank_zero_writes(ddp_run: tuple[Path, list[dict]]) -> None:
    out_dir, ranks = ddp_run
    log_dir = Path(ranks[0]["log_dir"])
    event_files = sorted(out_dir.rglob("events.out.tfevents.*"))
    assert [path.parent for path in event_files] == [log_dir]

    events = read_events(log_dir)
    histograms = events.Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == list(range(STEPS))
    assert [event.histogram_value.num for event in histograms] == [GLOBAL_BATCH] * STEPS
    assert [event.value for event in events.Scalars("grad_norm/samples")] == [GLOBAL_BATCH] * STEPS
    assert "grad_norm/layer/2.bias/after_clipping" in events.Tags()["histograms"]
