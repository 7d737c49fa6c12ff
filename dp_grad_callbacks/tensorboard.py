"""Writing gradient-norm records to TensorBoard."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from tensorboard.compat.proto.summary_pb2 import Summary
from torch.utils.tensorboard import SummaryWriter
from torch.utils.tensorboard.summary import histogram_raw, scalar

from .noisy_histogram import (
    after_clipping_counts,
    clip_negative_counts,
    count_quantiles,
    fraction_at_or_above,
    summarize_counts,
)
from .record import GradNormRecord
from .stats import bucket_counts, norm_quantiles

logger = logging.getLogger(__name__)

SYNTHETIC = "synthetic"


def tag_root(prefix: str, synthetic: bool) -> str:
    """Return the tag root of a record, so that real and synthetic norms never share a tag."""
    return f"{prefix}/{SYNTHETIC}" if synthetic else prefix


def write_histogram(
    writer: SummaryWriter | StepSummary,
    tag: str,
    values: np.ndarray,
    limits: np.ndarray,
    step: int,
) -> None:
    """Write a histogram of the finite ``values`` over fixed bucket ``limits``.

    NaN and infinite values are left out, and nothing is written when no value is finite.
    Empty buckets at both ends are dropped, keeping one on each side of the data so that
    TensorBoard can draw the outer buckets' widths.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return
    counts = bucket_counts(values, limits)
    nonzero = np.flatnonzero(counts)
    first = max(int(nonzero[0]) - 1, 0)
    last = min(int(nonzero[-1]) + 2, len(counts))
    writer.add_histogram_raw(
        tag,
        min=float(values.min()),
        max=float(values.max()),
        num=int(values.size),
        sum=float(values.sum()),
        sum_squares=float(values @ values),
        bucket_limits=limits[first:last].tolist(),
        bucket_counts=counts[first:last].tolist(),
        global_step=step,
    )


def write_record(
    writer: SummaryWriter | StepSummary,
    record: GradNormRecord,
    *,
    prefix: str,
    limits: np.ndarray,
    layer_limits: Mapping[str, np.ndarray] | None = None,
) -> None:
    """Write the histograms and scalars of one record at ``global_step = record.step``.

    Tags, under ``root = prefix`` (or ``prefix/synthetic`` for synthetic norms):
    ``root/before_clipping`` and ``root/after_clipping`` histograms, and the scalars
    ``root/clipped_fraction``, ``root/median``, ``root/p90``, ``root/max`` (all of the norms
    before clipping), ``root/max_grad_norm``, ``root/samples`` and ``root/nonfinite``.

    NaN and infinite norms are counted in ``nonfinite`` and left out of the histograms and
    of the other scalars, which describe the finite norms only. A step without a finite
    norm writes only ``samples``, ``max_grad_norm`` and ``nonfinite``. A private record
    goes to :func:`write_noisy_record`.
    """
    if record.private:
        write_noisy_record(writer, record, prefix=prefix)
        return
    root = tag_root(prefix, record.synthetic)
    step = record.step
    before = record.before[np.isfinite(record.before)]

    writer.add_scalar(f"{root}/samples", record.before.size, step)
    writer.add_scalar(f"{root}/max_grad_norm", record.max_grad_norm, step)
    writer.add_scalar(f"{root}/nonfinite", record.before.size - before.size, step)
    if before.size == 0:
        return

    median, p90 = norm_quantiles(before, (0.5, 0.9))
    writer.add_scalar(f"{root}/clipped_fraction", record.clipped_fraction, step)
    writer.add_scalar(f"{root}/median", median, step)
    writer.add_scalar(f"{root}/p90", p90, step)
    writer.add_scalar(f"{root}/max", float(before.max()), step)
    write_histogram(writer, f"{root}/before_clipping", before, limits, step)
    write_histogram(writer, f"{root}/after_clipping", record.after, limits, step)

    layer_limits = layer_limits or {}
    for name, layer_before in record.layer_before.items():
        name_limits = layer_limits.get(name, limits)
        layer_root = f"{root}/layer/{name}"
        write_histogram(writer, f"{layer_root}/before_clipping", layer_before, name_limits, step)
        write_histogram(
            writer, f"{layer_root}/after_clipping", record.layer_after[name], name_limits, step
        )


def write_logged_step(
    writer: SummaryWriter,
    record: GradNormRecord,
    *,
    prefix: str,
    limits: np.ndarray,
    layer_limits: Mapping[str, np.ndarray] | None = None,
    one_event: bool,
) -> None:
    """Write one logged step's record as ``GradNormCallback`` does, without flushing.

    With ``one_event=True`` all values of the step go to the event file as one event,
    which costs the writer far less than one event per value (see :class:`StepSummary`).
    Pass ``StepSummary.supports(writer)``, because a writer that overrides its ``add_*``
    methods must receive every value through them.
    """
    if not one_event:
        write_record(writer, record, prefix=prefix, limits=limits, layer_limits=layer_limits)
        return
    summary = StepSummary(writer)
    write_record(summary, record, prefix=prefix, limits=limits, layer_limits=layer_limits)
    summary.write()


