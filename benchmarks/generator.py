"""Time the vectorised synthetic-norm generator against a plain Python loop.

The loop draws each log-normal norm with its own Box-Muller transform from two uniform
numbers, as the generator's first version did. That version drew them one at a time from
numpy's global ``RandomState``, and the loop draws them the same way from a seeded
``RandomState`` of its own, with ``random_sample()``, numpy's cheapest call for one uniform
number. It differs from the first version only where that version was wrong: it cannot take
the logarithm of 0, and it adds no jitter to the density. Neither side touches global random
state.

Run ``python benchmarks/generator.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import common
from dp_grad_callbacks.synthetic import (
    DEFAULT_MEDIAN_RATIO,
    DEFAULT_SIGMA,
    generate_gradient_norms,
    sample_gradient_norms,
)

CLIPPING_NORM = 1.0
POINTS = 100_000
SMOKE_POINTS = 1_000
REPEATS = 5
TARGET_SPEEDUP = 100.0


def loop_norms(clipping_norm: float, num_points: int, seed: int) -> list[float]:
    """Draw log-normal norms one point at a time with the Box-Muller transform."""
    rng = np.random.RandomState(seed)
    mu = math.log(clipping_norm * DEFAULT_MEDIAN_RATIO)
    norms = []
    for _ in range(num_points):
        u1 = 1.0 - rng.random_sample()  # in (0, 1], so the logarithm is finite
        u2 = rng.random_sample()
        z = math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)
        norms.append(math.exp(mu + DEFAULT_SIGMA * z))
    return norms


def loop_points(clipping_norm: float, num_points: int, seed: int) -> list[dict[str, float]]:
    """Draw norms with :func:`loop_norms` and pair each with its log-normal density, sorted."""
    mu = math.log(clipping_norm * DEFAULT_MEDIAN_RATIO)
    scale = 1.0 / (DEFAULT_SIGMA * math.sqrt(2.0 * math.pi))
    points = []
    for x in loop_norms(clipping_norm, num_points, seed):
        z = (math.log(x) - mu) / DEFAULT_SIGMA
        points.append({"x": x, "y": scale * math.exp(-0.5 * z * z) / x})
    points.sort(key=lambda point: point["x"])
    return points


def best_time(function: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Return the shortest wall time of ``repeats`` calls, in seconds, and the last result."""
    best = math.inf
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def log_moments(norms: Any) -> str:
    """Return the mean and standard deviation of ``ln(norm)`` as text."""
    logs = np.log(np.asarray(norms, dtype=np.float64))
    return f"{logs.mean():.3f} / {logs.std():.3f}"


def main() -> None:
    """Time both pairs of implementations and write the generator section."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    args = parser.parse_args()
    load_at_start = common.load_average()
    points = SMOKE_POINTS if args.smoke else POINTS
    repeats = 1 if args.smoke else REPEATS

    pairs = [
        (
            "norms as an array: `sample_gradient_norms`",
            lambda: sample_gradient_norms(CLIPPING_NORM, points, seed=0),
            lambda: loop_norms(CLIPPING_NORM, points, seed=0),
            lambda result: result,
        ),
        (
            "x/y points: `generate_gradient_norms`",
            lambda: generate_gradient_norms(CLIPPING_NORM, points, seed=0),
            lambda: loop_points(CLIPPING_NORM, points, seed=0),
            lambda result: [point["x"] for point in result],
        ),
    ]
    rows = []
    speedups = []
    per_point_ns = []
    for name, vectorised, loop, norms_of in pairs:
        vectorised_seconds, vectorised_result = best_time(vectorised, repeats)
        loop_seconds, loop_result = best_time(loop, repeats)
        speedup = loop_seconds / vectorised_seconds
        speedups.append(speedup)
        per_point_ns.append((1e9 * vectorised_seconds / points, 1e9 * loop_seconds / points))
        rows.append(
            [
                name,
                f"{1e3 * vectorised_seconds:.2f}",
                f"{1e3 * loop_seconds:.1f}",
                f"{speedup:.0f}x",
                log_moments(norms_of(vectorised_result)),
                log_moments(norms_of(loop_result)),
            ]
        )
        print(f"{name}: {speedup:.0f}x", flush=True)

    # Every numpy sampler must at least draw one standard normal per point, so this time
    # bounds the speed-up that any of them can reach against the same loop.
    normals_seconds, _ = best_time(
        lambda: np.random.default_rng(0).standard_normal(points), repeats
    )
    ceiling = 1e9 * normals_seconds / points

    expected = f"{math.log(CLIPPING_NORM * DEFAULT_MEDIAN_RATIO):.3f} / {DEFAULT_SIGMA:.3f}"
    verdict = "met" if speedups[0] >= TARGET_SPEEDUP else "**not met**"
    lines = [*common.environment_lines(load_at_start), ""]
    if args.smoke:
        lines += ["Smoke run: few points and one repeat; the times mean nothing.", ""]
    lines += common.markdown_table(
        [
            "what", "vectorised (ms)", "Python loop (ms)", "speed-up",
            "mean / std of ln(norm), vectorised", "same, loop",
        ],
        rows,
    )
    lines += [
        "",
        f"Target: the sampler at least {TARGET_SPEEDUP:.0f} times faster than the loop at "
        f"{POINTS:,} points; measured {speedups[0]:.0f}x at {points:,} points, {verdict}. "
        f"The sampler takes {per_point_ns[0][0]:.0f} ns per point and the loop "
        f"{per_point_ns[0][1]:.0f} ns. numpy's `Generator.standard_normal` alone takes "
        f"{ceiling:.0f} ns per point, so no sampler built on numpy's normal draws can be more "
        f"than {per_point_ns[0][1] / ceiling:.0f} times faster than this loop on this machine.",
        "",
        f"Each time is the best of {repeats} calls at {points:,} points with C = {CLIPPING_NORM}. "
        f"Both sides draw ln(norm) from a normal distribution with mean and standard deviation "
        f"{expected}, which the last two columns check.",
    ]
    common.write_section(args.results, "generator", "Generator", lines)


if __name__ == "__main__":
    sys.exit(main())
