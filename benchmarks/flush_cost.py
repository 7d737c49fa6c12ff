"""Time writing one logged step to the event file, with and without a flush after it.

Each logged step goes through ``write_logged_step``, the function that ``GradNormCallback``
writes with, to a real ``SummaryWriter``: a record of 64 synthetic raw norms with the
default buckets, as one event per step (the callback's default) or one event per value
(what the callback falls back to for a writer that overrides its ``add_*`` methods). The
callback flushes after every logged step, and the variants without the flush show what
that flush adds. The four variants run in turn, block after block, so that load from
other processes slows them alike.

Run ``python benchmarks/flush_cost.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from torch.utils.tensorboard import SummaryWriter

import common
from dp_grad_callbacks.record import GradNormRecord
from dp_grad_callbacks.stats import bucket_limits, clipped_norms
from dp_grad_callbacks.synthetic import sample_gradient_norms
from dp_grad_callbacks.tensorboard import StepSummary, write_logged_step

SAMPLES = 64
BLOCKS = 30
STEPS = 300
SMOKE_BLOCKS = 2
SMOKE_STEPS = 5


@dataclass(frozen=True)
class Variant:
    """One way of writing a logged step."""

    one_event: bool
    flush: bool

    @property
    def events(self) -> str:
        """The table's description of how the values are split into events."""
        return "one per step" if self.one_event else "one per value"


VARIANTS = tuple(
    Variant(one_event=one_event, flush=flush)
    for one_event in (True, False)
    for flush in (True, False)
)


def make_records(first_step: int, steps: int) -> list[GradNormRecord]:
    """Draw ``steps`` records of :data:`SAMPLES` norms, numbered from ``first_step``."""
    rng = np.random.default_rng(first_step)
    records = []
    for step in range(first_step, first_step + steps):
        before = sample_gradient_norms(common.MAX_GRAD_NORM, SAMPLES, seed=rng)
        after = clipped_norms(before, common.MAX_GRAD_NORM)
        records.append(GradNormRecord(step, before, after, common.MAX_GRAD_NORM))
    return records


def time_block(
    writer: SummaryWriter, records: list[GradNormRecord], variant: Variant
) -> tuple[float, float]:
    """Write ``records`` as ``variant`` does and return the wall and CPU seconds per record.

    CPU time is that of the whole process, so it includes the writer's background thread,
    which serializes each event, computes its checksums and appends it to the file.
    """
    limits = bucket_limits(common.MAX_GRAD_NORM)
    writer.flush()
    wall, cpu = time.perf_counter(), time.process_time()
    for record in records:
        write_logged_step(
            writer, record, prefix="grad_norm", limits=limits, one_event=variant.one_event
        )
        if variant.flush:
            writer.flush()
    # The variants without a flush after each step pay here for the events still queued.
    writer.flush()
    steps = len(records)
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def main() -> None:
    """Time the four variants and write the flush_cost section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument(
        "--blocks",
        type=common.positive_int,
        default=None,
        help=f"blocks per variant (default: {BLOCKS}, or {SMOKE_BLOCKS} with --smoke)",
    )
    parser.add_argument(
        "--steps",
        type=common.positive_int,
        default=None,
        help=f"logged steps per block (default: {STEPS}, or {SMOKE_STEPS} with --smoke)",
    )
    args = parser.parse_args()
    load_at_start = common.load_average()
    blocks, steps = (SMOKE_BLOCKS, SMOKE_STEPS) if args.smoke else (BLOCKS, STEPS)
    if args.blocks is not None:
        blocks = args.blocks
    if args.steps is not None:
        steps = args.steps

    times: dict[Variant, list[tuple[float, float]]] = {variant: [] for variant in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="dp-grad-flush-") as log_dir:
        with SummaryWriter(log_dir) as writer:
            if not StepSummary.supports(writer):
                raise RuntimeError(
                    "StepSummary.supports(SummaryWriter) is False, so the callback writes one "
                    "event per value and the 'one per step' rows would not time the callback"
                )
            first_step = 0
            for _ in range(blocks):
                for variant in VARIANTS:
                    records = make_records(first_step, steps)
                    times[variant].append(time_block(writer, records, variant))
                    first_step += steps

    rows = []
    medians = {}
    for variant in VARIANTS:
        wall = 1e6 * np.array([block[0] for block in times[variant]])
        cpu = 1e6 * np.array([block[1] for block in times[variant]])
        medians[variant] = float(np.median(wall)), float(np.median(cpu))
        low, high = np.percentile(cpu, [25, 75])
        rows.append(
            [
                variant.events,
                "yes" if variant.flush else "no",
                f"{medians[variant][0]:.0f}",
                f"{medians[variant][1]:.0f}",
                f"{low:.0f} - {high:.0f}",
            ]
        )
        cpu_median = medians[variant][1]
        print(f"{variant.events}, flush {variant.flush}: {cpu_median:.0f} us CPU", flush=True)

    callback_wall, callback_cpu = medians[Variant(one_event=True, flush=True)]
    unflushed_wall, unflushed_cpu = medians[Variant(one_event=True, flush=False)]
    per_value_cpu = medians[Variant(one_event=False, flush=True)][1]
    lines = [*common.environment_lines(load_at_start), ""]
    if args.smoke:
        lines += ["Smoke run: few blocks of few steps; the times mean nothing.", ""]
    lines += common.markdown_table(
        [
            "events", "flush after each step", "wall time per logged step (us)",
            "CPU time per logged step (us)", "CPU time quartiles (us)",
        ],
        rows,
    )
    lines += [
        "",
        f"As the callback writes it, one event per step and a flush, a logged step took "
        f"{callback_cpu:.0f} us of CPU time and {callback_wall:.0f} us of wall time. The flush "
        f"changed the CPU time by {callback_cpu - unflushed_cpu:+.0f} us and the wall time by "
        f"{callback_wall - unflushed_wall:+.0f} us. One event per value, with the flush, took "
        f"{per_value_cpu:.0f} us of CPU time.",
        "",
        f"Each logged step writes a raw record of {SAMPLES} synthetic norms with "
        f"C = {common.MAX_GRAD_NORM}: two histograms over the default buckets and seven "
        f"scalars. Times are medians over blocks of {steps} logged steps, {blocks} "
        "per variant. A block ends with a flush in every variant, so events still queued at its "
        "end are charged to it. CPU time is that of the whole process, the writer's "
        "background thread included, and leaves out drawing the norms.",
    ]
    common.write_section(args.results, "flush_cost", "Flush cost", lines)


if __name__ == "__main__":
    sys.exit(main())