def write_noisy_record(
    writer: SummaryWriter | StepSummary, record: GradNormRecord, *, prefix: str
) -> None:
    """Write a private record: every value derives from its noisy counts alone.

    The tags are those of :func:`write_record`, plus the scalar ``root/histogram_noise``.
    Negative counts are set to zero first, and ``samples`` is the sum of the counts. The
    after-clipping histogram moves the counts at or above C into the bucket that ends at C,
    and ``clipped_fraction`` is the share of counts at or above C. ``median``, ``p90`` and
    ``max`` are estimated from the buckets (see ``noisy_histogram``). A step whose counts
    are all zero writes only ``samples``, ``max_grad_norm`` and ``histogram_noise``.
    """
    assert record.noisy_counts is not None and record.bucket_limits is not None
    root = tag_root(prefix, record.synthetic)
    step = record.step
    limits = record.bucket_limits
    before = clip_negative_counts(record.noisy_counts)
    total = float(before.sum())

    writer.add_scalar(f"{root}/samples", total, step)
    writer.add_scalar(f"{root}/max_grad_norm", record.max_grad_norm, step)
    writer.add_scalar(f"{root}/histogram_noise", record.histogram_noise, step)
    if total <= 0:
        return

    median, p90, maximum = count_quantiles(before, limits, (0.5, 0.9, 1.0))
    fraction = fraction_at_or_above(before, limits, record.max_grad_norm)
    writer.add_scalar(f"{root}/clipped_fraction", fraction, step)
    writer.add_scalar(f"{root}/median", median, step)
    writer.add_scalar(f"{root}/p90", p90, step)
    writer.add_scalar(f"{root}/max", maximum, step)
    after = after_clipping_counts(before, limits, record.max_grad_norm)
    write_counts_histogram(writer, f"{root}/before_clipping", before, limits, step)
    write_counts_histogram(writer, f"{root}/after_clipping", after, limits, step)


def write_counts_histogram(
    writer: SummaryWriter | StepSummary,
    tag: str,
    counts: np.ndarray,
    limits: np.ndarray,
    step: int,
) -> None:
    """Write a histogram given by non-negative bucket counts; nothing when all are zero.

    Min, max, sum and sum of squares are estimated from the buckets, with every value at
    its bucket's midpoint (``noisy_histogram.summarize_counts``). Empty buckets at both
    ends are dropped as in :func:`write_histogram`.
    """
    summary = summarize_counts(counts, limits)
    if summary is None:
        return
    nonzero = np.flatnonzero(counts > 0)
    first = max(int(nonzero[0]) - 1, 0)
    last = min(int(nonzero[-1]) + 2, len(counts))
    writer.add_histogram_raw(
        tag,
        min=summary.min,
        max=summary.max,
        num=summary.num,
        sum=summary.sum,
        sum_squares=summary.sum_squares,
        bucket_limits=limits[first:last].tolist(),
        bucket_counts=counts[first:last].tolist(),
        global_step=step,
    )


class StepSummary:
    """A buffer of one step's scalars and histograms, written to TensorBoard as one event.

    It takes the place of the ``SummaryWriter`` in :func:`write_record`, with the same
    ``add_scalar`` and ``add_histogram_raw`` calls, so readers see the same tags, values and
    steps. Most of the writer's cost is per event: a hand-off to its writer thread, and a
    checksum that tensorboard 2.21 computes in pure Python over each event's bytes, headers
    included. One event per logged step instead of one per value saves both.
    """

    def __init__(self, writer: SummaryWriter) -> None:
        self._writer = writer
        self._values: list[Summary.Value] = []
        self._step: int | None = None

    @staticmethod
    def supports(writer: SummaryWriter) -> bool:
        """Tell whether one step's values may go to ``writer`` as one event.

        Not when ``add_scalar`` or ``add_histogram_raw`` is overridden, by a subclass or on
        the instance, because the values would then bypass the override. Not either without
        ``_get_file_writer``, which is private to ``torch.utils.tensorboard`` but which every
        ``add_*`` method of ``SummaryWriter`` writes through (torch 2.13). In both cases the
        caller should write to ``writer`` itself.
        """
        for name in ("add_scalar", "add_histogram_raw"):
            method = getattr(writer, name, None)
            if getattr(method, "__func__", None) is not getattr(SummaryWriter, name):
                logger.debug(
                    "%s overrides %s; writing through it, one event per value",
                    type(writer).__name__,
                    name,
                )
                return False
        if not callable(getattr(writer, "_get_file_writer", None)):
            logger.debug(
                "%s has no _get_file_writer; writing one event per value", type(writer).__name__
            )
            return False
        return True

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> None:
        """Add a scalar as ``SummaryWriter.add_scalar`` writes it by default."""
        self._add(scalar(tag, scalar_value), global_step)

    def add_histogram_raw(
        self,
        tag: str,
        min: float,
        max: float,
        num: int,
        sum: float,
        sum_squares: float,
        bucket_limits: Sequence[float],
        bucket_counts: Sequence[float],
        global_step: int,
    ) -> None:
        """Add a histogram as ``SummaryWriter.add_histogram_raw`` writes it.

        Raises:
            ValueError: If the bucket limits and counts differ in length.
        """
        if len(bucket_limits) != len(bucket_counts):
            raise ValueError(
                f"bucket_limits and bucket_counts of {tag!r} must have the same length, got "
                f"{len(bucket_limits)} and {len(bucket_counts)}"
            )
        summary = histogram_raw(
            tag, min, max, num, sum, sum_squares, bucket_limits, bucket_counts
        )
        self._add(summary, global_step)

    def write(self) -> None:
        """Write the values collected so far as one event, and start again empty."""
        if not self._values:
            return
        summary = Summary(value=self._values)
        self._writer._get_file_writer().add_summary(summary, self._step)
        self._values = []
        self._step = None

    def _add(self, summary: Summary, step: int) -> None:
        if self._step is not None and step != self._step:
            self.write()
        self._step = step
        self._values.extend(summary.value)
