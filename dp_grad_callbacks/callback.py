"""The callback that attaches to an Opacus ``DPOptimizer`` and logs per-sample gradient norms."""

from __future__ import annotations

import logging
import numbers
import os
import warnings
import weakref
from types import TracebackType
from typing import Any, Callable, Literal

import numpy as np
import torch.distributed as dist
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch.utils.tensorboard import SummaryWriter

from .assemble import StepNorms, build_record, collect_step
from .capture import BatchNorms, Capture, NormReader, select_reader
from .dashboard import DEFAULT_EPSILON_EVERY, Dashboard, check_privacy_options
from .distributed import all_gather_rows, process_rank
from .event_files import close_writer, open_writer, reopen_writer
from .layers import parameter_names
from .noisy_histogram import SeededGaussianNoise
from .privacy import (
    RAW_NORMS_WARNING,
    Privacy,
    PrivateRelease,
    RawNormsWarning,
    check_privacy_mode,
)
from .ratelimit import RateLimiter
from .record import GradNormRecord
from .stats import bucket_limits, clipped_norms
from .synthetic import sample_gradient_norms
from .tensorboard import StepSummary, tag_root, write_logged_step

logger = logging.getLogger(__name__)

Fallback = Literal["synthetic", "raise"]
_FALLBACKS = ("synthetic", "raise")

# The optimizers that a callback is attached to, so that a second callback is rejected.
_ATTACHED: weakref.WeakKeyDictionary[DPOptimizer, GradNormCallback] = weakref.WeakKeyDictionary()

# The optimizer methods the callback replaces with instance attributes while attached.
_PATCHED = ("pre_step", "clip_and_accumulate")

# Minimum number of seconds between two log messages about the same repeated problem
# (non-finite norms, failed writes). Each message includes the number of repeats that
# were not logged.
LOG_INTERVAL_SECONDS = 60.0


class MissingPerSampleGradientsError(RuntimeError):
    """Raised with ``fallback="raise"`` when a logged step has no per-sample gradient norms."""


def check_options(
    *,
    log_every: Any,
    tag_prefix: Any,
    dry_run: Any,
    fallback: Any,
    seed: Any,
    per_layer: Any,
    privacy_engine: Any,
    delta: Any,
    epsilon_every: Any,
    privacy: Any = "raw",
    histogram_noise: Any = None,
) -> None:
    """Raise ``ValueError`` or ``TypeError`` naming the first invalid option of the callback."""
    if not _is_integer(log_every) or log_every < 1:
        raise ValueError(f"log_every must be a positive integer, got {log_every!r}")
    if not isinstance(tag_prefix, str) or not tag_prefix.strip("/"):
        raise ValueError(f"tag_prefix must be a non-empty string, got {tag_prefix!r}")
    if not isinstance(dry_run, bool):
        raise ValueError(f"dry_run must be True or False, got {dry_run!r}")
    if fallback not in _FALLBACKS:
        raise ValueError(f"fallback must be one of {_FALLBACKS}, got {fallback!r}")
    if seed is not None and (not _is_integer(seed) or seed < 0):
        raise ValueError(f"seed must be a non-negative integer or None, got {seed!r}")
    if not isinstance(per_layer, bool):
        raise ValueError(f"per_layer must be True or False, got {per_layer!r}")
    check_privacy_options(privacy_engine, delta, epsilon_every)
    check_privacy_mode(privacy, histogram_noise)
    if per_layer and privacy == "private":
        raise ValueError(
            "per_layer must be False with privacy='private', got True: the per-layer "
            "histograms are raw per-sample norms"
        )


