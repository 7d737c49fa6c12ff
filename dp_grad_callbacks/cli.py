"""The ``dp-grad-callbacks`` command line: dry runs, run summaries, plots and export.

Exit status: 0 on success, 2 when the command line is invalid, 1 when the command fails on
the files it reads or writes. Every error is one line on stderr, without a traceback
unless ``--traceback`` is given.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn, TextIO

from . import __version__
from .dryrun import ACCOUNTANTS, PrivacySettings, dry_run
from .epsilon import AccountantError, EpsilonCostError
from .runs import RunReadError, RunSummary, describe_steps, load_norm_series, select_series
from .synthetic import DEFAULT_MEDIAN_RATIO, DEFAULT_SIGMA

PROG = "dp-grad-callbacks"
MAX_DPI = 1000
MIN_CLIPPING_BOUND = 1e-30
MAX_CLIPPING_BOUND = 1e30
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2

IMAGE_SUFFIXES = (".png", ".svg", ".pdf")

_EPILOG = (
    "Exit status: 0 on success, 2 for an invalid command line, 1 when the command fails "
    "on the files it reads or writes."
)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line on stderr, with exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line with ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    command: Callable[[argparse.Namespace], int] = args.handler
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            return command(args)
        except BrokenPipeError:
            # The reader of stdout went away, as `summary | head` does. Point stdout at
            # devnull so that the flush at exit does not raise again.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return EXIT_FAILURE
        except (
            RunReadError, OSError, ModuleNotFoundError, EpsilonCostError, AccountantError
        ) as error:
            # OSError covers missing log directories and unwritable outputs, and
            # ModuleNotFoundError a missing optional extra such as matplotlib. The epsilon
            # errors come from accountant parameters that the dry run cannot account for.
            _print_error(args, str(error))
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - one line instead of a traceback
            hint = "" if args.traceback else " (rerun with --traceback for details)"
            _print_error(args, f"unexpected {type(error).__name__}: {error}{hint}")
    return EXIT_FAILURE


def build_parser() -> argparse.ArgumentParser:
    """Build the parser of the command line and its four subcommands."""
    parser = _Parser(
        prog=PROG,
        description=(
            "Preview DP-SGD gradient-norm dashboards and privacy budgets without data, and "
            "inspect the per-sample gradient norms that a training run logged to TensorBoard."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--traceback",
        action="store_true",
        help="print the full traceback of an unexpected error (default: one line)",
    )
    subparsers = parser.add_subparsers(
        title="commands", dest="command", required=True, metavar="COMMAND", parser_class=_Parser
    )
    _add_dry_run(subparsers)
    _add_summary(subparsers)
    _add_plot(subparsers)
    _add_export(subparsers)
    return parser


# ---------------------------------------------------------------------- dry-run


def _add_dry_run(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "dry-run",
        help="write synthetic gradient norms, and epsilon per step, of a simulated run",
        description=(
            "Simulate DP-SGD training without data or a model: write the TensorBoard tags of "
            "the callback's dry-run mode (<prefix>/synthetic/...) for log-normal per-sample "
            "gradient norms. With --noise-multiplier and --sample-rate or --dataset-size, also "
            "write the scalar privacy/epsilon, the budget spent after each step. A progress "
            "bar shows on stderr when it is a terminal."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument(
        "--logdir", type=_directory, default=None,
        help="directory of the run's event files, created if missing "
        "(default: runs/dry-run-<date>-<time>, so that runs never mix)",
    )
    parser.add_argument(
        "--max-grad-norm", type=_clipping_bound, default=1.0, metavar="C",
        help="clipping bound C, in gradient-norm units (default: %(default)s)",
    )
    parser.add_argument(
        "--batch-size", type=_positive_int, default=256, metavar="N",
        help="samples per step (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=1000, metavar="N",
        help="number of simulated optimizer steps (default: %(default)s)",
    )
    parser.add_argument(
        "--log-every", type=_positive_int, default=1, metavar="STEPS",
        help="steps between logged steps; step 0 is always logged (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=_non_negative_int, default=None, metavar="N",
        help="seed of the synthetic norms (default: fresh entropy, a different run each time)",
    )
    parser.add_argument(
        "--tag-prefix", default="grad_norm", metavar="PREFIX",
        help="prefix of the gradient-norm tags (default: %(default)s)",
    )

    norms = parser.add_argument_group("synthetic norms (log-normal)")
    norms.add_argument(
        "--median-ratio", type=_positive_float, default=DEFAULT_MEDIAN_RATIO, metavar="RATIO",
        help="median norm as a multiple of C (default: exp(-0.5) = %(default).4f)",
    )
    norms.add_argument(
        "--sigma", type=_positive_float, default=DEFAULT_SIGMA,
        help="standard deviation of the natural logarithm of the norms (default: %(default)s)",
    )

    privacy = parser.add_argument_group(
        "privacy budget",
        "Epsilon is written only when --noise-multiplier and a sampling rate are given.",
    )
    privacy.add_argument(
        "--noise-multiplier", type=_positive_float, default=None, metavar="Z",
        help="noise standard deviation as a multiple of C (default: none, no epsilon)",
    )
    rates = privacy.add_mutually_exclusive_group()
    rates.add_argument(
        "--sample-rate", type=_probability, default=None, metavar="Q",
        help="probability that an example is in a batch, in (0, 1] (default: none)",
    )
    rates.add_argument(
        "--dataset-size", type=_positive_int, default=None, metavar="N",
        help="number of training examples; the sample rate is then batch size / N "
        "(default: none)",
    )
    privacy.add_argument(
        "--delta", type=_open_unit_interval, default=1e-5,
        help="delta of the (epsilon, delta) guarantee, in (0, 1) (default: %(default)g)",
    )
    privacy.add_argument(
        "--accountant", choices=ACCOUNTANTS, default="rdp",
        help="Opacus accountant that computes epsilon (default: %(default)s)",
    )
    privacy.add_argument(
        "--epsilon-every", type=_positive_int, default=None, metavar="STEPS",
        help="steps between epsilon values; the last step always gets one (default: every "
        "step for rdp, steps/100 for gdp and steps/20 for prv, rounded up, because their "
        "cost per value is much higher)",
    )
    parser.set_defaults(handler=_run_dry_run)


def _run_dry_run(args: argparse.Namespace) -> int:
    privacy = _privacy_settings(args)
    if args.logdir is None:
        args.logdir = Path("runs") / time.strftime("dry-run-%Y%m%d-%H%M%S")
    if not args.tag_prefix.strip("/"):
        _usage_error(args, f"argument --tag-prefix: expected a non-empty tag, got {args.tag_prefix!r}")

    try:
        result = dry_run(
            args.logdir,
            max_grad_norm=args.max_grad_norm,
            batch_size=args.batch_size,
            steps=args.steps,
            log_every=args.log_every,
            tag_prefix=args.tag_prefix,
            median_ratio=args.median_ratio,
            sigma=args.sigma,
            seed=args.seed,
            privacy=privacy,
            progress=True,
        )
    except OSError as error:
        raise OSError(f"failed to write the log directory {args.logdir}: {_reason(error)}") from error

    print(
        f"wrote {args.steps} steps of synthetic gradient norms ({result.logged_steps} logged) "
        f"to {args.logdir}"
    )
    if privacy is not None and result.epsilon is not None:
        print(
            f"epsilon after {args.steps} steps: {result.epsilon:.4g} at delta "
            f"{privacy.delta:g} ({privacy.accountant} accountant, sample rate "
            f"{privacy.sample_rate:.4g}, noise multiplier {privacy.noise_multiplier:g})"
        )
    print(f"view it with: tensorboard --logdir {args.logdir}")
    return EXIT_OK


def _privacy_settings(args: argparse.Namespace) -> PrivacySettings | None:
    has_rate = args.sample_rate is not None or args.dataset_size is not None
    if args.noise_multiplier is None:
        if has_rate:
            _usage_error(args, "--sample-rate and --dataset-size need --noise-multiplier")
        return None
    if not has_rate:
        _usage_error(args, "--noise-multiplier needs --sample-rate or --dataset-size")

    sample_rate = args.sample_rate
    if args.dataset_size is not None:
        if args.dataset_size < args.batch_size:
            _usage_error(
                args,
                f"argument --dataset-size: expected at least --batch-size "
                f"({args.batch_size}), got {args.dataset_size}",
            )
        sample_rate = args.batch_size / args.dataset_size
    return PrivacySettings(
        noise_multiplier=args.noise_multiplier,
        sample_rate=sample_rate,
        delta=args.delta,
        accountant=args.accountant,
        epsilon_every=args.epsilon_every,
    )


# ---------------------------------------------------------------------- summary


def _add_summary(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "summary",
        help="print one row of key numbers per run under a log directory",
        description=(
            "Print one row per run (and tag root) under LOGDIR: logged steps, synthetic or "
            "real norms, and the clipped fraction, median and p90 norm and C of the last "
            "logged step with samples. Also print a suggested C: the median of the per-step "
            "median norms over the recent steps."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument("logdir", type=Path, metavar="LOGDIR", help="TensorBoard log directory")
    parser.add_argument(
        "--json", action="store_true",
        help=(
            "print the same numbers as JSON, for scripts, with null for an infinite or NaN "
            "value (default: a table)"
        ),
    )
    parser.add_argument(
        "--recent-steps", type=_positive_int, default=10, metavar="STEPS",
        help="number of last logged steps with samples behind the suggested C "
        "(default: %(default)s)",
    )
    parser.set_defaults(handler=_run_summary)


def _run_summary(args: argparse.Namespace) -> int:
    series = load_norm_series(args.logdir)
    summaries = [item.summarize(recent_steps=args.recent_steps) for item in series]
    if args.json:
        document = {
            "logdir": os.fspath(args.logdir),
            "recent_steps": args.recent_steps,
            "runs": [asdict(summary) for summary in summaries],
        }
        print(_json(document))
        return EXIT_OK

    print(_format_table(summaries))
    print()
    note = (
        f"suggested C: the median of the per-step median norms over the last "
        f"{args.recent_steps} logged steps with samples. It is a suggestion, not a tuned "
        "value. Adaptive clipping (Andrew et al., 2021) found the median norm to work well "
        "as a clipping bound. Changing C changes the size of the clipped gradients, so "
        "retune the learning rate with it, for example scaled by old C / new C. Synthetic "
        "norms get no suggestion, because they are drawn relative to C."
    )
    print(textwrap.fill(note, width=88))
    return EXIT_OK


def _format_table(summaries: Sequence[RunSummary]) -> str:
    headers = (
        "run", "tag root", "norms", "logged steps", "last step", "clipped", "median", "p90",
        "C", "suggested C",
    )
    rows = [
        (
            summary.run,
            summary.tag_root,
            _norms_kind(summary),
            str(summary.logged_steps),
            _format_value(summary.last_step),
            _format_value(summary.clipped_fraction, percent=True),
            _format_value(summary.median),
            _format_value(summary.p90),
            _format_value(summary.max_grad_norm),
            _format_value(summary.suggested_max_grad_norm),
        )
        for summary in summaries
    ]
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in (headers, *rows)]
    return "\n".join(lines)


def _norms_kind(summary: RunSummary) -> str:
    kind = "synthetic" if summary.synthetic else "real"
    if summary.histogram_noise is not None:
        kind += f", noisy s={summary.histogram_noise:g}"
    return kind


def _format_value(value: float | int | None, *, percent: bool = False) -> str:
    if value is None:
        return "-"
    if isinstance(value, int):
        return str(value)
    if percent:
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


# ---------------------------------------------------------------------- plot


def _add_plot(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "plot",
        help="draw a run's histograms and per-step scalars to an image",
        description=(
            "Draw the before- and after-clipping histograms of the chosen steps on one axis, "
            "with C marked, above the clipped fraction and the median and p90 norms over all "
            "logged steps. Needs matplotlib: pip install 'dp-grad-callbacks[plot]'."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument("logdir", type=Path, metavar="LOGDIR", help="TensorBoard log directory")
    parser.add_argument(
        "--out", type=_image_path, required=True, metavar="FILE",
        help=f"image to write; the suffix ({', '.join(IMAGE_SUFFIXES)}) sets the format",
    )
    parser.add_argument(
        "--step", type=_non_negative_int, action="append", dest="steps", metavar="N",
        help="logged step whose histograms to draw; repeat for several "
        "(default: the last logged step with a finite norm)",
    )
    _add_series_options(parser)
    parser.add_argument(
        "--dpi", type=_dpi, default=100,
        help=f"pixels per inch of the 8 x 9 inch image, at most {MAX_DPI} (default: %(default)s)",
    )
    parser.set_defaults(handler=_run_plot)


def _run_plot(args: argparse.Namespace) -> int:
    # Imported here so that the other commands do not import the plotting code.
    from .plot import plot_series

    series = select_series(
        load_norm_series(args.logdir, run=args.run), run=args.run, tag_root=args.tag_root
    )
    steps = args.steps
    if steps is None and not series.steps_with_histograms:
        raise RunReadError(
            f"no logged step with a finite norm in {series.label}, so nothing to plot"
        )
    try:
        plot_series(series, args.out, steps=steps, dpi=args.dpi)
    except OSError as error:
        raise OSError(f"failed to write {args.out}: {_reason(error)}") from error

    drawn_steps = steps if steps is not None else series.steps_with_histograms[-1:]
    print(f"wrote {args.out} ({series.label}, steps {describe_steps(drawn_steps)})")
    return EXIT_OK


# ---------------------------------------------------------------------- export


def _add_export(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "export",
        help="write one step's histograms as JSON point lists",
        description=(
            'Write {"before_clipping": [...], "after_clipping": [...]} for one logged step, '
            'each a list of {"x": norm, "y": density} points sorted by x, one per histogram '
            "bucket: x is the bucket's midpoint and y the density of the norms there. This is "
            "the format of dp_grad_callbacks.synthetic.generate_gradient_info. A step "
            "without samples gives empty lists, and an infinite or NaN value is null, "
            "because JSON has no such numbers."
        ),
        epilog=_EPILOG,
    )
    parser.add_argument("logdir", type=Path, metavar="LOGDIR", help="TensorBoard log directory")
    parser.add_argument(
        "--step", type=_non_negative_int, default=None, metavar="N",
        help="logged step to export (default: the last logged step with a finite norm)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="FILE",
        help="JSON file to write (default: standard output)",
    )
    _add_series_options(parser)
    parser.set_defaults(handler=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    series = select_series(
        load_norm_series(args.logdir, run=args.run), run=args.run, tag_root=args.tag_root
    )
    step = args.step
    if step is None:
        step = (series.steps_with_histograms or series.logged_steps)[-1]
    text = _json(series.gradient_info(step))

    if args.out is None:
        print(text)
        return EXIT_OK
    try:
        args.out.write_text(text + "\n", encoding="utf-8")
    except OSError as error:
        raise OSError(f"failed to write {args.out}: {_reason(error)}") from error
    print(f"wrote {args.out} ({series.label}, step {step})", file=sys.stderr)
    return EXIT_OK


def _add_series_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--run", default=None, metavar="NAME",
        help="run to read, as a path relative to LOGDIR (default: the only run with "
        "gradient-norm tags)",
    )
    parser.add_argument(
        "--tag-root", default=None, metavar="ROOT",
        help="tag root of the series, such as grad_norm or grad_norm/synthetic (default: the "
        "only one in the run)",
    )


# ---------------------------------------------------------------------- values and errors


def _json(document: Any) -> str:
    """Return ``document`` as standard JSON, with null for each infinite or NaN float."""

    def finite(value: Any) -> Any:
        if isinstance(value, float):
            return value if math.isfinite(value) else None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(document), indent=2, allow_nan=False)


def _positive_int(text: str) -> int:
    value = _parse(text, int, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _dpi(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_DPI:
        raise argparse.ArgumentTypeError(f"expected at most {MAX_DPI} pixels per inch, got {text!r}")
    return value


def _directory(text: str) -> Path:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory path, got an empty string")
    return Path(text)


def _clipping_bound(text: str) -> float:
    value = _positive_float(text)
    # TensorBoard stores scalars as float32, whose range the bucket limits C/1000 to
    # 100 C and the norms around C must stay well inside.
    if not MIN_CLIPPING_BOUND <= value <= MAX_CLIPPING_BOUND:
        raise argparse.ArgumentTypeError(
            f"expected a clipping bound between {MIN_CLIPPING_BOUND:g} and "
            f"{MAX_CLIPPING_BOUND:g}, got {text!r}"
        )
    return value


def _non_negative_int(text: str) -> int:
    value = _parse(text, int, "a non-negative integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = _parse(text, float, "a finite positive number")
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite positive number, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = _parse(text, float, "a number in (0, 1]")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


def _open_unit_interval(text: str) -> float:
    value = _parse(text, float, "a number in (0, 1)")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def _image_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise argparse.ArgumentTypeError(
            f"expected a file name ending in {', '.join(IMAGE_SUFFIXES)}, got {text!r}"
        )
    return path


def _parse(text: str, kind: type[int] | type[float], expected: str) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def _usage_error(args: argparse.Namespace, message: str) -> NoReturn:
    print(f"{PROG} {args.command}: error: {message} (see --help)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


def _print_error(args: argparse.Namespace, message: str) -> None:
    print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
    if args.traceback:
        traceback.print_exc()


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    text = " ".join(str(message).split())
    print(f"{PROG}: warning: {text}", file=sys.stderr)
