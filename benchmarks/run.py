"""Run every benchmark script in turn, each writing its own section of the results file.

Run ``python benchmarks/run.py --help`` for the options; ``--smoke`` and ``--results`` are
passed on to every script.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import common

SCRIPTS = {name: common.BENCHMARKS_DIR / f"{name}.py" for name in common.SECTIONS}


def main() -> int:
    """Run the chosen scripts and return the number of scripts that failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_common_arguments(parser)
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SCRIPTS),
        default=list(SCRIPTS),
        help="benchmarks to run (default: all, in this order)",
    )
    args = parser.parse_args()

    # Each script shows its command in the results, so pass only the options given here.
    options = ["--smoke"] if args.smoke else []
    if args.results != common.RESULTS_PATH:
        options += ["--results", str(args.results)]
    failed = []
    for name in args.only:
        print(f"--- {name}", flush=True)
        completed = subprocess.run([sys.executable, str(SCRIPTS[name]), *options], check=False)
        if completed.returncode != 0:
            failed.append(name)
            print(f"{name} failed with exit code {completed.returncode}", file=sys.stderr)
    return len(failed)


if __name__ == "__main__":
    sys.exit(main())
