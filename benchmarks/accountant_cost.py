"""Time the callback's epsilon with each Opacus accountant against one DP-SGD training step.

The callback computes epsilon at every ``epsilon_every``-th logged step, and these numbers
size that default. One process times, in turn, one training step of the wide MLP
(64 -> 512 x3 -> 10) at batch 256 under Opacus (hooks mode, flat clipping, Gaussian inputs)
and epsilon of the ``rdp``, ``gdp`` and ``prv`` accountants after 100, 1,000 and 10,000
steps at the sample rate of batch 256 out of 60,000 examples. Epsilon is computed as the
callback does: ``check_epsilon_cost``, then ``get_epsilon(delta)``.

Run ``python benchmarks/accountant_cost.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

from opacus.accountants import create_accountant

import common
from dp_grad_callbacks.dashboard import DEFAULT_EPSILON_EVERY
from dp_grad_callbacks.epsilon import check_epsilon_cost

MODEL = "wide-mlp"
SMOKE_MODEL = "tiny-mlp"
DATASET_SIZE = 60_000
DELTA = 1e-5
ACCOUNTANTS = ("rdp", "gdp", "prv")
STEP_COUNTS = (100, 1_000, 10_000)
SMOKE_STEP_COUNTS = (10, 100)
REPEATS = 15
SMOKE_REPEATS = 2
WARMUP_STEPS = 5
SMOKE_WARMUP_STEPS = 1


def make_epsilon(mechanism: str, *, steps: int, sample_rate: float) -> Callable[[], float]:
    """Return a function that computes epsilon as the callback does, after ``steps`` steps.

    The callback checks that a PRV accountant's mesh fits in memory before each
    ``get_epsilon``, so the returned function runs that check too.
    """
    with warnings.catch_warnings():
        # Opacus 1.6 warns at every GDP accountant's creation that it is experimental.
        warnings.simplefilter("ignore")
        accountant = create_accountant(mechanism)
    for _ in range(steps):
        accountant.step(noise_multiplier=common.NOISE_MULTIPLIER, sample_rate=sample_rate)

    def compute_epsilon() -> float:
        check_epsilon_cost(accountant, DELTA)
        return accountant.get_epsilon(delta=DELTA)

    return compute_epsilon


def seconds(function: Callable[[], object]) -> float:
    """Return the wall time of one call of ``function``, in seconds."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    """Time every accountant against the training step and write the accountant_cost section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    common.add_allocator_argument(parser)
    args = parser.parse_args()
    load_at_start = common.load_average()
    allocator = common.use_allocator(args.allocator)
    common.quiet_warnings()

    spec = common.MODELS[SMOKE_MODEL if args.smoke else MODEL]
    batch_size = spec.batch_size
    sample_rate = batch_size / DATASET_SIZE
    step_counts = SMOKE_STEP_COUNTS if args.smoke else STEP_COUNTS
    repeats = SMOKE_REPEATS if args.smoke else REPEATS
    training = common.make_training(spec, batch_size=batch_size)
    batch = common.make_batches(spec, count=1, batch_size=batch_size)[0]
    for _ in range(SMOKE_WARMUP_STEPS if args.smoke else WARMUP_STEPS):
        training.step(batch)

    rows = []
    ratios = {}
    for mechanism in ACCOUNTANTS:
        for steps in step_counts:
            compute_epsilon = make_epsilon(mechanism, steps=steps, sample_rate=sample_rate)
            # One training step, then one epsilon, in turn, so that both see the same
            # quiet moments. The best times are compared because load from other processes
            # slows torch's two threads far more than the single-threaded accountant.
            pairs = [
                (seconds(lambda: training.step(batch)), seconds(compute_epsilon))
                for _ in range(repeats)
            ]
            step_seconds = min(pair[0] for pair in pairs)
            epsilon_seconds = min(pair[1] for pair in pairs)
            ratio = epsilon_seconds / step_seconds
            ratios[mechanism, steps] = ratio
            rows.append(
                [
                    mechanism,
                    f"{steps:,}",
                    f"{epsilon_seconds * 1e3:.2f}",
                    f"{step_seconds * 1e3:.1f}",
                    f"{ratio:.3f}",
                ]
            )
            print(f"{mechanism} after {steps} steps: {ratio:.3f} steps", flush=True)

    (slowest, slowest_steps), largest = max(ratios.items(), key=lambda item: item[1])
    lines = [*common.environment_lines(load_at_start), f"- Allocator: {allocator}", ""]
    if args.smoke:
        lines += [
            f"Smoke run: the tiny MLP, few accountant steps and {repeats} repeats; the times "
            "mean nothing.",
            "",
        ]
    lines += common.markdown_table(
        [
            "accountant", "steps accounted", "epsilon (ms)", "training step (ms)",
            "epsilon / step",
        ],
        rows,
    )
    lines += [
        "",
        "Estimated cost at the defaults `log_every=1` and "
        f"`epsilon_every={DEFAULT_EPSILON_EVERY}`: one epsilon every {DEFAULT_EPSILON_EVERY} "
        "training steps takes at most "
        f"{largest / DEFAULT_EPSILON_EVERY:.2%} of training time, for {slowest} after "
        f"{slowest_steps:,} steps. A larger `log_every` divides this further.",
        "",
        f"The training step is one forward, backward, `optimizer.step()` and `zero_grad()` of "
        f"the {spec.name} at batch {batch_size} under Opacus, in hooks mode with flat clipping "
        f"and noise multiplier {common.NOISE_MULTIPLIER}. Each accountant has recorded the "
        f"given number of steps at sample rate {batch_size} / {DATASET_SIZE:,} = "
        f"{sample_rate:.5f}. Epsilon, for delta = {DELTA:g}, is computed as the callback does: "
        "`check_epsilon_cost`, which sizes the PRV mesh, then `get_epsilon`. The step and "
        f"epsilon run in turn {repeats} times, and each time is the best of its {repeats} calls.",
    ]
    common.write_section(args.results, "accountant_cost", "Accountant cost", lines)


if __name__ == "__main__":
    sys.exit(main())
