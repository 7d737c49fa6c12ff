"""Simulated training runs: synthetic gradient norms and epsilon per step, without data.

A dry run writes the same TensorBoard tags as ``GradNormCallback(..., dry_run=True)``, so
dashboards and the privacy budget can be previewed before any data or model exists.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from opacus.accountants import RDPAccountant, create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from .record import GradNormRecord
from .stats import bucket_limits, clipped_norms
from .synthetic import DEFAULT_MEDIAN_RATIO, DEFAULT_SIGMA, sample_gradient_norms
from .dashboard import EPSILON_TAG, custom_scalar_layout, settings_markdown
from .epsilon import check_epsilon_cost, compute_epsilon
from .tensorboard import write_record

AccountantName = Literal["rdp", "prv", "gdp"]
ACCOUNTANTS: tuple[AccountantName, ...] = ("rdp", "prv", "gdp")

# Default number of epsilon values per run for the accountants with a high cost per value.
# GDP solves for a root per value, and PRV composes numerically per value, which gets
# slower as the number of steps grows.
_DEFAULT_EPSILON_VALUES: dict[AccountantName, int] = {"gdp": 100, "prv": 20}

# Events that the writer may queue before a write blocks. torch's default (10) makes the
# loop wait on the writer thread after every step.
_WRITER_QUEUE = 1000


@dataclass(frozen=True)
class PrivacySettings:
    """DP-SGD parameters of a dry run whose epsilon is written per step.

    Attributes:
        noise_multiplier: Ratio of the noise standard deviation to C, positive.
        sample_rate: Probability that a given example is in a batch, in (0, 1].
        delta: Target delta of the (epsilon, delta) guarantee, in (0, 1).
        accountant: Opacus accountant that computes epsilon.
        epsilon_every: Steps between epsilon values, or None for
            :func:`default_epsilon_every`. The last step always gets a value.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float = 1e-5
    accountant: AccountantName = "rdp"
    epsilon_every: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0):
            raise ValueError(
                f"noise_multiplier must be a finite positive number, got {self.noise_multiplier!r}"
            )
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta!r}")
        if self.accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {ACCOUNTANTS}, got {self.accountant!r}")
        if self.epsilon_every is not None:
            _check_positive_int("epsilon_every", self.epsilon_every)


@dataclass(frozen=True)
class DryRunResult:
    """Outcome of :func:`dry_run`.

    Attributes:
        logged_steps: Number of steps that got histograms and scalars.
        epsilon: Epsilon after the last step, or None without privacy settings.
    """

    logged_steps: int
    epsilon: float | None


