"""Draw a run's gradient-norm histograms and per-step scalars to an image file with matplotlib.

matplotlib is an optional dependency (the ``plot`` extra) and is imported only when a plot
is drawn.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .runs import HISTOGRAM_NAMES, NormSeries, bucket_edges

INSTALL_HINT = "pip install 'dp-grad-callbacks[plot]'"

_COLOURS = {"before_clipping": "tab:blue", "after_clipping": "tab:orange"}


def plot_series(
    series: NormSeries,
    out: str | os.PathLike[str],
    *,
    steps: Sequence[int] | None = None,
    dpi: int = 100,
) -> None:
    """Draw the histograms of ``steps`` above the clipped fraction and norm quantiles.

    The top panel shows the before- and after-clipping histograms of each chosen step on
    one logarithmic norm axis, as the share of the step's samples per decade of norm, with
    C marked. The panels below show the clipped fraction, then the median and p90 norms and
    C on a logarithmic axis, over all logged steps. The file format follows the suffix of
    ``out``.

    Args:
        series: The run and tag root to draw.
        out: Image file to write.
        steps: Logged steps whose histograms to draw; None for the last step with a finite norm.
        dpi: Pixels per inch of the image, which is 8 x 9 inches.

    Raises:
        ModuleNotFoundError: If matplotlib is not installed; the message names the pip
            command that installs it.
        RunReadError: If a step is not a logged step of ``series``.
        OSError: If ``out`` cannot be written.
    """
    figure_class = _import_figure()
    if steps is None:
        steps = series.steps_with_histograms[-1:]
    for step in steps:
        series.check_step(step)

    figure = figure_class(figsize=(8, 9), dpi=dpi, layout="constrained")
    histogram_axes, fraction_axes, norm_axes = figure.subplots(3, 1, height_ratios=(3, 1.4, 2))
    kind = "synthetic norms" if series.synthetic else "real norms"
    noise = series.scalars("histogram_noise")
    if noise:
        kind += f", noisy counts with s = {noise[max(noise)]:g}"
    figure.suptitle(f"{series.path}: {series.tag_root} ({kind})")

    _draw_histograms(histogram_axes, series, steps)
    _draw_clipped_fraction(fraction_axes, series)
    _draw_quantiles(norm_axes, series)
    norm_axes.sharex(fraction_axes)
    fraction_axes.tick_params(labelbottom=False)
    figure.savefig(os.fspath(out))


def _import_figure() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ModuleNotFoundError(
            f"plotting needs matplotlib, which is not installed. Install it with: {INSTALL_HINT}"
        ) from error
    return Figure


def _draw_histograms(axes: Any, series: NormSeries, steps: Sequence[int]) -> None:
    histograms = {name: series.histograms(name) for name in HISTOGRAM_NAMES}
    bounds = series.scalars("max_grad_norm")
    line_styles = ("-", "--", ":", "-.")

    for index, step in enumerate(steps):
        style = line_styles[index % len(line_styles)]
        for name in HISTOGRAM_NAMES:
            histogram = histograms[name].get(step)
            if histogram is None or histogram.num <= 0:
                continue
            lower, upper = bucket_edges(histogram)
            if lower[0] <= 0:
                # A zero norm has no place on a log axis, so its bucket is drawn one
                # decade wide below its upper limit instead.
                lower[0] = upper[0] / 10
            # Share per decade, so that on the log axis each bar's area is its share of
            # samples, also for the open outer buckets that span several decades.
            decades = np.log10(upper / lower)
            shares = np.asarray(histogram.bucket, dtype=np.float64) / histogram.num / decades
            edges = np.append(lower, upper[-1])
            label = f"{name.replace('_', ' ')}, step {step}"
            # Below C both histograms coincide, so the norms before clipping are a filled
            # area and those after clipping a line over it.
            filled = name == "before_clipping"
            axes.stairs(shares, edges, color=_COLOURS[name], linestyle=style, label=label,
                        fill=filled, alpha=0.35 if filled else 1.0)

    for bound in sorted({bounds[step] for step in steps if step in bounds}):
        axes.axvline(bound, color="black", linewidth=1, linestyle="--")
        axes.annotate(
            f"C = {bound:g}",
            xy=(bound, 1),
            xycoords=("data", "axes fraction"),
            xytext=(3, -12),
            textcoords="offset points",
        )

    axes.set_xscale("log")
    axes.set_xlabel("per-sample gradient norm")
    axes.set_ylabel("share of samples per decade")
    if axes.get_legend_handles_labels()[0]:
        axes.legend(loc="upper left")
    else:
        axes.text(0.5, 0.5, "no samples in the chosen steps", transform=axes.transAxes,
                  ha="center")


def _draw_clipped_fraction(axes: Any, series: NormSeries) -> None:
    fractions = series.scalars("clipped_fraction")
    steps = sorted(fractions)
    axes.plot(steps, [fractions[step] for step in steps], color="tab:red")
    axes.set_ylim(-0.02, 1.02)
    axes.set_ylabel("clipped fraction")
    axes.grid(alpha=0.3)


def _draw_quantiles(axes: Any, series: NormSeries) -> None:
    for name, colour in (("median", "tab:blue"), ("p90", "tab:purple"), ("max_grad_norm", "black")):
        values = series.scalars(name)
        steps = sorted(values)
        label = "C" if name == "max_grad_norm" else f"{name} norm"
        style = "--" if name == "max_grad_norm" else "-"
        axes.plot(steps, [values[step] for step in steps], color=colour, linestyle=style,
                  label=label)
    axes.set_yscale("log")
    axes.set_xlabel("step")
    axes.set_ylabel("norm before clipping")
    axes.legend(loc="best")
    axes.grid(alpha=0.3)
