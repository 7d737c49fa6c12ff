"""Measure the bytes that GradNormCallback adds to the event file per logged step.

Two sources of norms, both with the callback's default buckets: a real training run of
the small conv net with the callback attached, and synthetic norms spread log-uniformly over
every bucket, the worst case for the histogram's size. The synthetic norms are written both
as the callback writes them, one event per logged step, and with one event per value. For
comparison, the real norms are also written with ``SummaryWriter.add_histogram``'s default
buckets.

Run ``python benchmarks/events.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
from tensorboard.compat.proto import event_pb2
from torch.utils.tensorboard import SummaryWriter

import common
from dp_grad_callbacks import GradNormCallback, GradNormRecord
from dp_grad_callbacks.stats import bucket_limits, clipped_norms
from dp_grad_callbacks.tensorboard import StepSummary, write_record

STEPS = 300
SMOKE_STEPS = 5
MODEL = "conv-net"
SMOKE_BATCH_SIZE = 8
TARGET_HISTOGRAM_BYTES = 4096

# A TFRecord frames each event with an 8-byte length and two 4-byte checksums.
RECORD_FRAMING_BYTES = 16


def event_file(logdir: Path) -> Path:
    """Return the single event file in ``logdir``."""
    files = sorted(logdir.glob("events.out.tfevents.*"))
    if len(files) != 1:
        raise RuntimeError(f"expected one event file in {logdir}, found {len(files)}")
    return files[0]


def value_sizes(path: Path) -> dict[str, list[int]]:
    """Return the serialized sizes of the record events in an event file, by kind.

    Record events are those with histogram or scalar values. Kinds: ``"histogram"`` and
    ``"scalar"`` for each value, ``"framing"`` for what each event adds around its values
    (wall time, step and record framing), and ``"event"`` for each whole event with its
    framing. The file's header event and the dashboard's text and layout are left out.
    """
    sizes: dict[str, list[int]] = defaultdict(list)
    for raw in RawEventFileLoader(str(path)).Load():
        event = event_pb2.Event.FromString(raw)
        values = event.summary.value if event.HasField("summary") else []
        kinds = [_kind(value) for value in values]
        if not any(kinds):
            continue
        value_bytes = 0
        for value, kind in zip(values, kinds, strict=True):
            # Each value is a length-delimited field of the summary: a tag byte, a length
            # varint and the value itself.
            size = value.ByteSize()
            size += 1 + len(_varint(size))
            value_bytes += size
            sizes[kind or "other"].append(size)
        sizes["framing"].append(len(raw) - value_bytes + RECORD_FRAMING_BYTES)
        sizes["event"].append(len(raw) + RECORD_FRAMING_BYTES)
    return sizes


def _kind(value: Any) -> str | None:
    if value.HasField("histo"):
        return "histogram"
    if value.HasField("simple_value"):
        return "scalar"
    return None


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def measure_training(logdir: Path, *, steps: int, batch_size: int) -> tuple[list[str], np.ndarray]:
    """Train the conv net with the callback for ``steps`` logged steps.

    Returns:
        The table row and the last step's norms before clipping.
    """
    spec = common.MODELS[MODEL]
    training = common.make_training(spec, batch_size=batch_size)
    batches = common.make_batches(spec, count=16, batch_size=batch_size, seed=1)
    with GradNormCallback(str(logdir), log_every=1) as callback:
        callback.attach(training.optimizer)
        for step in range(steps):
            training.step(batches[step % len(batches)])
        assert callback.last_record is not None
        norms = callback.last_record.before
    return size_row(f"{MODEL} training, batch {batch_size}", event_file(logdir), steps), norms


def measure_worst_case(
    logdir: Path, *, steps: int, batch_size: int, one_event_per_step: bool
) -> list[str]:
    """Write records whose norms fill every bucket, as the callback writes them.

    With ``one_event_per_step=False`` each value gets its own event, as the callback does
    for a writer without ``_get_file_writer``.
    """
    limits = bucket_limits(common.MAX_GRAD_NORM)
    rng = np.random.default_rng(0)
    # One decade below the first limit to one above the last finite one: every bucket,
    # the open first and last ones included, receives norms.
    low, high = np.log10(limits[0]) - 1, np.log10(limits[-2]) + 1
    size = max(batch_size, 4 * len(limits))
    with SummaryWriter(str(logdir)) as writer:
        for step in range(steps):
            before = 10.0 ** rng.uniform(low, high, size)
            record = GradNormRecord(
                step, before, clipped_norms(before, common.MAX_GRAD_NORM), common.MAX_GRAD_NORM
            )
            if one_event_per_step:
                summary = StepSummary(writer)
                write_record(summary, record, prefix="grad_norm", limits=limits)
                summary.write()
            else:
                write_record(writer, record, prefix="grad_norm", limits=limits)
    events = "one event per step" if one_event_per_step else "one event per value"
    name = f"synthetic norms over all {len(limits)} buckets, {size} a step, {events}"
    return size_row(name, event_file(logdir), steps)


def measure_default_histogram(logdir: Path, norms: np.ndarray, *, steps: int) -> list[str]:
    """Write ``norms`` with ``add_histogram``'s default buckets, one histogram a step."""
    with SummaryWriter(str(logdir)) as writer:
        for step in range(steps):
            writer.add_histogram("grad_norm/before_clipping", norms, step)
    return size_row("same norms, `add_histogram` default buckets, one histogram", event_file(logdir), steps)


