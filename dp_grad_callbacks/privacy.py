"""Private gradient-norm diagnostics: the noisy release of a logged step and its privacy cost.

With ``privacy="private"`` the callback releases, per logged step, only a noisy histogram of
the step's per-sample norms (see :mod:`~dp_grad_callbacks.noisy_histogram`). The histogram
and the step's noisy gradient are computed from the same Poisson sample, so together they are
one Gaussian mechanism on that sample, with the combined noise multiplier

    z_eff = (z^-2 + s^-2)^(-1/2)

where z is the gradient's noise multiplier (noise std / C) and s the standard deviation of
the noise on each bucket count, whose sensitivity is 1. Charging the two as independent
releases would not be sound, because they share the sample. A logged step therefore costs a
Poisson-subsampled Gaussian with ``z_eff`` and the step's sample rate, and a step that is not
logged costs what it costs without the callback.

Opacus's accountants keep ``history`` as ``(noise_multiplier, sample_rate, num_steps)``
entries and merge a step only into the last entry, so alternating logged and unlogged steps
would add two entries per ``log_every`` steps. A fresh ``"prv"`` accountant fed 1000 such
steps with ``log_every=10`` took 29 s in ``get_epsilon``, against 0.3 s for one entry
(opacus 1.6.0, one run on a 2-core CPU). Composition does not depend on order, so the
callback keeps the history grouped instead, with one entry per
``(noise_multiplier, sample_rate)`` pair.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections import Counter
from typing import Any, Callable, Literal, NamedTuple

import numpy as np
from opacus import PrivacyEngine
from opacus.accountants import IAccountant, create_accountant
from opacus.optimizers import (
    AdaClipDPOptimizer,
    DistributedDPOptimizer,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
)
from opacus.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer

from .epsilon import compute_epsilon
from .noisy_histogram import (
    GaussianNoise,
    SecureGaussianNoise,
    SeededGaussianNoise,
    noisy_bucket_counts,
)
from .record import GradNormRecord
from .stats import bucket_limits

Privacy = Literal["raw", "private"]
PRIVACY_MODES: tuple[str, ...] = ("raw", "private")

Mechanism = Literal["rdp", "prv", "gdp"]
MECHANISMS: tuple[str, ...] = ("rdp", "prv", "gdp")

HistoryEntry = tuple[float, float, int]

# Optimizer classes (and their subclasses) whose private release is not defined, with the
# reason. The other optimizers of opacus 1.6.0 clip with one flat bound C on one process.
_UNSUPPORTED_OPTIMIZERS: tuple[tuple[type[DPOptimizer], str], ...] = (
    (
        DPPerLayerOptimizer,
        "per-layer clipping clips each parameter with its own bound, so no single C "
        "splits the flat norms into clipped and unclipped",
    ),
    (
        AdaClipDPOptimizer,
        "adaptive clipping moves C with a noisy count of its own and already raises the "
        "gradient noise to pay for that count",
    ),
    (
        DPOptimizerFastGradientClipping,
        "ghost clipping computes the norms in the model, and the optimizer never sees them",
    ),
    (
        DistributedDPOptimizer,
        "each rank sees only its own samples, so the counts would have to be summed across "
        "ranks before one noise draw",
    ),
    (
        DistributedPerLayerOptimizer,
        "each rank sees only its own samples and clips each parameter with its own bound",
    ),
)

_EMPTY = np.zeros(0, dtype=np.float64)
_EMPTY.flags.writeable = False


RAW_NORMS_WARNING = (
    "GradNormCallback(privacy='raw') logs values computed from the training data "
    "(per-sample gradient norms, and in a dry run the batch sizes), which the "
    "differential-privacy guarantee of the model does not cover. Do not publish them as "
    "private; privacy='private' logs noisy histograms whose cost the privacy accountant "
    "records."
)


class RawNormsWarning(UserWarning):
    """Warning that the callback logs values that the DP guarantee does not cover."""


def check_privacy_mode(privacy: Any, histogram_noise: Any) -> None:
    """Raise ValueError unless ``privacy`` and ``histogram_noise`` fit together.

    ``histogram_noise`` must be a finite positive number with ``"private"`` and None with
    ``"raw"``.
    """
    if privacy not in PRIVACY_MODES:
        raise ValueError(f"privacy must be one of {PRIVACY_MODES}, got {privacy!r}")
    if privacy == "raw":
        if histogram_noise is not None:
            raise ValueError(
                "histogram_noise applies only with privacy='private', "
                f"got {histogram_noise!r} with privacy='raw'"
            )
        return
    if histogram_noise is None:
        raise ValueError(
            "histogram_noise is required with privacy='private', got None: pass the standard "
            "deviation of the noise on each bucket count, such as histogram_noise=5.0, and "
            "see preview_epsilon() for its privacy cost"
        )
    _check_number("histogram_noise", histogram_noise)


class EpsilonPreview(NamedTuple):
    """Epsilon of one training run without and with private diagnostics, at the same delta."""

    without_diagnostics: float
    with_diagnostics: float


def combined_noise_multiplier(noise_multiplier: float, histogram_noise: float) -> float:
    """Return ``(z^-2 + s^-2)^(-1/2)``, the noise multiplier of gradient and histogram together.

    Args:
        noise_multiplier: The gradient's noise multiplier z, finite and non-negative. A z of 0
            gives 0, because the gradient then has no privacy to share.
        histogram_noise: The standard deviation s of the noise on each bucket count, finite
            and positive.

    Example:
        >>> round(combined_noise_multiplier(1.0, 1.0), 6)
        0.707107
    """
    z = _check_number("noise_multiplier", noise_multiplier, allow_zero=True)
    s = _check_number("histogram_noise", histogram_noise)
    if z == 0.0:
        return 0.0
    return (z**-2 + s**-2) ** -0.5


def diagnostics_history(
    *,
    noise_multiplier: float,
    histogram_noise: float,
    sample_rate: float,
    steps: int,
    log_every: int = 1,
) -> list[HistoryEntry]:
    """Return the accountant history of ``steps`` steps with private diagnostics.

    Steps ``0, log_every, 2 * log_every, ...`` are logged and charged with ``z_eff``, and
    the others with ``noise_multiplier``. Entries are grouped as the callback keeps them, in
    order of first appearance, and an entry with 0 steps is left out.
    """
    sample_rate = _check_sample_rate(sample_rate)
    steps = _check_integer("steps", steps, minimum=1)
    log_every = _check_integer("log_every", log_every, minimum=1)
    z_eff = combined_noise_multiplier(noise_multiplier, histogram_noise)

    logged = -(-steps // log_every)
    history: list[HistoryEntry] = [(z_eff, sample_rate, logged)]
    if steps > logged:
        history.append((float(noise_multiplier), sample_rate, steps - logged))
    return history


def preview_epsilon(
    *,
    noise_multiplier: float,
    histogram_noise: float,
    sample_rate: float,
    steps: int,
    delta: float,
    log_every: int = 1,
    accountant: Mechanism = "prv",
) -> EpsilonPreview:
    """Compute epsilon of a training run without and with private diagnostics.

    Use it to choose ``histogram_noise`` before training. ``PrivacyEngine.make_private`` sets
    the sample rate to ``1 / len(data_loader)`` and charges one step per optimizer step.

    Args:
        noise_multiplier: The gradient's noise multiplier z.
        histogram_noise: The standard deviation s of the noise on each bucket count.
        sample_rate: Poisson sampling rate q, in (0, 1].
        steps: Number of optimizer steps that Opacus charges.
        delta: Target delta, in (0, 1).
        log_every: The callback's ``log_every``.
        accountant: Opacus accounting mechanism, as in ``PrivacyEngine(accountant=...)``.

    Returns:
        Epsilon from a fresh Opacus accountant for the plain run and for the run with
        diagnostics (:func:`diagnostics_history`).

    Raises:
        ValueError: If an argument is out of range, or ``accountant="gdp"`` with
            ``log_every > 1``.
        EpsilonCostError: If the prv accountant would need too much memory (a
            ``ValueError``).
        AccountantError: If the accountant fails to compute epsilon.

    Example:
        >>> preview = preview_epsilon(noise_multiplier=1.0, histogram_noise=2.0,
        ...     sample_rate=0.01, steps=1000, delta=1e-5, accountant="rdp")
        >>> preview.with_diagnostics > preview.without_diagnostics
        True
    """
    if accountant not in MECHANISMS:
        raise ValueError(f"accountant must be one of {MECHANISMS}, got {accountant!r}")
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
        raise ValueError(f"delta must be a number in (0, 1), got {delta!r}")
    history = diagnostics_history(
        noise_multiplier=noise_multiplier,
        histogram_noise=histogram_noise,
        sample_rate=sample_rate,
        steps=steps,
        log_every=log_every,
    )
    if accountant == "gdp":
        _check_gdp_log_every(log_every)

    plain = create_accountant(mechanism=accountant)
    plain.history = [(float(noise_multiplier), float(sample_rate), steps)]
    private = create_accountant(mechanism=accountant)
    private.history = history
    run = (
        f"for {steps:,} steps at noise multiplier {noise_multiplier:g}, histogram noise "
        f"{histogram_noise:g} and sample rate {sample_rate:g}"
    )
    return EpsilonPreview(
        without_diagnostics=compute_epsilon(plain, delta, run=run),
        with_diagnostics=compute_epsilon(private, delta, run=run),
    )


class PrivateRelease:
    """Noisy release of logged steps, charged to the Opacus privacy accountant.

    Build it with :meth:`for_optimizer` when the callback attaches. The callback then runs
    the optimizer's step hook through :meth:`run_step_hook` and passes each logged record
    through :meth:`release`. A record is released only after the accountant has recorded
    the charge of its step.

    Attributes:
        accountant: The accountant that the optimizer's step hook charges.
        histogram_noise: Standard deviation s of the noise on each bucket count.
    """

    def __init__(
        self, accountant: IAccountant, *, histogram_noise: float, noise: GaussianNoise
    ) -> None:
        self.accountant = accountant
        self.histogram_noise = _check_number("histogram_noise", histogram_noise)
        self._noise = noise
        self._charged = False

    @classmethod
    def for_optimizer(
        cls,
        optimizer: DPOptimizer,
        *,
        histogram_noise: float,
        log_every: int,
        seed: int | None,
        seeded_noise: SeededGaussianNoise,
        privacy_engine: PrivacyEngine | None = None,
    ) -> PrivateRelease:
        """Check that private diagnostics are defined for ``optimizer`` and prepare them.

        The accountant is the one that ``optimizer.step_hook`` charges, found in the hook
        that ``PrivacyEngine.make_private`` attaches, or ``privacy_engine.accountant``.
        With ``optimizer.secure_mode`` the noise comes from the operating system's random
        source and ``seed`` must be None. Otherwise it comes from ``seeded_noise``, the
        caller's generator seeded with ``seed``.

        Raises:
            TypeError: If the optimizer does not clip with one flat bound on one process.
            ValueError: If no accountant is found, its mechanism cannot record the charge,
                or ``seed`` is given in secure mode.
        """
        check_optimizer_supported(optimizer)
        accountant = find_accountant(optimizer, privacy_engine)
        z_eff = combined_noise_multiplier(optimizer.noise_multiplier, histogram_noise)
        check_accountant(accountant, log_every=log_every, combined_noise=z_eff)

        noise: GaussianNoise
        if optimizer.secure_mode:
            if seed is not None:
                raise ValueError(
                    f"seed must be None when the optimizer uses secure_mode, got {seed!r}: "
                    "secure histogram noise comes from the operating system and cannot be "
                    "seeded"
                )
            noise = SecureGaussianNoise()
        else:
            noise = seeded_noise
        return cls(accountant, histogram_noise=histogram_noise, noise=noise)

    def run_step_hook(
        self, hook: Callable[[DPOptimizer], Any], optimizer: DPOptimizer, *, charge: bool
    ) -> None:
        """Run the optimizer's step hook, charging the step with ``z_eff`` if ``charge``.

        Opacus calls the step hook after noise was added to the gradient. Opacus's hook
        charges ``optimizer.noise_multiplier``, so for a charged step that attribute is
        ``z_eff`` while the hook runs and is restored right after. The accountant computes
        the sample rate itself. Then the history is grouped, and the charge counts as
        recorded only if the history gained exactly one step with ``z_eff``.
        """
        self._charged = False
        if not charge:
            hook(optimizer)
            self._group_history()
            return

        noise_multiplier = optimizer.noise_multiplier
        z_eff = combined_noise_multiplier(noise_multiplier, self.histogram_noise)
        steps_before = _steps_per_entry(self.accountant.history)
        optimizer.noise_multiplier = z_eff
        try:
            hook(optimizer)
        finally:
            optimizer.noise_multiplier = noise_multiplier
        self._group_history()

        steps_after = _steps_per_entry(self.accountant.history)
        self._charged = _added_one_step(steps_before, steps_after, z_eff)

    def release(self, record: GradNormRecord) -> GradNormRecord | None:
        """Return the noisy release of ``record``, or None if its step was not charged.

        The released record keeps ``step``, ``max_grad_norm`` and ``synthetic``. Its
        per-sample arrays are empty, and it carries instead the noisy counts over the
        buckets of ``stats.bucket_limits(record.max_grad_norm)``.
        """
        if not self._charged:
            return None
        self._charged = False

        limits = bucket_limits(record.max_grad_norm)
        counts = noisy_bucket_counts(
            record.before, limits, std=self.histogram_noise, noise=self._noise
        )
        return GradNormRecord(
            step=record.step,
            before=_EMPTY,
            after=_EMPTY,
            max_grad_norm=record.max_grad_norm,
            synthetic=record.synthetic,
            noisy_counts=counts,
            bucket_limits=limits,
            histogram_noise=self.histogram_noise,
        )

    def _group_history(self) -> None:
        history = self.accountant.history
        grouped = group_history(history)
        if len(grouped) < len(history):
            self.accountant.history = grouped


def check_optimizer_supported(optimizer: DPOptimizer) -> None:
    """Raise TypeError unless ``optimizer`` clips with one flat bound on one process."""
    for unsupported, reason in _UNSUPPORTED_OPTIMIZERS:
        if isinstance(optimizer, unsupported):
            raise TypeError(
                f"privacy='private' supports only flat clipping on one process "
                f"(opacus.optimizers.DPOptimizer), got {type(optimizer).__qualname__}: "
                f"{reason}. Use privacy='raw', whose values are not private."
            )


def find_accountant(
    optimizer: DPOptimizer, privacy_engine: PrivacyEngine | None = None
) -> IAccountant:
    """Return the privacy accountant that ``optimizer.step_hook`` charges.

    Raises:
        ValueError: If the optimizer has no step hook, the hook charges an accountant other
            than ``privacy_engine.accountant``, or no accountant is found and
            ``privacy_engine`` is None.
    """
    hook = optimizer.step_hook
    if hook is None:
        raise ValueError(
            "the optimizer has no step hook, so no privacy accountant records its steps; "
            "build it with PrivacyEngine.make_private"
        )

    in_hook = _accountant_in_hook(hook)
    if privacy_engine is None:
        if in_hook is None:
            raise ValueError(
                "no privacy accountant found in optimizer.step_hook; pass the PrivacyEngine "
                "as GradNormCallback(..., privacy_engine=privacy_engine, delta=delta)"
            )
        return in_hook
    if in_hook is not None and in_hook is not privacy_engine.accountant:
        raise ValueError(
            "optimizer.step_hook charges a different accountant than "
            "privacy_engine.accountant; pass the PrivacyEngine that made the optimizer private"
        )
    return privacy_engine.accountant


def check_accountant(accountant: IAccountant, *, log_every: int, combined_noise: float) -> None:
    """Raise ValueError unless ``accountant`` can record charges with ``combined_noise``.

    ``"rdp"`` and ``"prv"`` accept any sequence of noise multipliers. ``"gdp"`` raises on a
    step whose noise multiplier differs from the previous one, so it works only when every
    step is logged and its history contains no step charged with another noise multiplier.
    """
    mechanism = accountant.mechanism()
    if mechanism not in MECHANISMS:
        raise ValueError(
            f"privacy='private' supports the accountants {MECHANISMS}, got {mechanism!r}"
        )
    if mechanism != "gdp":
        return

    _check_gdp_log_every(log_every)
    other = {entry[0] for entry in accountant.history} - {combined_noise}
    if other:
        raise ValueError(
            "the 'gdp' accountant already recorded steps with noise multiplier "
            f"{sorted(other)}, and cannot mix them with {combined_noise}; attach the "
            "callback before the first step, or use the 'prv' or 'rdp' accountant"
        )


def group_history(history: list[HistoryEntry]) -> list[HistoryEntry]:
    """Merge history entries with equal noise multiplier and sample rate.

    Entries keep the order of their first appearance. Epsilon does not change, because
    Opacus's accountants compose the entries without regard to order.
    """
    steps = _steps_per_entry(history)
    return [(z, q, count) for (z, q), count in steps.items()]


def _steps_per_entry(history: list[HistoryEntry]) -> Counter[tuple[float, float]]:
    steps: Counter[tuple[float, float]] = Counter()
    for noise_multiplier, sample_rate, count in history:
        steps[(noise_multiplier, sample_rate)] += count
    return steps


def _added_one_step(
    before: Counter[tuple[float, float]], after: Counter[tuple[float, float]], z_eff: float
) -> bool:
    """Tell whether ``after`` is ``before`` plus one step with noise multiplier ``z_eff``."""
    if before - after:
        return False
    added = list((after - before).items())
    if len(added) != 1:
        return False
    (noise_multiplier, _), count = added[0]
    return count == 1 and noise_multiplier == z_eff


def _accountant_in_hook(hook: Callable[..., Any]) -> IAccountant | None:
    """Return the accountant that a step hook belongs to, or None.

    ``IAccountant.get_optimizer_hook_fn`` (opacus 1.6.0) returns a closure over the
    accountant, and a bound method of an accountant has it as ``__self__``.
    """
    owner = getattr(hook, "__self__", None)
    if isinstance(owner, IAccountant):
        return owner
    try:
        captured = inspect.getclosurevars(hook).nonlocals.values()
    except TypeError:
        return None
    return next((value for value in captured if isinstance(value, IAccountant)), None)


def _check_gdp_log_every(log_every: int) -> None:
    if log_every != 1:
        raise ValueError(
            "the 'gdp' accountant requires one noise multiplier for every step, so "
            f"privacy='private' with it needs log_every=1, got {log_every!r}; "
            "use the 'prv' or 'rdp' accountant to log less often"
        )


def _check_number(name: str, value: Any, *, allow_zero: bool = False) -> float:
    expected = "non-negative" if allow_zero else "positive"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite {expected} number, got {value!r}")
    number = float(value)
    if not math.isfinite(number) or number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite {expected} number, got {value!r}")
    return number


def _check_integer(name: str, value: Any, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_sample_rate(sample_rate: Any) -> float:
    rate = _check_number("sample_rate", sample_rate)
    if rate > 1:
        raise ValueError(f"sample_rate must be a number in (0, 1], got {sample_rate!r}")
    return rate
