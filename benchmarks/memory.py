"""Measure resident memory and live tensors over thousands of logged steps.

The tiny MLP trains twice in one process, first without the callback (the control) and then
with it at ``log_every=1``. Each phase warms up, then runs the measured steps while sampling
the resident set size (RSS) and counting the torch tensors that Python can reach. Growth is
the RSS at the end of a phase minus the RSS after its warm-up.

Linux only: the RSS comes from ``/proc/self/statm``.

Run ``python benchmarks/memory.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import sys
import tempfile
import warnings
from dataclasses import dataclass, field

import torch

import common
from dp_grad_callbacks import GradNormCallback

MODEL = "tiny-mlp"
BATCH_SIZE = 64
STEPS = 5000
WARMUP_STEPS = 200
SMOKE_STEPS = 50
SMOKE_WARMUP_STEPS = 5
SAMPLES = 50
SMOKE_SAMPLES = 5
TARGET_GROWTH_MB = 5.0

PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    """Return this process's resident set size in MB (10**6 bytes)."""
    with open("/proc/self/statm", encoding="utf-8") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * PAGE_SIZE / 1e6


def live_tensors() -> int:
    """Count the torch tensors that the garbage collector tracks, after a full collection."""
    gc.collect()
    with warnings.catch_warnings():
        # isinstance() on some lazily loaded torch modules emits deprecation warnings.
        warnings.simplefilter("ignore")
        return sum(1 for obj in gc.get_objects() if isinstance(obj, torch.Tensor))


@dataclass
class Phase:
    """RSS and tensor counts of one phase."""

    name: str
    rss: list[float] = field(default_factory=list)
    tensors: list[int] = field(default_factory=list)

    def row(self) -> list[str]:
        """Format the phase as a table row."""
        start, end, peak = self.rss[0], self.rss[-1], max(self.rss)
        return [
            self.name,
            f"{start:.1f}",
            f"{end:.1f}",
            f"{peak:.1f}",
            f"{end - start:+.2f}",
            f"{min(self.tensors)} - {max(self.tensors)}",
        ]


def run_phase(
    name: str, *, steps: int, warmup: int, samples: int, with_callback: bool, logdir: str
) -> Phase:
    """Train the tiny MLP for ``warmup + steps`` steps and sample memory ``samples + 1`` times."""
    spec = common.MODELS[MODEL]
    training = common.make_training(spec, batch_size=BATCH_SIZE)
    batches = common.make_batches(spec, count=16, batch_size=BATCH_SIZE, seed=1)
    callback = GradNormCallback(logdir, log_every=1) if with_callback else None
    if callback is not None:
        callback.attach(training.optimizer)

    phase = Phase(name)
    every = max(steps // samples, 1)
    try:
        for step in range(warmup + steps):
            training.step(batches[step % len(batches)])
            measured = step - warmup + 1
            if measured >= 0 and (measured % every == 0 or measured == steps):
                phase.rss.append(rss_mb())
                phase.tensors.append(live_tensors())
    finally:
        if callback is not None:
            callback.close()
    return phase


def main() -> None:
    """Run both phases and write the memory section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    args = parser.parse_args()
    load_at_start = common.load_average()
    common.quiet_warnings()
    steps = SMOKE_STEPS if args.smoke else STEPS
    warmup = SMOKE_WARMUP_STEPS if args.smoke else WARMUP_STEPS
    samples = SMOKE_SAMPLES if args.smoke else SAMPLES

    with tempfile.TemporaryDirectory(prefix="dp-grad-memory-") as logdir:
        control = run_phase(
            "without callback",
            steps=steps, warmup=warmup, samples=samples, with_callback=False, logdir=logdir,
        )
        logged = run_phase(
            "with callback, log_every=1",
            steps=steps, warmup=warmup, samples=samples, with_callback=True, logdir=logdir,
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e3  # kilobytes on Linux
    for phase in (control, logged):
        print(f"{phase.name}: RSS grew by {phase.rss[-1] - phase.rss[0]:+.2f} MB", flush=True)

    growth = logged.rss[-1] - logged.rss[0]
    growth_verdict = "met" if growth < TARGET_GROWTH_MB else "**not met**"
    tensors_flat = min(logged.tensors) == max(logged.tensors)
    lines = [*common.environment_lines(load_at_start), "- Allocator: system malloc (glibc)", ""]
    if args.smoke:
        lines += ["Smoke run: a few steps; the growth means nothing.", ""]
    lines += common.markdown_table(
        ["phase", "RSS after warm-up (MB)", "RSS at end (MB)", "peak sampled RSS (MB)",
         "growth (MB)", "live tensors (min - max)"],
        [control.row(), logged.row()],
    )
    lines += [
        "",
        f"Targets: RSS grows by less than {TARGET_GROWTH_MB:.0f} MB over {STEPS:,} logged steps; "
        f"measured {growth:+.2f} MB over {steps:,}, {growth_verdict}. No tensor outlives its "
        f"step: the count of live tensors was {'constant' if tensors_flat else '**not constant**'} "
        "over the logged steps.",
        "",
        f"The {MODEL} trains at batch {BATCH_SIZE} for {warmup} warm-up steps and {steps:,} "
        f"measured steps per phase, with RSS and live tensors sampled {len(logged.rss)} times. "
        f"Peak RSS of the whole process, imports included: {peak_mb:.0f} MB.",
    ]
    common.write_section(args.results, "memory", "Memory", lines)


if __name__ == "__main__":
    sys.exit(main())