def size_row(name: str, path: Path, steps: int) -> list[str]:
    """Summarise one event file as a table row."""
    sizes = value_sizes(path)
    histograms = np.array(sizes["histogram"] or [0])
    return [
        name,
        f"{sum(sizes['event']) / steps:.0f}",
        f"{len(sizes['histogram']) / steps:.0f}",
        f"{histograms.mean():.0f}",
        f"{histograms.max()}",
        f"{sum(sizes['scalar']) / steps:.0f}",
        f"{sum(sizes['framing']) / steps:.0f}",
    ]


def main() -> None:
    """Measure the event sizes and write the events section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    args = parser.parse_args()
    load_at_start = common.load_average()
    common.quiet_warnings()
    steps = SMOKE_STEPS if args.smoke else STEPS
    batch_size = SMOKE_BATCH_SIZE if args.smoke else common.MODELS[MODEL].batch_size

    with tempfile.TemporaryDirectory(prefix="dp-grad-events-") as root:
        training_row, norms = measure_training(Path(root) / "training", steps=steps, batch_size=batch_size)
        worst_rows = [
            measure_worst_case(
                Path(root) / f"worst-{one_event}",
                steps=steps,
                batch_size=batch_size,
                one_event_per_step=one_event,
            )
            for one_event in (True, False)
        ]
        default_row = measure_default_histogram(Path(root) / "default", norms, steps=steps)
    rows = [training_row, *worst_rows, default_row]
    for row in rows:
        print(f"{row[0]}: {row[1]} bytes a step, largest histogram {row[4]} bytes", flush=True)

    largest = max(int(rows[0][4]), int(rows[1][4]))
    verdict = "met" if largest <= TARGET_HISTOGRAM_BYTES else "**not met**"
    lines = [*common.environment_lines(load_at_start), ""]
    if args.smoke:
        lines += ["Smoke run: a few steps of a small batch; the sizes are not representative.", ""]
    lines += common.markdown_table(
        [
            "norms", "bytes per logged step", "histograms per step", "mean histogram bytes",
            "largest histogram bytes", "scalar bytes per step", "event overhead bytes per step",
        ],
        rows,
    )
    lines += [
        "",
        f"Target: a histogram takes at most {TARGET_HISTOGRAM_BYTES} bytes per logged step; the "
        f"largest of the callback's histograms took {largest} bytes, {verdict}.",
        "",
        f"Each run logs {steps} steps. Bytes per logged step count the events that hold "
        "histograms and scalars, with their record framing, and leave out the file's header "
        "event and the dashboard's text and layout, which are written once at attach. A "
        "histogram's bytes are its serialized summary value, tag included. Event overhead is "
        f"what each event adds around its values: wall time, step, and the {RECORD_FRAMING_BYTES} "
        "bytes of record framing.",
    ]
    common.write_section(args.results, "events", "Event size", lines)


if __name__ == "__main__":
    sys.exit(main())
