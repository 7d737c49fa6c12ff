"""Measure what ``PrivacyEngine.get_epsilon`` costs against one DP-SGD training step.

The callback computes epsilon every ``epsilon_every`` logged steps, and this script sizes
that default. It times, in one process:

* one step of the 64 -> 512 x3 -> 10 MLP at batch 256 under Opacus (hooks mode, flat
  clipping, random data), and
* ``get_epsilon(delta)`` of each accountant after 100, 1,000 and 10,000 steps at the sample
  rate of batch 256 out of 60,000 examples,

in turn, and prints the medians as a Markdown table. Run, with a retaining allocator so that
freed per-sample gradients do not turn into page faults in the next step::

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2 \\
    MALLOC_CONF=dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true \\
    python benchmarks/accountant_cost.py
"""

from __future__ import annotations

import platform
import statistics
import time
import warnings
from typing import Callable

import opacus
import torch
from opacus import PrivacyEngine
from opacus.accountants import create_accountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

BATCH_SIZE = 256
DATASET_SIZE = 60_000
NOISE_MULTIPLIER = 1.0
DELTA = 1e-5
REPEATS = 7
WARMUP_STEPS = 5


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )


def make_private_step() -> Callable[[], None]:
    """Return a function that runs one optimizer step of the MLP under Opacus."""
    torch.manual_seed(0)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(BATCH_SIZE, 64)
    y = torch.randint(0, 10, (BATCH_SIZE,))
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = PrivacyEngine(accountant="rdp").make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=1.0, poisson_sampling=False,
        )
    criterion = nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()

    return step


def make_epsilon(mechanism: str, steps: int) -> Callable[[], None]:
    """Return a function that computes epsilon of an accountant after ``steps`` equal steps."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the GDP accountant warns that it is experimental
        accountant = create_accountant(mechanism)
    accountant.history = [(NOISE_MULTIPLIER, BATCH_SIZE / DATASET_SIZE, steps)]
    return lambda: accountant.get_epsilon(delta=DELTA)


def seconds(function: Callable[[], None]) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def main() -> None:
    step = make_private_step()
    for _ in range(WARMUP_STEPS):
        step()
    print(f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, opacus {opacus.__version__}\n")
    print("| accountant | steps | get_epsilon (ms) | step (ms) | get_epsilon / step |")
    print("|---|---|---|---|---|")
    for mechanism in ("rdp", "gdp", "prv"):
        for steps in (100, 1_000, 10_000):
            epsilon = make_epsilon(mechanism, steps)
            # One step, then one epsilon, in turn, so that load from other processes
            # slows both alike and the ratio stays comparable.
            pairs = [(seconds(step), seconds(epsilon)) for _ in range(REPEATS)]
            step_time = statistics.median(p[0] for p in pairs)
            epsilon_time = statistics.median(p[1] for p in pairs)
            ratio = statistics.median(p[1] / p[0] for p in pairs)
            print(f"| {mechanism} | {steps} | {epsilon_time * 1e3:.1f} | "
                  f"{step_time * 1e3:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