class EpsilonCalculator:
    """Epsilon after a number of identical DP-SGD steps, computed by an Opacus accountant.

    Args:
        noise_multiplier: Ratio of the noise standard deviation to C.
        sample_rate: Poisson sampling rate of each step.
        accountant: ``"rdp"``, ``"prv"`` or ``"gdp"``.

    Example:
        >>> calculator = EpsilonCalculator(noise_multiplier=1.0, sample_rate=0.01)
        >>> round(calculator.epsilon(1000, delta=1e-5), 2)
        2.1
    """

    def __init__(
        self, *, noise_multiplier: float, sample_rate: float, accountant: AccountantName = "rdp"
    ) -> None:
        self.noise_multiplier = noise_multiplier
        self.sample_rate = sample_rate
        self.accountant = accountant
        self._orders = RDPAccountant.DEFAULT_ALPHAS
        self._rdp_per_step: np.ndarray | None = None
        if accountant == "rdp":
            # RDP adds up over steps, so s identical steps cost s times one step at every
            # order. Opacus's compute_rdp scales its one-step result by `steps` the same way.
            self._rdp_per_step = rdp_analysis.compute_rdp(
                q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=self._orders
            )
        else:
            self._opacus_accountant = create_accountant(accountant)

    def epsilon(self, num_steps: int, delta: float) -> float:
        """Compute epsilon at ``delta`` after ``num_steps`` steps."""
        if self._rdp_per_step is not None:
            with warnings.catch_warnings():
                # Opacus warns when the best order is at the end of its range. Early in a
                # run that is expected, and the bound stays valid, only looser.
                warnings.filterwarnings("ignore", message="Optimal order is the")
                epsilon, _ = rdp_analysis.get_privacy_spent(
                    orders=self._orders, rdp=self._rdp_per_step * num_steps, delta=delta
                )
            return float(epsilon)

        self._opacus_accountant.history = [(self.noise_multiplier, self.sample_rate, num_steps)]
        steps = f"{num_steps:,} step{'' if num_steps == 1 else 's'}"
        return compute_epsilon(
            self._opacus_accountant,
            delta,
            run=(
                f"after {steps} at noise multiplier {self.noise_multiplier:g} and sample rate "
                f"{self.sample_rate:g}"
            ),
        )

    def check_cost(self, num_steps: int, delta: float) -> None:
        """Raise :class:`EpsilonCostError` if epsilon after ``num_steps`` steps is too costly."""
        if self._rdp_per_step is None:
            accountant = create_accountant(self.accountant)
            accountant.history = [(self.noise_multiplier, self.sample_rate, num_steps)]
            check_epsilon_cost(accountant, delta)


def default_epsilon_every(accountant: AccountantName, steps: int) -> int:
    """Return the default number of steps between epsilon values.

    Every step for RDP, because each value only converts the precomputed RDP of one step.
    About 100 values per run for GDP and 20 for PRV, because each of their values solves
    for a root or composes numerically.
    """
    values = _DEFAULT_EPSILON_VALUES.get(accountant)
    if values is None:
        return 1
    return max(1, math.ceil(steps / values))


def epsilon_steps(steps: int, every: int) -> list[int]:
    """Return the 0-based steps that get an epsilon value: every ``every``-th, and the last.

    Example:
        >>> epsilon_steps(10, 4)
        [3, 7, 9]
    """
    chosen = list(range(every - 1, steps, every))
    if steps > 0 and (not chosen or chosen[-1] != steps - 1):
        chosen.append(steps - 1)
    return chosen


