"""Epsilon from an Opacus accountant, after a check that the computation fits in memory.

Opacus's PRV accountant discretizes the privacy loss on a mesh whose number of points grows
with the number of steps and with the privacy loss of one step. Its composition keeps
several arrays of that length, about 150 bytes per point in all, an estimate from the peak
RSS of opacus 1.6 at 3.4 million points. A small noise multiplier or a very long run
therefore needs tens of gigabytes, and the kernel can kill a training process that
computes such an epsilon.
"""

from __future__ import annotations

import logging
import warnings

from opacus.accountants import IAccountant, PRVAccountant

logger = logging.getLogger(__name__)

# About 1.5 GB at 150 bytes per point, for one computation.
# NOTE: scipy.fft, which the PRV composition calls, keeps a plan per transform length, and
# each epsilon of a run has a new length. Many calls near the limit can hold several GB more.
PRV_MESH_LIMIT = 10_000_000
_PRV_BYTES_PER_POINT = 150

# The defaults of PRVAccountant.get_epsilon, which PrivacyEngine.get_epsilon uses.
_PRV_EPS_ERROR = 0.01
_PRV_DELTA_ERROR_RATIO = 1e-3


class EpsilonCostError(ValueError):
    """An epsilon whose computation would take more memory than :data:`PRV_MESH_LIMIT` allows."""


class AccountantError(RuntimeError):
    """An Opacus accountant that failed to compute epsilon for valid DP-SGD parameters."""


def prv_mesh_points(accountant: PRVAccountant, delta: float) -> int | None:
    """Return the number of mesh points that ``accountant.get_epsilon(delta)`` would use.

    The size comes from the accountant's own domain computation, which costs a few RDP
    evaluations. Returns None when that computation fails, for example in an Opacus version
    with other internals or for an extreme noise multiplier.
    """
    try:
        # Imported here because the module path is an Opacus internal that may move.
        from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV

        prvs = [
            PoissonSubsampledGaussianPRV(sample_rate, noise_multiplier)
            for noise_multiplier, sample_rate, _ in accountant.history
        ]
        with warnings.catch_warnings():
            # get_epsilon computes the same domain and gives the same RDP warnings.
            warnings.simplefilter("ignore")
            domain = accountant._get_domain(
                prvs=prvs,
                num_self_compositions=[steps for _, _, steps in accountant.history],
                eps_error=_PRV_EPS_ERROR,
                delta_error=delta * _PRV_DELTA_ERROR_RATIO,
            )
        return int(domain.size)
    except Exception as error:  # noqa: BLE001 - the check is optional, get_epsilon is not
        logger.debug("failed to size the PRV mesh, so epsilon runs unchecked: %r", error)
        return None


def check_epsilon_cost(accountant: IAccountant, delta: float) -> None:
    """Raise unless ``accountant.get_epsilon(delta)`` fits in memory.

    Raises:
        EpsilonCostError: If a PRV accountant would need more than :data:`PRV_MESH_LIMIT`
            mesh points. The message gives the size and the fixes.
    """
    if not isinstance(accountant, PRVAccountant) or not accountant.history:
        return
    points = prv_mesh_points(accountant, delta)
    if points is None or points <= PRV_MESH_LIMIT:
        return
    noise = sorted({noise for noise, _, _ in accountant.history})
    steps = sum(steps for _, _, steps in accountant.history)
    multipliers = "multiplier" if len(noise) == 1 else "multipliers"
    raise EpsilonCostError(
        f"the prv accountant would compute epsilon on {points:,} mesh points "
        f"(about {points * _PRV_BYTES_PER_POINT / 1e9:.1f} GB) for {steps:,} steps at noise "
        f"{multipliers} {', '.join(f'{z:g}' for z in noise)}, more than the "
        f"{PRV_MESH_LIMIT:,} points allowed. Use the rdp accountant, whose cost does not "
        f"grow with the run, or a larger noise multiplier"
    )


def compute_epsilon(accountant: IAccountant, delta: float, *, run: str) -> float:
    """Return ``accountant.get_epsilon(delta)`` after :func:`check_epsilon_cost`.

    Args:
        accountant: An Opacus accountant whose history is the run.
        delta: Target delta.
        run: The run's parameters for the error message, such as ``"after 5 steps at
            noise multiplier 1"``.

    Raises:
        EpsilonCostError: If the computation would not fit in memory.
        AccountantError: If the accountant fails, with ``run`` and Opacus's error.
    """
    check_epsilon_cost(accountant, delta)
    try:
        return float(accountant.get_epsilon(delta))
    except Exception as error:
        # The prv and gdp accountants solve numerically, and fail for some extreme
        # parameters with messages that name neither the parameters nor a fix.
        raise AccountantError(
            f"the {accountant.mechanism()} accountant failed to compute epsilon {run} "
            f"({type(error).__name__}: {error}). Use the rdp accountant or a larger noise "
            f"multiplier"
        ) from error
