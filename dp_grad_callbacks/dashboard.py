"""The TensorBoard dashboard of a run: custom-scalar layout, DP settings text and epsilon.

At attach, the callback gives the run a Custom Scalars layout that draws the norm quantiles
against the clipping bound C in one chart, and a Markdown table of the DP settings on the
Text tab. Given the ``PrivacyEngine`` and a delta, it also writes the privacy budget spent,
``privacy/epsilon``, every ``epsilon_every`` logged steps.
"""

from __future__ import annotations

import inspect
import logging
import math
import numbers
import re
import weakref
from typing import Any

import torch
from opacus import PrivacyEngine
from opacus.accountants import IAccountant
from opacus.optimizers import (
    AdaClipDPOptimizer,
    DPOptimizer,
    DPOptimizerFastGradientClipping,
    DPPerLayerOptimizer,
)
from opacus.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer
from torch.utils.tensorboard import SummaryWriter

from .epsilon import check_epsilon_cost
from .tensorboard import tag_root

logger = logging.getLogger(__name__)

EPSILON_TAG = "privacy/epsilon"

# The layout written to each writer so far. TensorBoard shows only the last layout of a
# run, so a second callback on the same writer writes the union of both.
_LAYOUTS: weakref.WeakKeyDictionary[SummaryWriter, dict] = weakref.WeakKeyDictionary()

# Cost of epsilon (check_epsilon_cost and get_epsilon), measured with
# benchmarks/accountant_cost.py on a 2-core Intel Xeon VM (torch 2.13.0, opacus 1.6.0)
# against one step of the 64 -> 512 x3 -> 10 MLP at batch 256: rdp 0.05 steps, gdp 0.01,
# prv 0.28 steps after 100 steps, 0.33 after 1,000 and 0.85 after 10,000. At every 100th
# logged step, prv costs an estimated 0.85% of training time or less in runs of up to
# 10,000 steps.
DEFAULT_EPSILON_EVERY = 100


def check_privacy_options(privacy_engine: Any, delta: Any, epsilon_every: Any) -> None:
    """Raise ``ValueError`` or ``TypeError`` unless the epsilon options are valid together."""
    if privacy_engine is not None and not isinstance(privacy_engine, PrivacyEngine):
        raise TypeError(
            "privacy_engine must be the opacus.PrivacyEngine that made the optimizer private "
            f"or None, got {type(privacy_engine).__module__}.{type(privacy_engine).__qualname__}"
        )
    if delta is not None and (
        isinstance(delta, bool)
        or not isinstance(delta, numbers.Real)
        or not 0 < float(delta) < 1
    ):
        raise ValueError(f"delta must be a number between 0 and 1 (exclusive), got {delta!r}")
    if (privacy_engine is None) != (delta is None):
        raise ValueError(
            "privacy_engine and delta must be given together to log privacy/epsilon, got "
            f"privacy_engine={privacy_engine!r} and delta={delta!r}"
        )
    if (
        isinstance(epsilon_every, bool)
        or not isinstance(epsilon_every, numbers.Integral)
        or epsilon_every < 1
    ):
        raise ValueError(f"epsilon_every must be a positive integer, got {epsilon_every!r}")


def custom_scalar_layout(prefix: str, *, synthetic: bool = False, epsilon: bool = False) -> dict:
    """Build the Custom Scalars layout for the scalars that ``write_record`` writes.

    Each chart lists its tags as anchored regular expressions, because TensorBoard matches
    the entries as patterns and ``<prefix>/max`` would otherwise also match
    ``<prefix>/max_grad_norm``.

    Args:
        prefix: The callback's tag prefix.
        synthetic: Whether the norms are synthetic, which puts them under
            ``<prefix>/synthetic/``.
        epsilon: Whether to add a chart of ``privacy/epsilon``.

    Returns:
        The ``{category: {chart title: ["Multiline", [tag patterns]]}}`` dictionary that
        ``SummaryWriter.add_custom_scalars`` takes.
    """
    root = tag_root(prefix, synthetic)
    norms = [f"{root}/{name}" for name in ("median", "p90", "max", "max_grad_norm")]
    charts = {
        f"Per-sample gradient norms against C ({root})": ["Multiline", _exact(norms)],
        f"Fraction of samples clipped ({root})": ["Multiline", _exact([f"{root}/clipped_fraction"])],
    }
    if epsilon:
        charts["Privacy budget spent (epsilon)"] = ["Multiline", _exact([EPSILON_TAG])]
    return {"DP-SGD clipping": charts}


def _exact(tags: list[str]) -> list[str]:
    return [f"^{re.escape(tag)}$" for tag in tags]


