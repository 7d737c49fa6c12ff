"""Read gradient-norm runs back from TensorBoard event files, with TensorBoard's own reader.

A run is a directory under the log directory that directly contains event files, as
TensorBoard defines it. Its name is the path relative to the log directory, and ``.`` for
the log directory itself. Inside a run, a tag root is a prefix ``R`` with the scalars
``R/samples`` and ``R/max_grad_norm``, which every logged step writes, for example
``grad_norm`` or ``grad_norm/synthetic``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from tensorboard.backend.event_processing import io_wrapper
from tensorboard.backend.event_processing.event_accumulator import (
    HISTOGRAMS,
    SCALARS,
    EventAccumulator,
    HistogramValue,
)

from .stats import LAST_BUCKET_LIMIT
from .synthetic import Points
from .tensorboard import SYNTHETIC

# Scalars that write_record writes at every logged step, also for an empty batch.
_ROOT_MARKERS = ("samples", "max_grad_norm")
HISTOGRAM_NAMES = ("before_clipping", "after_clipping")


class RunReadError(Exception):
    """A log directory, run, tag root or step that is missing or contains no gradient norms."""


class DamagedEventFileWarning(UserWarning):
    """An event file that TensorBoard stopped reading at a damaged or incomplete record."""


@dataclass(frozen=True)
class RunSummary:
    """Key numbers of one tag root of one run.

    The per-step values are those of ``last_step``, the last logged step with samples;
    they are None when no logged step had samples.

    Attributes:
        run: Run name, relative to the log directory.
        tag_root: Tag prefix of the series, for example ``grad_norm/synthetic``.
        synthetic: Whether the norms are synthetic (dry run or fallback).
        logged_steps: Number of logged steps, empty ones included.
        last_step: Step of the values below.
        clipped_fraction: Fraction of samples whose norm exceeded C.
        median: Median norm before clipping.
        p90: 90th percentile of the norms before clipping.
        max_grad_norm: The clipping bound C.
        suggested_max_grad_norm: Median of the per-step median norms over the last
            ``suggestion_steps`` logged steps with samples. None for synthetic norms,
            because they are drawn relative to C and do not depend on the model.
        suggestion_steps: Number of steps behind the suggestion.
        histogram_noise: Standard deviation of the Gaussian noise on every bucket count of
            a private run (``privacy="private"``), whose per-step values all derive from
            the noisy counts. None for a run that logged raw norms.
    """

    run: str
    tag_root: str
    synthetic: bool
    logged_steps: int
    last_step: int | None
    clipped_fraction: float | None
    median: float | None
    p90: float | None
    max_grad_norm: float | None
    suggested_max_grad_norm: float | None
    suggestion_steps: int
    histogram_noise: float | None = None


class NormSeries:
    """The gradient-norm scalars and histograms under one tag root of one run.

    Args:
        run: Run name, relative to the log directory.
        path: Directory of the run's event files.
        tag_root: Tag prefix of the series.
        accumulator: TensorBoard's reader of the run, already loaded.
    """

    def __init__(self, run: str, path: str, tag_root: str, accumulator: EventAccumulator) -> None:
        self.run = run
        self.path = path
        self.tag_root = tag_root
        self._accumulator = accumulator

    @property
    def synthetic(self) -> bool:
        """Whether the tag root contains synthetic norms (``.../synthetic``)."""
        return self.tag_root.rsplit("/", 1)[-1] == SYNTHETIC

    @property
    def label(self) -> str:
        """The run name and tag root, as ``run:root``."""
        return f"{self.run}:{self.tag_root}"

    def scalars(self, name: str) -> dict[int, float]:
        """Return ``{step: value}`` of the scalar ``<root>/<name>``; empty if it is absent.

        When a step was written twice, the value read last is kept.
        """
        tag = f"{self.tag_root}/{name}"
        if tag not in self._accumulator.Tags()[SCALARS]:
            return {}
        return {event.step: float(event.value) for event in self._accumulator.Scalars(tag)}

    def histograms(self, name: str) -> dict[int, HistogramValue]:
        """Return ``{step: histogram}`` of ``<root>/<name>``; empty if it is absent."""
        tag = f"{self.tag_root}/{name}"
        if tag not in self._accumulator.Tags()[HISTOGRAMS]:
            return {}
        return {event.step: event.histogram_value for event in self._accumulator.Histograms(tag)}

    @cached_property
    def logged_steps(self) -> list[int]:
        """Every logged step in ascending order, empty steps included."""
        return sorted(self.scalars("samples"))

    @cached_property
    def steps_with_samples(self) -> list[int]:
        """Logged steps with at least one sample, in ascending order."""
        return sorted(step for step, count in self.scalars("samples").items() if count > 0)

    @cached_property
    def steps_with_histograms(self) -> list[int]:
        """Logged steps with histograms, in ascending order.

        A step has histograms when at least one of its norms is finite.
        """
        return sorted(self.histograms(HISTOGRAM_NAMES[0]))

    def check_step(self, step: int) -> None:
        """Raise :class:`RunReadError` unless ``step`` is a logged step of this series."""
        if step not in set(self.logged_steps):
            raise RunReadError(
                f"step {step} not found in {self.label}. Logged steps: "
                f"{describe_steps(self.logged_steps)}"
            )

    def summarize(self, *, recent_steps: int = 10) -> RunSummary:
        """Summarize the series: its last step's numbers and a suggested C.

        Args:
            recent_steps: Number of last logged steps with samples whose median norms
                give the suggested C.
        """
        with_samples = self.steps_with_samples
        last = with_samples[-1] if with_samples else None

        def at_last(name: str) -> float | None:
            value = self.scalars(name).get(last) if last is not None else None
            return None if value is None or math.isnan(value) else value

        recent = with_samples[-recent_steps:]
        medians = self.scalars("median")
        recent_medians = [medians[step] for step in recent if step in medians]
        suggestion = None
        if recent_medians and not self.synthetic:
            suggestion = float(np.median(recent_medians))

        return RunSummary(
            run=self.run,
            tag_root=self.tag_root,
            synthetic=self.synthetic,
            logged_steps=len(self.logged_steps),
            last_step=last,
            clipped_fraction=at_last("clipped_fraction"),
            median=at_last("median"),
            p90=at_last("p90"),
            max_grad_norm=at_last("max_grad_norm"),
            suggested_max_grad_norm=suggestion,
            suggestion_steps=len(recent_medians) if suggestion is not None else 0,
            histogram_noise=at_last("histogram_noise"),
        )

    def gradient_info(self, step: int) -> dict[str, Points]:
        """Return the point lists of :func:`~dp_grad_callbacks.synthetic.generate_gradient_info`
        for one logged step, derived from its histogram buckets.

        A logged step without samples has no histograms and gives empty lists.

        Raises:
            RunReadError: If ``step`` is not a logged step.
        """
        self.check_step(step)
        info: dict[str, Points] = {}
        for name in HISTOGRAM_NAMES:
            histogram = self.histograms(name).get(step)
            info[name] = [] if histogram is None else histogram_points(histogram)
        return info


def find_runs(logdir: str | os.PathLike[str]) -> dict[str, str]:
    """Return ``{run name: path}`` of every directory under ``logdir`` with event files.

    Raises:
        FileNotFoundError: If ``logdir`` does not exist.
        NotADirectoryError: If ``logdir`` is not a directory.
        RunReadError: If no directory under ``logdir`` contains event files.
    """
    logdir = os.fspath(logdir)
    if not os.path.exists(logdir):
        raise FileNotFoundError(f"log directory not found: {logdir}")
    if not os.path.isdir(logdir):
        raise NotADirectoryError(f"log directory is not a directory: {logdir}")

    runs = {
        os.path.relpath(path, logdir): path for path in io_wrapper.GetLogdirSubdirectories(logdir)
    }
    if not runs:
        raise RunReadError(f"no TensorBoard event files found under {logdir}")
    return dict(sorted(runs.items()))


def load_norm_series(
    logdir: str | os.PathLike[str], *, run: str | None = None
) -> list[NormSeries]:
    """Read the gradient-norm series of every run under ``logdir``, or of one run.

    Args:
        logdir: The log directory.
        run: Name of the one run to read, or None for all runs.

    Returns:
        One :class:`NormSeries` per tag root and run, sorted by run, then tag root.

    Raises:
        FileNotFoundError, NotADirectoryError: If ``logdir`` is missing or not a directory.
        RunReadError: If there are no event files, ``run`` is not a run, or no run contains
            gradient-norm tags.
    """
    runs = find_runs(logdir)
    if run is not None:
        normalized = os.path.normpath(run)
        if normalized not in runs:
            raise RunReadError(
                f"run {run!r} not found under {os.fspath(logdir)}. Runs: {', '.join(runs)}"
            )
        runs = {normalized: runs[normalized]}

    series = []
    for name, path in runs.items():
        accumulator = EventAccumulator(path, size_guidance={HISTOGRAMS: 0, SCALARS: 0})
        with _warning_on_data_loss(name):
            accumulator.Reload()
        series.extend(
            NormSeries(name, path, root, accumulator) for root in _tag_roots(accumulator)
        )

    if not series:
        raise RunReadError(
            f"no gradient-norm tags (<prefix>/samples and <prefix>/max_grad_norm) found in "
            f"{'run ' + repr(run) if run is not None else 'any run'} under "
            f"{os.fspath(logdir)}. Runs: {', '.join(runs)}"
        )
    return series


def select_series(
    series: Sequence[NormSeries], *, run: str | None = None, tag_root: str | None = None
) -> NormSeries:
    """Pick the one series that matches ``run`` and ``tag_root`` (None matches any).

    Raises:
        RunReadError: If none or several match; the message lists the choices.
    """
    matches = [
        item
        for item in series
        if (run is None or item.run == os.path.normpath(run))
        and (tag_root is None or item.tag_root == tag_root.strip("/"))
    ]
    if len(matches) == 1:
        return matches[0]

    choices = ", ".join(item.label for item in series)
    if not matches:
        raise RunReadError(f"no gradient-norm series matches. Series (run:tag root): {choices}")
    raise RunReadError(
        f"{len(matches)} gradient-norm series match. Choose one with --run and --tag-root "
        f"from (run:tag root): {', '.join(item.label for item in matches)}"
    )


def bucket_edges(histogram: HistogramValue) -> tuple[np.ndarray, np.ndarray]:
    """Return finite lower and upper edges of every bucket of a TensorBoard histogram.

    TensorBoard stores only upper limits. The first bucket is open below, and the last one
    is open above when its limit is the largest float, as this package and TensorFlow write
    it. An open edge is extended to the data's ``min`` or ``max`` and at least to the width
    of the neighbouring bucket: the same ratio for positive limits, as for log-spaced
    buckets, else the same difference.

    NOTE: with fewer than three buckets an open edge is the data's ``min`` or ``max`` only,
    so a bucket holding a single distinct value can have zero width.
    """
    upper = np.asarray(histogram.bucket_limit, dtype=np.float64).copy()
    lower = np.empty_like(upper)
    if upper.size == 0:
        return lower, upper
    lower[1:] = upper[:-1]

    lower[0] = histogram.min
    if upper.size >= 2:
        lower[0] = min(histogram.min, _edge_beyond(upper[0], upper[1]))

    if not math.isfinite(upper[-1]) or upper[-1] >= LAST_BUCKET_LIMIT:
        upper[-1] = histogram.max
        if upper.size >= 3:
            upper[-1] = max(histogram.max, _edge_beyond(lower[-1], lower[-2]))
    return lower, upper


def histogram_points(histogram: HistogramValue) -> Points:
    """Convert a histogram to ``{"x": norm, "y": density}`` points sorted by ``x``.

    Each bucket between the first and the last non-empty one gives a point: ``x`` is the
    bucket's midpoint and ``y`` the density there, ``count / (total * width)``, as
    ``numpy.histogram(..., density=True)`` computes it, so the points integrate to 1. This
    is the format of :func:`~dp_grad_callbacks.synthetic.gradient_info_from_norms`.
    """
    counts = np.asarray(histogram.bucket, dtype=np.float64)
    total = counts.sum()
    nonzero = np.flatnonzero(counts)
    if total <= 0 or nonzero.size == 0:
        return []
    lower, upper = bucket_edges(histogram)
    keep = slice(int(nonzero[0]), int(nonzero[-1]) + 1)
    lower, upper, counts = lower[keep], upper[keep], counts[keep]

    # Only a degenerate histogram (see bucket_edges) has zero-width buckets; they have no
    # finite density and are left out.
    positive = upper > lower
    lower, upper, counts = lower[positive], upper[positive], counts[positive]
    density = counts / (total * (upper - lower))
    centres = (lower + upper) / 2
    return [{"x": float(x), "y": float(y)} for x, y in zip(centres, density)]


def describe_steps(steps: Sequence[int]) -> str:
    """Return a short listing of steps, such as ``0, 10, 20, ..., 990 (100 steps)``."""
    if not steps:
        return "none"
    if len(steps) <= 6:
        return ", ".join(str(step) for step in steps)
    head = ", ".join(str(step) for step in steps[:3])
    return f"{head}, ..., {steps[-1]} ({len(steps)} steps)"


@contextlib.contextmanager
def _warning_on_data_loss(run: str) -> Iterator[None]:
    """Warn about each event file that TensorBoard's reader stops reading early.

    On a record that fails its CRC check or ends early, TensorBoard's loader drops the
    rest of the file and reports it only in a debug log line. A filter on its logger picks
    that line up and passes on only what the logger's level would have let through.
    """
    logger = logging.getLogger("tensorboard")
    level = logger.getEffectiveLevel()
    lost: list[tuple[str, str]] = []

    def keep(record: logging.LogRecord) -> bool:
        # event_file_loader logs "Truncated record in %s (%s)" with the path and the error.
        args = record.args if isinstance(record.args, tuple) else ()
        if str(record.msg).startswith("Truncated record in") and len(args) == 2:
            lost.append((str(args[0]), str(args[1])))
        return record.levelno >= level

    old_level = logger.level
    logger.addFilter(keep)
    logger.setLevel(logging.DEBUG)
    try:
        yield
    finally:
        logger.setLevel(old_level)
        logger.removeFilter(keep)

    # TensorBoard reads a file again when a later file of the run follows it.
    for path, error in dict.fromkeys(lost):
        if "crc" in error.lower():
            reason = "a record that fails its CRC check (the file is damaged)"
        else:
            reason = "an incomplete record (a file that is still being written ends this way)"
        warnings.warn(
            f"run {run!r}: TensorBoard stopped reading {path} at {reason}. "
            f"Events after that record are missing.",
            DamagedEventFileWarning,
            stacklevel=3,
        )


def _tag_roots(accumulator: EventAccumulator) -> list[str]:
    scalar_tags = set(accumulator.Tags()[SCALARS])
    marker = f"/{_ROOT_MARKERS[0]}"
    roots = {tag[: -len(marker)] for tag in scalar_tags if tag.endswith(marker)}
    return sorted(
        root for root in roots if all(f"{root}/{name}" in scalar_tags for name in _ROOT_MARKERS)
    )


def _edge_beyond(edge: float, neighbour: float) -> float:
    """Return the edge one bucket beyond ``edge``, away from ``neighbour``, at equal width."""
    if edge > 0 and neighbour > 0:
        return edge * edge / neighbour
    return edge + (edge - neighbour)
