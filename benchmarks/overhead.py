"""Time Opacus training with and without GradNormCallback, step against step in one process.

Every round runs one training step of each variant on the same batch: plain Opacus (the
baseline), the callback at each ``log_every`` and privacy mode, and a reference hook that
recomputes every per-sample norm from ``grad_sample``. The order is shuffled in every round.
The script reports the median and quartiles of the ratio of a variant's step time to the
baseline's step time in the same round. Such ratios cancel most of the drift of a shared
machine. All variants start from the same seeds, so their parameters must end bitwise
equal to the baseline's, which the script checks and reports.

TensorBoard's writer serializes events on the calling thread but checksums and writes them
on a thread of its own, whose work would otherwise land in whichever step runs next. The
callback flushes its writer at every logged step, which waits for that thread. Each timed
step of a variant that writes also ends with the writer's ``flush()``, which covers the
reference hook and costs a few microseconds when nothing is pending.

Run ``python benchmarks/overhead.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

import common
from dp_grad_callbacks import GradNormCallback

LOG_EVERY = (1, 10, 100)

# Standard deviation of the noise on each histogram count in privacy="private".
HISTOGRAM_NOISE = 1.0

# Measured rounds per model; the wide MLP's steps take about a second on 2 cores.
DEFAULT_ROUNDS = {"tiny-mlp": 2000, "wide-mlp": 120, "conv-net": 300}
WARMUP_ROUNDS = 5
SMOKE_ROUNDS = 3
SMOKE_BATCH_SIZE = 8

# Targets for the wide MLP in hooks mode with raw norms, by log_every.
TARGETS = {1: 1.03, 100: 1.01}

Privacy = Literal["raw", "private"]


@dataclass
class Variant:
    """A training whose step times are compared with the baseline's."""

    name: str
    training: common.Training
    log_every: int
    flush: Callable[[], None]
    close: Callable[[], None]
    ratios: list[float] = field(default_factory=list)
    added: list[float] = field(default_factory=list)
    logged: list[bool] = field(default_factory=list)


@dataclass
class Row:
    """One line of the results table."""

    model: str
    mode: str
    variant: str
    log_every: int
    baseline_ms: float
    load: str = ""
    ratios: np.ndarray | None = None
    added_ms: np.ndarray | None = None
    logged: np.ndarray | None = None
    identical: bool | None = None
    error: str | None = None

    def amortised(self) -> float:
        """Estimate the mean step-time ratio over a long run from the two kinds of steps.

        Logged steps come once in ``log_every`` steps, and the median of each kind is
        weighted by how often it occurs. The medians resist the outliers of a shared
        machine, which a plain mean of ratios does not.
        """
        assert self.ratios is not None and self.logged is not None
        logged = self.ratios[self.logged]
        unlogged = self.ratios[~self.logged]
        if logged.size == 0 or unlogged.size == 0:
            return float(np.median(self.ratios))
        every = self.log_every
        return (float(np.median(logged)) + (every - 1) * float(np.median(unlogged))) / every


class RecomputingHook:
    """Recompute every per-sample norm from ``grad_sample`` and log it at every step.

    This is what users write today without the callback: a step pre-hook on the optimizer
    that Opacus wraps, which runs after clipping, while ``p.grad_sample`` is still set.
    """

    def __init__(self, training: common.Training, writer: SummaryWriter) -> None:
        self.writer = writer
        self.parameters = [p for p in training.model.parameters() if p.requires_grad]
        self.step = 0
        self.handle = training.optimizer.original_optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            per_parameter = [
                p.grad_sample.reshape(len(p.grad_sample), -1).norm(2, dim=1)
                for p in self.parameters
            ]
            norms = torch.stack(per_parameter, dim=1).norm(2, dim=1)
        self.writer.add_histogram("grad_norm/before_clipping", norms.cpu(), self.step)
        self.step += 1

    def flush(self) -> None:
        """Wait until the writer has written every event so far."""
        self.writer.flush()

    def close(self) -> None:
        """Remove the hook and close the writer."""
        self.handle.remove()
        self.writer.close()