def dp_settings(
    optimizer: DPOptimizer,
    *,
    privacy_engine: PrivacyEngine | None = None,
    delta: float | None = None,
    histogram_noise: float | None = None,
) -> dict[str, str]:
    """Describe the DP settings of ``optimizer`` as ordered ``{setting: value}`` rows.

    ``histogram_noise``, given for private diagnostics, adds a row with the noise on each
    bucket count.

    The sample rate and the accountant come from the accountant's step hook that
    ``make_private`` installs (opacus 1.6), so they are found without the ``PrivacyEngine``.
    A value that cannot be found reads ``unknown``.
    """
    hook_variables = _step_hook_variables(optimizer)
    accountant = privacy_engine.accountant if privacy_engine is not None else None
    if accountant is None and isinstance(hook_variables.get("self"), IAccountant):
        accountant = hook_variables["self"]
    sample_rate = hook_variables.get("sample_rate")

    expected_batch_size = optimizer.expected_batch_size
    world_size = getattr(optimizer, "world_size", None)
    rows = {
        "Clipping bound C (max_grad_norm)": _clipping_bound(optimizer),
        "Noise multiplier": f"{optimizer.noise_multiplier:g}",
        "Expected batch size": "unknown" if expected_batch_size is None else str(expected_batch_size),
        "Sample rate": "unknown" if sample_rate is None else f"{sample_rate:.6g}",
        "Clipping mode": clipping_mode(optimizer),
        "Grad sample mode": (
            "ghost"
            if isinstance(optimizer, DPOptimizerFastGradientClipping)
            else "per-sample gradients (hooks, functorch or ew)"
        ),
        "Loss reduction": str(optimizer.loss_reduction),
        "Secure mode": "on" if optimizer.secure_mode else "off",
        "Distributed": "no" if world_size is None else f"yes, {world_size} ranks",
        "Accountant": "unknown" if accountant is None else accountant.mechanism(),
    }
    if delta is not None:
        rows["Delta"] = f"{delta:g}"
    if histogram_noise is not None:
        rows["Histogram noise (private diagnostics)"] = (
            f"std {histogram_noise:g} on each bucket count, charged to the accountant"
        )
    return rows


def clipping_mode(optimizer: DPOptimizer) -> str:
    """Return the ``clipping`` argument of ``make_private`` that produced ``optimizer``."""
    if isinstance(optimizer, AdaClipDPOptimizer):
        return "adaptive"
    if isinstance(optimizer, (DPPerLayerOptimizer, DistributedPerLayerOptimizer)):
        return "per_layer"
    return "flat"


def _clipping_bound(optimizer: DPOptimizer) -> str:
    mode = clipping_mode(optimizer)
    max_grad_norm = float(optimizer.max_grad_norm)
    if mode == "per_layer":
        per_parameter = ", ".join(f"{float(c):g}" for c in optimizer.max_grad_norms)
        return f"[{per_parameter}], one per parameter (L2 norm {max_grad_norm:g})"
    if mode == "adaptive":
        return (
            f"{max_grad_norm:g} at attach, adapted each step towards the unclipped quantile "
            f"{optimizer.target_unclipped_quantile:g} within "
            f"[{optimizer.min_clipbound:g}, {optimizer.max_clipbound:g}]"
        )
    return f"{max_grad_norm:g}"


def _step_hook_variables(optimizer: DPOptimizer) -> dict[str, Any]:
    """Return the closure variables of the optimizer's step hook, or ``{}``.

    The hook that ``IAccountant.get_optimizer_hook_fn`` returns (opacus 1.6) closes over
    the accountant (``self``) and ``sample_rate``. A hook of any other shape gives ``{}``.
    """
    hook = getattr(optimizer, "step_hook", None)
    if hook is None:
        return {}
    try:
        return dict(inspect.getclosurevars(hook).nonlocals)
    except TypeError:
        return {}


def settings_markdown(settings: dict[str, str]) -> str:
    """Format setting rows as a two-column Markdown table for TensorBoard's Text tab."""
    lines = ["| DP setting | value |", "|---|---|"]
    lines += [f"| {name} | {_escape_cell(value)} |" for name, value in settings.items()]
    return "\n".join(lines)


def _escape_cell(text: str) -> str:
    return text.replace("|", "\\|")