def dry_run(
    logdir: str | os.PathLike[str],
    *,
    max_grad_norm: float,
    batch_size: int,
    steps: int,
    log_every: int = 1,
    tag_prefix: str = "grad_norm",
    median_ratio: float = DEFAULT_MEDIAN_RATIO,
    sigma: float = DEFAULT_SIGMA,
    seed: int | None = None,
    privacy: PrivacySettings | None = None,
    progress: bool = False,
) -> DryRunResult:
    """Write synthetic gradient norms of a simulated run, and its epsilon per step, to TensorBoard.

    The run gets what the callback writes in dry-run mode: the Custom Scalars layout and the
    settings table ``<tag_prefix>/dp_settings`` at step 0, then at every logged step the
    histograms and scalars of ``batch_size`` log-normal norms under
    ``<tag_prefix>/synthetic/``. With ``privacy``, the scalar ``privacy/epsilon`` at step
    ``s`` is the budget spent after ``s + 1`` steps.

    Args:
        logdir: Directory of the run's event files; created if missing.
        max_grad_norm: The clipping bound C.
        batch_size: Samples per step.
        steps: Number of simulated optimizer steps.
        log_every: Steps between logged steps; step 0 is always logged.
        tag_prefix: Prefix of the gradient-norm tags.
        median_ratio: Median of the synthetic norms as a multiple of C.
        sigma: Standard deviation of the logarithm of the synthetic norms.
        seed: Seed of the synthetic norms; None draws fresh entropy.
        privacy: Parameters for epsilon per step, or None to write no epsilon.
        progress: Whether to show a progress bar on stderr, which tqdm shows only on a
            terminal.

    Returns:
        The number of logged steps and the final epsilon.

    Raises:
        ValueError: If an argument is out of range.
        EpsilonCostError: If the prv accountant would need too much memory for epsilon.
        AccountantError: If the accountant fails to compute epsilon.
        OSError: If the log directory cannot be created.
    """
    for name, value in (("batch_size", batch_size), ("steps", steps), ("log_every", log_every)):
        _check_positive_int(name, value)
    if not isinstance(tag_prefix, str) or not tag_prefix.strip("/"):
        raise ValueError(f"tag_prefix must be a non-empty string, got {tag_prefix!r}")
    limits = bucket_limits(max_grad_norm)
    # Validates median_ratio and sigma before any file is created.
    sample_gradient_norms(max_grad_norm, 0, median_ratio=median_ratio, sigma=sigma)

    calculator = None
    epsilon_at: set[int] = set()
    if privacy is not None:
        calculator = EpsilonCalculator(
            noise_multiplier=privacy.noise_multiplier,
            sample_rate=privacy.sample_rate,
            accountant=privacy.accountant,
        )
        # The cost grows with the number of steps, so the last one is the costliest.
        calculator.check_cost(steps, privacy.delta)
        every = privacy.epsilon_every or default_epsilon_every(privacy.accountant, steps)
        epsilon_at = set(epsilon_steps(steps, every))

    prefix = tag_prefix.strip("/")
    settings = _settings_rows(max_grad_norm, batch_size, median_ratio, sigma, privacy)
    rng = np.random.default_rng(seed)
    logged = 0
    epsilon = None
    writer = SummaryWriter(log_dir=os.fspath(logdir), max_queue=_WRITER_QUEUE)
    try:
        writer.add_custom_scalars(
            custom_scalar_layout(prefix, synthetic=True, epsilon=privacy is not None)
        )
        writer.add_text(f"{prefix}/dp_settings", settings_markdown(settings), 0)
        for step in _progress(range(steps), enabled=progress):
            if step % log_every == 0:
                before = sample_gradient_norms(
                    max_grad_norm, batch_size, median_ratio=median_ratio, sigma=sigma, seed=rng
                )
                after = clipped_norms(before, max_grad_norm)
                record = GradNormRecord(step, before, after, max_grad_norm, synthetic=True)
                write_record(writer, record, prefix=prefix, limits=limits)
                logged += 1
            if calculator is not None and step in epsilon_at:
                assert privacy is not None
                epsilon = calculator.epsilon(step + 1, privacy.delta)
                writer.add_scalar(EPSILON_TAG, epsilon, step)
    finally:
        writer.close()
    return DryRunResult(logged_steps=logged, epsilon=epsilon)


def _settings_rows(
    max_grad_norm: float,
    batch_size: int,
    median_ratio: float,
    sigma: float,
    privacy: PrivacySettings | None,
) -> dict[str, str]:
    """Describe the simulated run with the row names of the callback's settings table."""
    rows = {
        "Clipping bound C (max_grad_norm)": f"{max_grad_norm:g}",
        "Noise multiplier": "not given" if privacy is None else f"{privacy.noise_multiplier:g}",
        "Expected batch size": str(batch_size),
        "Sample rate": "not given" if privacy is None else f"{privacy.sample_rate:.6g}",
        "Clipping mode": "flat",
        "Grad sample mode": (
            f"none, dry run of synthetic log-normal norms (median {median_ratio:.4g} C, "
            f"sigma {sigma:g})"
        ),
        "Accountant": "none" if privacy is None else privacy.accountant,
    }
    if privacy is not None:
        rows["Delta"] = f"{privacy.delta:g}"
    return rows


def _progress(steps: range, *, enabled: bool) -> Iterable[int]:
    if not enabled:
        return steps
    # disable=None lets tqdm stay silent when stderr is not a terminal.
    return tqdm(steps, desc="dry run", unit="step", disable=None, leave=False)


def _check_positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