def main() -> None:
    """Parse the command line, run the grid and write the overhead section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    common.add_allocator_argument(parser)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=sorted(common.MODELS),
        default=list(common.MODELS),
        help="models to time (default: all)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="measured rounds per model, one step of every variant each (default: "
        + ", ".join(f"{name} {rounds}" for name, rounds in DEFAULT_ROUNDS.items())
        + f"; {SMOKE_ROUNDS} with --smoke)",
    )
    args = parser.parse_args()
    if args.rounds is not None and args.rounds < 1:
        parser.error(f"--rounds must be a positive integer, got {args.rounds}")

    load_at_start = common.load_average()
    allocator = common.use_allocator(args.allocator)
    common.quiet_warnings()
    torch.set_grad_enabled(True)

    modes: list[common.GradSampleMode] = ["hooks", "ghost"] if common.supports_ghost() else ["hooks"]
    privacies: list[Privacy] = ["raw", "private"] if common.supports_private() else ["raw"]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="dp-grad-overhead-") as logdir:
        for model_name in args.models:
            spec = common.MODELS[model_name]
            if args.smoke:
                rounds, warmup, batch_size = SMOKE_ROUNDS, 1, SMOKE_BATCH_SIZE
            else:
                rounds = args.rounds or DEFAULT_ROUNDS[model_name]
                warmup, batch_size = WARMUP_ROUNDS, spec.batch_size
            for mode in modes:
                print(f"{model_name}, {mode}: {rounds} rounds at batch {batch_size}", flush=True)
                rows += time_grid(
                    spec,
                    mode=mode,
                    privacies=privacies,
                    rounds=rounds,
                    warmup=warmup,
                    batch_size=batch_size,
                    logdir=Path(logdir) / f"{model_name}-{mode}",
                )

    lines = [*common.environment_lines(load_at_start), f"- Allocator: {allocator}", ""]
    lines += describe(rows, modes=modes, privacies=privacies, smoke=args.smoke)
    common.write_section(args.results, "overhead", "Overhead", lines)


def time_grid(
    spec: common.ModelSpec,
    *,
    mode: common.GradSampleMode,
    privacies: list[Privacy],
    rounds: int,
    warmup: int,
    batch_size: int,
    logdir: Path,
) -> list[Row]:
    """Time every variant of one model and sample mode against its baseline."""
    load = common.load_average().split(" / ")[0]
    baseline = common.make_training(spec, batch_size=batch_size, grad_sample_mode=mode)
    variants: list[Variant] = []
    failed: list[Row] = []
    for privacy in privacies:
        for log_every in LOG_EVERY:
            name = f"callback, {privacy}"
            try:
                variants.append(
                    callback_variant(spec, name, mode, privacy, log_every, batch_size, logdir)
                )
            except (TypeError, ValueError, RuntimeError) as error:
                failed.append(Row(spec.name, mode, name, log_every, 0.0, error=str(error)))
    if mode == "hooks":
        training = common.make_training(spec, batch_size=batch_size, grad_sample_mode=mode)
        hook = RecomputingHook(training, SummaryWriter(str(logdir / "reference")))
        variants.append(Variant("reference hook", training, 1, hook.flush, hook.close))

    batches = common.make_batches(spec, count=16, batch_size=batch_size, seed=1)
    order = np.random.default_rng(0)
    baseline_times: list[float] = []
    for round_index in range(warmup + rounds):
        batch = batches[round_index % len(batches)]
        elapsed: dict[int, float] = {}
        # Index 0 is the baseline; a fresh order in every round keeps any variant from
        # always following the same neighbour.
        for index in order.permutation(len(variants) + 1).tolist():
            if index == 0:
                start = time.perf_counter()
                baseline.step(batch)
            else:
                variant = variants[index - 1]
                start = time.perf_counter()
                variant.training.step(batch)
                variant.flush()
            elapsed[index] = time.perf_counter() - start
        if round_index < warmup:
            continue
        baseline_times.append(elapsed[0])
        for index, variant in enumerate(variants, start=1):
            variant.ratios.append(elapsed[index] / elapsed[0])
            variant.added.append(elapsed[index] - elapsed[0])
            variant.logged.append(round_index % variant.log_every == 0)

    baseline_ms = 1e3 * float(np.median(baseline_times))
    rows = []
    for variant in variants:
        variant.close()
        rows.append(
            Row(
                spec.name,
                mode,
                variant.name,
                variant.log_every,
                baseline_ms,
                ratios=np.array(variant.ratios),
                added_ms=1e3 * np.array(variant.added),
                logged=np.array(variant.logged),
                identical=common.same_parameters(baseline.model, variant.training.model),
            )
        )
    for row in rows + failed:
        row.baseline_ms = baseline_ms
        row.load = load
    return rows + failed


def callback_variant(
    spec: common.ModelSpec,
    name: str,
    mode: common.GradSampleMode,
    privacy: Privacy,
    log_every: int,
    batch_size: int,
    logdir: Path,
) -> Variant:
    """Build a training with a callback attached, writing under ``logdir``."""
    training = common.make_training(spec, batch_size=batch_size, grad_sample_mode=mode)
    options: dict[str, Any] = {"log_every": log_every}
    if privacy == "private":
        options["privacy"] = "private"
        options["histogram_noise"] = HISTOGRAM_NOISE
    callback = GradNormCallback(str(logdir / f"{privacy}-{log_every}"), **options)
    try:
        if mode == "ghost":
            callback.attach(training.optimizer, module=training.model)
        else:
            callback.attach(training.optimizer)
    except BaseException:
        callback.close()
        raise
    return Variant(name, training, log_every, callback.flush, callback.close)


def describe(
    rows: list[Row], *, modes: list[str], privacies: list[str], smoke: bool
) -> list[str]:
    """Render the rows, the targets and the method as Markdown lines."""
    header = [
        "model", "sample mode", "load", "variant", "log_every", "baseline step (ms)",
        "median ratio", "quartiles", "logged-step median", "amortised ratio",
        "added per logged step (ms)", "bitwise identical",
    ]
    table = []
    reasons: list[str] = []
    for row in rows:
        log_every = "every step" if row.variant == "reference hook" else str(row.log_every)
        if row.error is not None:
            reason = row.error.replace("|", "/").replace("\n", " ")
            if reason not in reasons:
                reasons.append(reason)
            table.append(
                [row.model, row.mode, row.load, row.variant, log_every, f"{row.baseline_ms:.2f}",
                 f"not run ({reasons.index(reason) + 1})", "", "", "", "", ""]
            )
            continue
        assert row.ratios is not None
        assert row.logged is not None
        assert row.added_ms is not None
        q1, median, q3 = np.percentile(row.ratios, [25, 50, 75])
        logged = row.ratios[row.logged]
        logged_text = f"{np.median(logged):.3f} (n={logged.size})" if logged.size else "none"
        added = row.added_ms[row.logged]
        added_text = f"{np.median(added):.2f}" if added.size else "none"
        table.append(
            [row.model, row.mode, row.load, row.variant, log_every, f"{row.baseline_ms:.2f}",
             f"{median:.3f}", f"{q1:.3f} - {q3:.3f}", logged_text, f"{row.amortised():.3f}",
             added_text, "yes" if row.identical else "**no**"]
        )

    lines = []
    if smoke:
        lines += ["Smoke run: tiny batches and a few rounds; the ratios mean nothing.", ""]
    lines += common.markdown_table(header, table)
    if reasons:
        lines += ["", "Cells not run, because the callback rejected the combination:", ""]
        lines += [f"{number}. {reason}" for number, reason in enumerate(reasons, start=1)]
    lines += ["", *target_lines(rows), "", *method_lines(modes, privacies)]
    return lines


def target_lines(rows: list[Row]) -> list[str]:
    """Compare the wide MLP's amortised ratios in hooks mode with the targets."""
    lines = ["Targets (wide MLP, hooks mode, raw norms, amortised ratio):", ""]
    for log_every, target in TARGETS.items():
        match = [
            row for row in rows
            if row.model == "wide-mlp" and row.mode == "hooks" and row.variant == "callback, raw"
            and row.log_every == log_every and row.error is None
        ]
        if not match:
            lines.append(f"- log_every={log_every}: <= {target}, not measured in this run")
            continue
        value = match[0].amortised()
        verdict = "met" if value <= target else "**not met**"
        lines.append(f"- log_every={log_every}: <= {target}, measured {value:.3f}, {verdict}")
    return lines