def is_rank_zero() -> bool:
    """Tell whether this process is rank 0 of ``torch.distributed``, or not distributed."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0


class Dashboard:
    """Writer of one callback's dashboard: the layout, the settings text and epsilon.

    Every write happens on rank 0 only, and a failing write is logged and counted in
    ``failures`` instead of raised, so that the dashboard never stops training. After the
    first failure to compute epsilon, a refusal by
    :func:`~dp_grad_callbacks.epsilon.check_epsilon_cost` or an infinite epsilon, no more
    epsilon is computed.

    Args:
        prefix: The callback's tag prefix.
        synthetic: Whether the callback logs synthetic norms only (dry run).
        privacy_engine: The ``PrivacyEngine`` whose ``get_epsilon`` gives epsilon, or None.
        delta: The delta of epsilon; given exactly when ``privacy_engine`` is.
        epsilon_every: Number of logged steps between epsilon scalars.
        histogram_noise: The noise on each bucket count with private diagnostics, or None.
    """

    def __init__(
        self,
        *,
        prefix: str,
        synthetic: bool,
        privacy_engine: PrivacyEngine | None,
        delta: float | None,
        epsilon_every: int,
        histogram_noise: float | None = None,
    ) -> None:
        check_privacy_options(privacy_engine, delta, epsilon_every)
        self.prefix = prefix
        self.synthetic = synthetic
        self.privacy_engine = privacy_engine
        self.delta = delta
        self.epsilon_every = epsilon_every
        self.histogram_noise = histogram_noise
        self.failures = 0
        self._logged_steps = 0
        self._last_epsilon_step: int | None = None
        self._epsilon_stopped = False

    def write_header(self, writer: SummaryWriter | None, optimizer: DPOptimizer, step: int) -> None:
        """Write the Custom Scalars layout and the DP settings text at ``step``."""
        if writer is None or not is_rank_zero():
            return
        layout = _LAYOUTS.setdefault(writer, {})
        new_layout = custom_scalar_layout(
            self.prefix, synthetic=self.synthetic, epsilon=self.privacy_engine is not None
        )
        for category, charts in new_layout.items():
            layout.setdefault(category, {}).update(charts)
        settings = dp_settings(
            optimizer,
            privacy_engine=self.privacy_engine,
            delta=self.delta,
            histogram_noise=self.histogram_noise,
        )
        try:
            writer.add_custom_scalars(layout)
            writer.add_text(f"{self.prefix}/dp_settings", settings_markdown(settings), step)
        except Exception:  # noqa: BLE001 - the dashboard must never stop training
            self._log_failure("the dashboard layout and DP settings", step)

    def count_logged_step(self, writer: SummaryWriter | None, step: int) -> None:
        """Count a logged step, and write epsilon at the first and every ``epsilon_every``-th."""
        due = self._logged_steps % self.epsilon_every == 0
        self._logged_steps += 1
        if due:
            self._write_epsilon(writer, step)

    def write_final_epsilon(self, writer: SummaryWriter | None, step: int) -> None:
        """Write epsilon after the last step, ``step``, unless it is written already.

        Nothing is written before the first logged step, so a callback detached before it
        logged anything leaves no epsilon behind.
        """
        if self._logged_steps > 0 and step != self._last_epsilon_step:
            self._write_epsilon(writer, step)

    def _write_epsilon(self, writer: SummaryWriter | None, step: int) -> None:
        if self.privacy_engine is None or writer is None or not is_rank_zero():
            return
        if self._epsilon_stopped:
            return
        assert self.delta is not None
        self._last_epsilon_step = step
        try:
            check_epsilon_cost(self.privacy_engine.accountant, self.delta)
            epsilon = float(self.privacy_engine.get_epsilon(self.delta))
        except Exception as error:  # noqa: BLE001 - the dashboard must never stop training
            self.failures += 1
            reason = f"computing epsilon failed: {type(error).__name__}: {str(error).rstrip('.')}"
            self._stop_epsilon(step, reason)
            return
        if not math.isfinite(epsilon):
            self._stop_epsilon(step, f"epsilon is {epsilon}")
            return
        try:
            writer.add_scalar(EPSILON_TAG, epsilon, step)
        except Exception:  # noqa: BLE001 - the dashboard must never stop training
            self._log_failure("privacy/epsilon", step)

    def _stop_epsilon(self, step: int, reason: str) -> None:
        # The accountant's history only grows, so a later step would fail again, give
        # epsilon inf again, or cost more.
        self._epsilon_stopped = True
        logger.warning(
            "%s is not written from step %d on, because %s. Training continues.",
            EPSILON_TAG,
            step,
            reason,
        )

    def _log_failure(self, content: str, step: int) -> None:
        self.failures += 1
        logger.exception(
            "failed to write %s at step %d to TensorBoard (failure %d); training continues",
            content,
            step,
            self.failures,
        )