def _is_integer(value: Any) -> bool:
    """Return whether ``value`` is an integer, such as ``numpy.int64``, and not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class GradNormCallback:
    """Log the per-sample gradient norms that Opacus clips to TensorBoard.

    At every logged step the callback writes histograms of the norms before and after
    clipping, and scalars of the clipped fraction, norm quantiles, the bound C and the sample
    count. It observes only: training with and without it is bitwise identical.

    The writer is flushed after every logged step, so a run that is killed or raises keeps
    every step logged before. Non-finite norms and failed writes never raise into the
    training loop. Non-finite norms are counted under ``<prefix>/nonfinite``. A write that
    raises is logged, counted in :attr:`write_failures` and not retried, and the next
    logged step writes again. A writer that the callback created is then replaced by a new
    one, at most once a minute, because a ``SummaryWriter`` whose background thread failed
    keeps failing. Only ``fallback="raise"`` makes a step raise.

    With ``privacy="private"`` it releases only a noisy histogram per logged step and
    charges that step to the privacy accountant (see :mod:`dp_grad_callbacks.privacy`), so
    ``privacy_engine.get_epsilon(delta)`` covers the diagnostics.

    Args:
        writer: A ``SummaryWriter`` to write to, or a log directory, in which case the
            callback creates its own writer and closes it on :meth:`close`.
        log_every: Number of logical steps between logged steps; step 0 is always logged.
        tag_prefix: Prefix of every TensorBoard tag.
        dry_run: If True, never read per-sample gradients and log synthetic norms (for the
            optimizer's C and the step's sample count) under ``<prefix>/synthetic/...``.
        fallback: What to do at a logged step without per-sample gradients: ``"synthetic"``
            logs synthetic norms under ``<prefix>/synthetic/...`` and warns once,
            ``"raise"`` raises :class:`MissingPerSampleGradientsError`.
        seed: Seed of the synthetic norms and of the histogram noise. The callback never
            uses global random state. Anyone with the seed can recompute the histogram
            noise, so publish private histograms only from runs with ``seed=None``. With
            Opacus's ``secure_mode`` the seed must be None.
        per_layer: If True, also log each parameter's per-sample norms before and after
            clipping as ``<prefix>/layer/<name>/...`` histograms, where ``<name>`` comes from
            the model's ``named_parameters()``. :meth:`attach` then needs the module.
        privacy_engine: The ``PrivacyEngine`` that made the optimizer private. Given with
            ``delta``, the callback writes ``privacy/epsilon`` from its ``get_epsilon``.
            With ``privacy="private"``, its accountant is the one charged, which
            :meth:`attach` otherwise finds in the optimizer's step hook.
        delta: The delta of the logged epsilon, between 0 and 1.
        epsilon_every: Number of logged steps between ``privacy/epsilon`` scalars. The first
            logged step and the last step before :meth:`detach` always get one. Computing
            epsilon takes milliseconds (``rdp``) to a fraction of a second (``prv``).
        privacy: ``"raw"`` logs the exact norms, which the DP guarantee does not cover, and
            warns once at attach. ``"private"`` logs only noisy bucket counts and what
            derives from them.
        histogram_noise: Standard deviation of the Gaussian noise on each bucket count,
            required with ``privacy="private"``. Larger values cost less privacy and give
            noisier histograms; :func:`~dp_grad_callbacks.privacy.preview_epsilon` shows
            the cost before training.

    Attributes:
        last_record: The record of the last logged step, or ``None`` before the first.
        write_failures: Number of logged steps whose record could not be built, written
            or flushed.

    Raises:
        TypeError: If ``writer`` is neither a ``SummaryWriter`` nor a path, or
            ``privacy_engine`` is not a ``PrivacyEngine``.
        ValueError: If an option is out of range, only one of ``privacy_engine`` and
            ``delta`` is given, or ``writer`` is an empty path.
        OSError: If the log directory cannot be created.

    Note:
        In an initialized ``torch.distributed`` process group only rank 0 writes. On other
        ranks a log directory creates no writer and no files, and a given writer is never
        written to. Under ``DPDDP`` every rank's record contains the whole global batch, which
        the ranks exchange at each logged step, so attach the callback on every rank with
        the same options.

    Example:
        >>> import tempfile, torch
        >>> from opacus.optimizers import DPOptimizer
        >>> model = torch.nn.Linear(2, 1)
        >>> optimizer = DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
        ...     noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=4)
        >>> with GradNormCallback(tempfile.mkdtemp(), log_every=10) as callback:
        ...     _ = callback.attach(optimizer)
    """

    def __init__(
        self,
        writer: SummaryWriter | str | os.PathLike[str],
        *,
        log_every: int = 1,
        tag_prefix: str = "grad_norm",
        dry_run: bool = False,
        fallback: Fallback = "synthetic",
        seed: int | None = None,
        per_layer: bool = False,
        privacy_engine: PrivacyEngine | None = None,
        delta: float | None = None,
        epsilon_every: int = DEFAULT_EPSILON_EVERY,
        privacy: Privacy = "raw",
        histogram_noise: float | None = None,
    ) -> None:
        check_options(
            log_every=log_every,
            tag_prefix=tag_prefix,
            dry_run=dry_run,
            fallback=fallback,
            seed=seed,
            per_layer=per_layer,
            privacy_engine=privacy_engine,
            delta=delta,
            epsilon_every=epsilon_every,
            privacy=privacy,
            histogram_noise=histogram_noise,
        )
        # Convert numpy integers, so that the step arithmetic and the records use Python ints.
        log_every = int(log_every)
        seed = None if seed is None else int(seed)
        epsilon_every = int(epsilon_every)
        dashboard = Dashboard(
            prefix=tag_prefix.strip("/"),
            synthetic=dry_run,
            privacy_engine=privacy_engine,
            delta=delta,
            epsilon_every=epsilon_every,
            histogram_noise=histogram_noise if privacy == "private" else None,
        )
        if not isinstance(writer, (SummaryWriter, str, os.PathLike)):
            raise TypeError(
                "writer must be a torch.utils.tensorboard.SummaryWriter or a log directory "
                f"path, got {type(writer).__name__}"
            )
        # SummaryWriter("") would write to its default ./runs/<date>_<host> directory.
        if not isinstance(writer, SummaryWriter) and not os.fspath(writer):
            raise ValueError(
                "writer must be a SummaryWriter or a non-empty log directory path, got ''; "
                "pass a directory such as 'runs/digits'"
            )

        # Only rank 0 of a process group writes, so the other ranks create no event files.
        self._writer: SummaryWriter | None = None
        self._owns_writer = False
        if process_rank() == 0:
            if isinstance(writer, SummaryWriter):
                self._writer = writer
            else:
                self._writer = open_writer(os.fspath(writer))
                self._owns_writer = True
        self._one_event_per_step = self._writer is not None and StepSummary.supports(self._writer)

        self.log_every = log_every
        self.tag_prefix = tag_prefix.strip("/")
        self.dry_run = dry_run
        self.fallback = fallback
        self.per_layer = per_layer
        self.privacy = privacy
        self.histogram_noise = None if histogram_noise is None else float(histogram_noise)
        self.last_record: GradNormRecord | None = None
        self.write_failures = 0
        self.withheld_releases = 0
        self.dashboard = dashboard

        # Closes a writer the callback created on close(), or when the callback is garbage
        # collected or the interpreter exits without close(). It must not refer to self.
        self._writer_finalizer = (
            weakref.finalize(self, close_writer, self._writer) if self._owns_writer else None
        )
        self._nonfinite_log = RateLimiter(LOG_INTERVAL_SECONDS)
        self._failure_log = RateLimiter(LOG_INTERVAL_SECONDS)
        # Bounds the new event files that a lasting failure, such as a full disk, creates.
        self._reopen_limit = RateLimiter(LOG_INTERVAL_SECONDS)

        self._seed = seed
        self._privacy_engine = privacy_engine
        self._rng = np.random.default_rng(seed)
        self._private: PrivateRelease | None = None
        # One noise stream per callback: two releases with the same noise would reveal the
        # difference of their true counts, so a second attach must not restart the stream.
        self._histogram_noise_source = SeededGaussianNoise(seed)
        self._warned_raw = False
        self._optimizer: DPOptimizer | None = None
        self._reader: NormReader | None = None
        self._names: dict[int, str] | None = None
        self._saved: dict[str, Any] = {}
        self._limits: np.ndarray | None = None
        self._layer_limits: dict[str, np.ndarray] = {}
        self._step = 0
        self._closed = False
        self._warned_fallback = False
        self._reset_step_state()

    # ------------------------------------------------------------------ lifecycle

    def attach(self, optimizer: DPOptimizer, module: object | None = None) -> GradNormCallback:
        """Start observing ``optimizer``, the ``DPOptimizer`` that ``make_private`` returned.

        The optimizer's ``pre_step`` and ``clip_and_accumulate`` are wrapped by instance
        attributes, which :meth:`detach` removes again. With ``privacy="raw"`` the step hook
        (the privacy accountant) is left alone. With ``privacy="private"`` the step hook is
        wrapped as well, so that each logged step is charged with the combined noise
        multiplier of gradient and histogram. The run's Custom Scalars layout and a table
        of the DP settings (Text tab) are written here.

        Args:
            optimizer: The optimizer that ``make_private`` returned.
            module: The module that ``make_private`` returned (with ``wrap_model=False``,
                the hooks object). Ghost clipping needs it because the norms are kept
                there, and ``per_layer=True`` needs it for the parameter names.

        Returns:
            The callback itself, so that ``callback = GradNormCallback(...).attach(opt)``.

        Raises:
            TypeError: If ``optimizer`` is not an Opacus ``DPOptimizer``, or ``module`` is
                needed and missing or of the wrong type. With ``privacy="private"``, also if
                the optimizer does not clip with one flat bound on one process (per-layer,
                adaptive, ghost or distributed clipping).
            UnsupportedModeError: If the optimizer trains in a mode whose norms the
                callback cannot read. The message names the mode.
            ValueError: If ``module`` does not contain the optimizer's parameters. With
                ``privacy="private"``, if the privacy accountant is not found or cannot
                record the charge, or a seed is given in secure mode.
            RuntimeError: If this callback is attached or closed, or another callback is
                attached to ``optimizer``.
        """
        self._check_open()
        if not isinstance(optimizer, DPOptimizer):
            raise TypeError(
                "attach() expects the opacus.optimizers.DPOptimizer returned by "
                f"PrivacyEngine.make_private, got {type(optimizer).__module__}."
                f"{type(optimizer).__qualname__}"
            )
        if self._optimizer is not None:
            raise RuntimeError("this GradNormCallback is already attached; call detach() first")
        if optimizer in _ATTACHED:
            raise RuntimeError(
                "another GradNormCallback is attached to this optimizer; detach it first "
                "or log both views from one callback"
            )

        private = self._prepare_privacy(optimizer)
        patched = _PATCHED if private is None else (*_PATCHED, "step_hook")
        reader = select_reader(optimizer, module, fast_clip=not self.dry_run)
        names = None
        if self.per_layer and not self.dry_run:
            if module is None:
                raise TypeError(
                    "module is missing: per_layer=True names each parameter after the model, "
                    "so call attach(optimizer, module) with the module that make_private "
                    "returned"
                )
            names = parameter_names(module, optimizer)

        self._limits = bucket_limits(reader.max_grad_norm(optimizer))
        self._layer_limits = {}
        original_pre_step = optimizer.pre_step
        original_clip = optimizer.clip_and_accumulate
        self._saved = {name: optimizer.__dict__.get(name, _MISSING) for name in patched}

        def pre_step(*args: Any, **kwargs: Any) -> Any:
            return self._on_pre_step(optimizer, original_pre_step, *args, **kwargs)

        def clip_and_accumulate() -> Any:
            return self._on_clip_and_accumulate(optimizer, original_clip)

        optimizer.pre_step = pre_step  # type: ignore[method-assign]
        optimizer.clip_and_accumulate = clip_and_accumulate  # type: ignore[method-assign]
        self._optimizer = optimizer
        self._reader = reader
        self._names = names
        _ATTACHED[optimizer] = self
        self.dashboard.write_header(self._writer, optimizer, self._step)
        # The step hook is wrapped after the header, which reads the sample rate and the
        # accountant from the closure of Opacus's own hook.
        if private is not None:
            original_hook = optimizer.step_hook

            def step_hook(hooked: DPOptimizer) -> None:
                # _capturing is True exactly while pre_step runs for a logged step.
                private.run_step_hook(original_hook, hooked, charge=self._capturing)

            optimizer.step_hook = step_hook
        elif not self._warned_raw and process_rank() == 0:
            # Every rank attaches under DPDDP; one warning per run is enough.
            warnings.warn(RAW_NORMS_WARNING, RawNormsWarning, stacklevel=2)
            self._warned_raw = True
        self._private = private
        return self

    def detach(self) -> None:
        """Stop observing and restore the optimizer exactly as it was; a no-op if detached.

        With ``privacy_engine`` and ``delta`` given, epsilon after the last step is written first.
        """
        optimizer = self._optimizer
        if optimizer is None:
            return
        self.dashboard.write_final_epsilon(self._writer, self._step - 1)
        for name, value in self._saved.items():
            if value is _MISSING:
                optimizer.__dict__.pop(name, None)
            else:
                optimizer.__dict__[name] = value
        _ATTACHED.pop(optimizer, None)
        self._optimizer = None
        self._reader = None
        self._names = None
        self._private = None
        self._saved = {}
        self._reset_step_state()

    def flush(self) -> None:
        """Write everything logged so far to disk.

        Raises:
            RuntimeError: If the callback is closed.
        """
        self._check_open()
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Detach, flush, and close the writer if the callback created it. Idempotent.

        A writer that fails to flush or close is logged and not raised, so that an error
        from the training loop that ends a ``with`` block is not replaced by this one.
        """
        if self._closed:
            return
        self.detach()
        self._closed = True
        if self._writer_finalizer is not None:
            self._writer_finalizer()
        elif self._writer is not None:
            try:
                self._writer.flush()
            except Exception:  # noqa: BLE001 - see the docstring
                logger.exception("failed to flush the TensorBoard writer on close")

    def __enter__(self) -> GradNormCallback:
        self._check_open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def attached(self) -> bool:
        """Whether the callback is attached to an optimizer."""
        return self._optimizer is not None

    @property
    def step(self) -> int:
        """Index of the next logical step: the number of steps observed, unless set.

        A trainer with its own step counter sets this before each optimizer step, so that
        records, ``log_every`` and TensorBoard steps follow that counter.
        """
        return self._step

    @step.setter
    def step(self, value: int) -> None:
        if not _is_integer(value) or value < 0:
            raise ValueError(f"step must be a non-negative integer, got {value!r}")
        self._step = int(value)

    # ------------------------------------------------------------------ optimizer events

    def _on_pre_step(
        self, optimizer: DPOptimizer, original: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        """Run Opacus's ``pre_step``, then close a logical step if Opacus did not skip it."""
        assert self._reader is not None
        logged = self._step % self.log_every == 0
        self._capturing = logged
        self._add_batch("pre_step", self._reader.on_pre_step(optimizer, self._capture()))
        try:
            stepped = original(*args, **kwargs)
        except BaseException:
            self._reset_step_state()
            raise
        finally:
            self._capturing = False

        if stepped:
            try:
                if logged:
                    self._finish_step(optimizer)
            finally:
                self._reset_step_state()
                self._step += 1
        return stepped

    def _on_clip_and_accumulate(self, optimizer: DPOptimizer, original: Callable[[], Any]) -> Any:
        """Clip one physical batch as Opacus does, keeping its norms when the step is logged.

        Runs before noise is added, so the norms are the ones Opacus clips with. C is read
        here because adaptive clipping changes it later in the same ``pre_step``.
        """
        assert self._reader is not None
        result, batch = self._reader.on_clip_and_accumulate(optimizer, original, self._capture())
        self._add_batch("clip_and_accumulate", batch)
        return result

    def _capture(self) -> Capture | None:
        if not self._capturing:
            return None
        if self.dry_run:
            return "count"
        return "param_norms" if self.per_layer else "norms"

    def _add_batch(self, hook: str, batch: BatchNorms | None) -> None:
        assert self._reader is not None
        if not self._capturing or hook != self._reader.reads_at:
            return
        if batch is None:
            # One unreadable physical batch makes the whole step fall back, so that a record
            # never silently lacks some of the step's samples.
            self._batch_missing = True
        else:
            self._pending.append(batch)

    # ------------------------------------------------------------------ records

    def _finish_step(self, optimizer: DPOptimizer) -> None:
        """Build and write the record of a logged step. Only ``fallback="raise"`` raises."""
        try:
            record = self._build_record(optimizer)
        except MissingPerSampleGradientsError:
            raise
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            # NOTE: under DPDDP, a rank that fails before the all-gather of the norms
            # leaves the other ranks waiting in it.
            self._log_failure("compute the gradient-norm record", error)
            return
        if record is None:
            return

        self.last_record = record
        self._write(record)
        self.dashboard.count_logged_step(self._writer, record.step)

    def _build_record(self, optimizer: DPOptimizer) -> GradNormRecord | None:
        """Return the record of a logged step, or None if its private release is withheld."""
        assert self._reader is not None
        if self._pending:
            max_grad_norm = self._pending[-1].max_grad_norm
        else:
            max_grad_norm = self._reader.max_grad_norm(optimizer)

        if self.dry_run:
            count = self._gather_count(sum(batch.count for batch in self._pending))
            record = self._synthetic_record(max_grad_norm, count)
        else:
            batches = [] if self._batch_missing else self._pending
            norms = self._gather_norms(collect_step(batches, self._names))
            if norms is None:
                record = self._fallback_record(optimizer, max_grad_norm)
            else:
                record = build_record(self._step, norms)

        if self._private is not None:
            released = self._private.release(record)
            if released is None:
                self._withhold(record.step)
            return released
        return record

    def _gather_norms(self, norms: StepNorms | None) -> StepNorms | None:
        """Return the global batch's norms under ``DPDDP``; the local ones otherwise."""
        assert self._reader is not None
        if not self._reader.distributed:
            return norms
        # A rank without norms still takes part, so that no rank waits in the collective.
        if norms is None:
            all_gather_rows(None, 0)
            return None
        rows = all_gather_rows(norms.to_rows(), norms.width)
        return None if rows is None else norms.with_rows(rows)

    def _gather_count(self, count: int) -> int:
        assert self._reader is not None
        if not self._reader.distributed:
            return count
        rows = all_gather_rows(np.zeros((count, 0)), 0)
        assert rows is not None
        return len(rows)

    def _fallback_record(self, optimizer: DPOptimizer, max_grad_norm: float) -> GradNormRecord:
        assert self._reader is not None
        reason = self._reader.missing_reason
        message = f"no per-sample gradient norms at step {self._step}: {reason}"
        if self.fallback == "raise":
            raise MissingPerSampleGradientsError(message)
        if not self._warned_fallback:
            # Level 7 is the caller of optimizer.step(): above this method are
            # _build_record, _finish_step, _on_pre_step, the pre_step wrapper and
            # DPOptimizer.step.
            warnings.warn(
                f"{message}; logging synthetic norms under '{self.tag_prefix}/synthetic/'",
                RuntimeWarning,
                stacklevel=7,
            )
            self._warned_fallback = True
        # Opacus's expected_batch_size is per rank under DPDDP.
        world_size = dist.get_world_size() if self._reader.distributed else 1
        batch_size = round((optimizer.expected_batch_size or 0) * world_size)
        return self._synthetic_record(max_grad_norm, batch_size)

    def _synthetic_record(self, max_grad_norm: float, num_samples: int) -> GradNormRecord:
        before = sample_gradient_norms(max_grad_norm, num_samples, seed=self._rng)
        after = clipped_norms(before, max_grad_norm)
        return GradNormRecord(self._step, before, after, max_grad_norm, synthetic=True)

    def _withhold(self, step: int) -> None:
        self.withheld_releases += 1
        logger.error(
            "did not release the gradient norms of step %d because the privacy accountant "
            "did not record the step's charge (withheld %d so far). Either the step had no "
            "trainable parameters, so Opacus charged nothing, or optimizer.step_hook was "
            "replaced after attach().",
            step,
            self.withheld_releases,
        )

    def _write(self, record: GradNormRecord) -> None:
        """Write and flush one record, logging non-finite norms and failures instead of raising."""
        if self._writer is None:
            return
        assert self._limits is not None
        if record.num_nonfinite:
            self._warn_nonfinite(record)

        try:
            for name, bound in record.layer_max_grad_norms.items():
                # Per-layer clipping piles each parameter up at its own bound, so its buckets
                # are laid around that bound, once for the run.
                if name not in self._layer_limits:
                    self._layer_limits[name] = bucket_limits(bound)
            write_logged_step(
                self._writer,
                record,
                prefix=self.tag_prefix,
                limits=self._limits,
                layer_limits=self._layer_limits,
                one_event=self._one_event_per_step,
            )
            # Flushing every logged step bounds what a kill can lose to the step in
            # progress. Otherwise events wait in the writer's queue for its background
            # thread, which flushes the file only every flush_secs (120 s by default).
            self._writer.flush()
        except Exception as error:  # noqa: BLE001 - logging must never stop training
            self._log_failure("write the gradient-norm record to TensorBoard", error)
            if self._owns_writer and self._reopen_limit.allow() is not None:
                self._reopen_writer()

    def _reopen_writer(self) -> None:
        """Replace the writer the callback created after a failed write.

        The writer may have failed for good, see :func:`reopen_writer`. Keeps the old
        writer if no new one can be opened.
        """
        assert self._writer is not None and self._writer_finalizer is not None
        writer = reopen_writer(self._writer)
        if writer is None:
            return
        self._writer_finalizer.detach()
        close_writer(self._writer)
        self._writer = writer
        self._writer_finalizer = weakref.finalize(self, close_writer, writer)

    def _warn_nonfinite(self, record: GradNormRecord) -> None:
        suppressed = self._nonfinite_log.allow()
        if suppressed is None:
            return
        logger.warning(
            "step %d: %d of %d per-sample gradient norms are NaN or infinite, which usually "
            "means a diverging loss or non-finite inputs. They are counted in '%s/nonfinite' "
            "and left out of the histograms and quantiles.%s",
            record.step,
            record.num_nonfinite,
            record.num_samples,
            tag_root(self.tag_prefix, record.synthetic),
            f" {suppressed} more steps had non-finite norms since the last warning."
            if suppressed
            else "",
        )

    def _log_failure(self, action: str, error: Exception) -> None:
        self.write_failures += 1
        suppressed = self._failure_log.allow()
        if suppressed is None:
            return
        logger.error(
            "failed to %s at step %d: %s. Training continues and the next logged step "
            "writes again (%d failures so far, %d of them not logged).",
            action,
            self._step,
            error,
            self.write_failures,
            suppressed,
            exc_info=error,
        )

    # ------------------------------------------------------------------ helpers

    def _prepare_privacy(self, optimizer: DPOptimizer) -> PrivateRelease | None:
        """Return the private release for ``optimizer``, or None with ``privacy="raw"``."""
        if self.privacy == "raw":
            return None
        assert self.histogram_noise is not None
        return PrivateRelease.for_optimizer(
            optimizer,
            histogram_noise=self.histogram_noise,
            log_every=self.log_every,
            seed=self._seed,
            seeded_noise=self._histogram_noise_source,
            privacy_engine=self._privacy_engine,
        )

    def _reset_step_state(self) -> None:
        self._pending: list[BatchNorms] = []
        self._batch_missing = False
        self._capturing = False

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this GradNormCallback is closed; create a new one")


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING = _Missing()