def method_lines(modes: list[str], privacies: list[str]) -> list[str]:
    """Explain how the numbers were taken."""
    return [
        "How to read this:",
        "",
        "- A ratio is a variant's step time over the baseline's step time in the same round; "
        "a step is forward, backward, `optimizer.step()` and `zero_grad()`. "
        "The baseline is the same Opacus training without the callback. The order of the "
        "variants is shuffled in every round.",
        "- A variant that writes events ends each timed step with the writer's `flush()`, so "
        "the work of TensorBoard's writer thread (checksums and file writes) is charged to it "
        "and not to the next step. The callback flushes at every logged step anyway.",
        "- Median ratio and quartiles are over all measured rounds. With `log_every` > 1 most "
        "steps are not logged, so the median shows the cost of an unlogged step. The amortised "
        "ratio weights the median of logged steps by 1/`log_every` and the median of unlogged "
        "steps by the rest: the expected slowdown of a long run.",
        "- Load is the 1-minute load average when the model and sample mode started; the "
        "benchmark's own two threads add about 2 once it runs. On 2 cores, another busy "
        "process makes torch's two threads wait for each other, which stretches small steps "
        "many times over and makes the ratios noisy.",
        "- Added per logged step is the median, over logged steps, of the variant's step time "
        "minus the baseline's: the absolute cost of one logged step, which depends little on "
        "the model.",
        "- The reference hook recomputes every per-sample norm from `grad_sample` in a step "
        "pre-hook of the wrapped optimizer and writes them with `add_histogram` at every step.",
        f"- Sample modes in this run: {', '.join(modes)}; privacy modes: {', '.join(privacies)}. "
        "Ghost clipping and private norms are timed when the installed package supports them.",
        "- Batches are fixed Gaussian inputs without Poisson sampling, so every variant sees "
        "the same batch sizes and the same work.",
    ]


if __name__ == "__main__":
    sys.exit(main())
