"""Measure what flushing the event file after every logged step adds to writing the step.

Writes synthetic records of 64 norms through ``write_record`` to a real ``SummaryWriter``,
in alternating blocks with and without ``SummaryWriter.flush()`` after each record, and
prints the median time per logged step of each variant. Alternating the blocks spreads the
load of other processes over both variants.

Run: ``python benchmarks/flush_cost.py [--blocks 20] [--steps 200]``
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from dp_grad_callbacks.record import GradNormRecord
from dp_grad_callbacks.stats import bucket_limits, clipped_norms
from dp_grad_callbacks.synthetic import sample_gradient_norms
from dp_grad_callbacks.tensorboard import write_record

MAX_GRAD_NORM = 1.0
SAMPLES = 64


def time_block(
    writer: SummaryWriter, first_step: int, steps: int, flush: bool
) -> tuple[float, float]:
    """Write ``steps`` records and return the wall and CPU seconds per record."""
    limits = bucket_limits(MAX_GRAD_NORM)
    rng = np.random.default_rng(first_step)
    records = []
    for step in range(first_step, first_step + steps):
        before = sample_gradient_norms(MAX_GRAD_NORM, SAMPLES, seed=rng)
        after = clipped_norms(before, MAX_GRAD_NORM)
        records.append(GradNormRecord(step, before, after, MAX_GRAD_NORM))

    writer.flush()
    wall, cpu = time.perf_counter(), time.process_time()
    for record in records:
        write_record(writer, record, prefix="grad_norm", limits=limits)
        if flush:
            writer.flush()
    # Include the writes still queued at the end of the block, so that the variant
    # without flush pays for them too.
    writer.flush()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=20, help="blocks per variant")
    parser.add_argument("--steps", type=int, default=200, help="logged steps per block")
    args = parser.parse_args()

    times: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    with tempfile.TemporaryDirectory() as log_dir, SummaryWriter(log_dir) as writer:
        step = 0
        for _ in range(args.blocks):
            for flush in (False, True):
                times[flush].append(time_block(writer, step, args.steps, flush))
                step += args.steps

    for flush, label in ((False, "without flush"), (True, "with flush")):
        wall = statistics.median(t[0] for t in times[flush]) * 1e6
        cpu = statistics.median(t[1] for t in times[flush]) * 1e6
        print(f"{label:>14}: {wall:7.0f} us wall, {cpu:7.0f} us CPU per logged step (median)")


if __name__ == "__main__":
    main()
