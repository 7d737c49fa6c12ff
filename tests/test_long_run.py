"""Long runs: memory stays flat over 100,000 logged steps through the real writer."""

from __future__ import annotations

import gc
import resource
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer

from dp_grad_callbacks import GradNormCallback, GradNormRecord
from dp_grad_callbacks.stats import clipped_norms
from dp_grad_callbacks.synthetic import sample_gradient_norms

LOGGED_STEPS = 100_000
WARMUP_STEPS = 5_000
SAMPLES = 64
MAX_GRAD_NORM = 1.0
# Keeping one record per step (two arrays of SAMPLES floats) would add over 100 MiB.
MAX_RSS_GROWTH_BYTES = 16 * 2**20
MAX_OBJECT_GROWTH = 1_000


def peak_rss_bytes() -> int:
    # On Linux ru_maxrss is the peak resident set size in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def event_file_size(log_dir: Path) -> int:
    (event_file,) = log_dir.glob("events.out.tfevents.*")
    return event_file.stat().st_size


@pytest.mark.slow
def test_memory_flat_over_long_run(tmp_path):
    model = torch.nn.Linear(2, 1)
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=MAX_GRAD_NORM,
        expected_batch_size=SAMPLES,
    )
    rng = np.random.default_rng(0)

    with GradNormCallback(tmp_path) as callback:
        callback.attach(optimizer)
        for step in range(LOGGED_STEPS):
            if step == WARMUP_STEPS:
                gc.collect()
                objects_after_warmup = len(gc.get_objects())
                rss_after_warmup = peak_rss_bytes()
                size_after_warmup = event_file_size(tmp_path)

            before = sample_gradient_norms(MAX_GRAD_NORM, SAMPLES, seed=rng)
            if step % 1_000 == 0:
                before[0] = np.nan  # also runs the non-finite count and its rate-limited warning
            after = clipped_norms(before, MAX_GRAD_NORM)
            record = GradNormRecord(step, before, after, MAX_GRAD_NORM)
            # A real optimizer step would cost more than the write it triggers, so the test
            # drives the callback's write path directly.
            callback._write(record)

        gc.collect()
        object_growth = len(gc.get_objects()) - objects_after_warmup
        rss_growth = peak_rss_bytes() - rss_after_warmup

    assert callback.write_failures == 0
    assert object_growth < MAX_OBJECT_GROWTH
    assert rss_growth < MAX_RSS_GROWTH_BYTES
    # Every step writes about the same number of bytes. Reading 100,000 steps back with
    # EventAccumulator would take longer than writing them, and other tests check content.
    expected_size = size_after_warmup * LOGGED_STEPS / WARMUP_STEPS
    assert event_file_size(tmp_path) > 0.9 * expected_size
