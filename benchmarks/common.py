"""Helpers shared by the benchmark scripts: models, Opacus set-up, environment, RESULTS.md.

The scripts in this folder import this module by its file name, so run them as
``python benchmarks/<name>.py`` from the repository root, with the package installed.
"""

from __future__ import annotations

import argparse
import inspect
import os
import platform
import re
import shlex
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import opacus
import tensorboard
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dp_grad_callbacks
from dp_grad_callbacks import GradNormCallback

BENCHMARKS_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCHMARKS_DIR / "RESULTS.md"

# Order of the sections in RESULTS.md, whichever script writes first.
SECTIONS = ("overhead", "memory", "events", "generator", "accountant_cost", "flush_cost")

Allocator = Literal["auto", "jemalloc", "system"]

# A retaining allocator keeps freed pages mapped, so the hundreds of MB of per-sample
# gradients freed after every step are not returned to the kernel and faulted in again.
# Without it, page faults make step times vary by a factor of two on 2-core VMs.
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1,retain:true"
JEMALLOC_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/lib/libjemalloc.so.2",
)

GradSampleMode = Literal["hooks", "ghost"]
MAX_GRAD_NORM = 1.0
NOISE_MULTIPLIER = 1.0


# ---------------------------------------------------------------------- command line


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the options every benchmark script takes: ``--smoke`` and ``--results``."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="run tiny sizes in seconds to check that the script works; the numbers mean nothing",
    )
    parser.add_argument(
        "--results",
        type=results_path,
        default=RESULTS_PATH,
        help="Markdown file whose section for this benchmark is replaced (default: %(default)s)",
    )


def results_path(text: str) -> Path:
    """Convert ``--results`` to a path, rejecting one that cannot be written as a file.

    Checked when the command line is parsed, so that a bad path fails before a benchmark
    runs for minutes and not when its results are written.

    Raises:
        argparse.ArgumentTypeError: If the path is a directory, or its parent directory
            does not exist.
    """
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a Markdown file, got the directory {text!r}. "
            f"Name a file in it, such as {str(path / RESULTS_PATH.name)!r}"
        )
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(
            f"expected a file in an existing directory, got {text!r}, but the directory "
            f"{str(path.parent)!r} does not exist. Create it first"
        )
    return path


def positive_int(text: str) -> int:
    """Convert an option's value to an integer of at least 1, for ``type=`` in argparse.

    Raises:
        argparse.ArgumentTypeError: If the value is not an integer or is below 1.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_allocator_argument(parser: argparse.ArgumentParser) -> None:
    """Add ``--allocator``, for scripts whose numbers depend on the memory allocator."""
    parser.add_argument(
        "--allocator",
        choices=("auto", "jemalloc", "system"),
        default="auto",
        help="'jemalloc' restarts the script with Debian's libjemalloc2 preloaded in retaining "
        "mode; 'auto' does so when the library is installed; 'system' keeps glibc malloc",
    )


def use_allocator(allocator: Allocator) -> str:
    """Restart this script under jemalloc when requested, and describe the allocator in use.

    Returns:
        A one-line description for RESULTS.md.

    Raises:
        SystemExit: If ``allocator`` is ``"jemalloc"`` and the library is not installed.
    """
    loaded = _loaded_jemalloc()
    if loaded is not None:
        conf = os.environ.get("MALLOC_CONF", "(jemalloc defaults)")
        return f"jemalloc ({loaded}, MALLOC_CONF={conf})"
    if allocator == "system":
        return "system malloc (glibc)"

    library = next((path for path in JEMALLOC_PATHS if os.path.exists(path)), None)
    if library is None:
        if allocator == "jemalloc":
            raise SystemExit(
                "--allocator jemalloc: libjemalloc.so.2 not found in "
                f"{', '.join(JEMALLOC_PATHS)}; install it with 'apt-get install libjemalloc2'"
            )
        return "system malloc (glibc); libjemalloc2 is not installed, so times are noisier"

    environment = dict(os.environ)
    preload = environment.get("LD_PRELOAD", "")
    environment["LD_PRELOAD"] = f"{library} {preload}".strip()
    environment["MALLOC_CONF"] = JEMALLOC_CONF
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], environment)
    raise AssertionError("os.execve returned")  # pragma: no cover


def _loaded_jemalloc() -> str | None:
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                if "libjemalloc" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


# ---------------------------------------------------------------------- environment


def cpu_model() -> str:
    """Return the CPU model name from ``/proc/cpuinfo``, or the processor name from ``platform``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_total_gib() -> float | None:
    """Return the machine's memory in GiB from ``/proc/meminfo``, or None elsewhere."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages as text, or "unknown"."""
    try:
        return " / ".join(f"{value:.2f}" for value in os.getloadavg())
    except OSError:
        return "unknown"


def git_commit() -> str:
    """Return the repository's short commit hash, with ``+changes`` for a dirty tree.

    Changes to RESULTS.md do not count, because the benchmarks write it themselves.
    """
    root = BENCHMARKS_DIR.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no",
             "--", ".", f":(exclude){RESULTS_PATH.relative_to(root)}"],
            capture_output=True, text=True, check=True, timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}+changes" if dirty else commit


def environment_lines(load_at_start: str) -> list[str]:
    """Describe the machine, library versions and command as Markdown list items."""
    memory = memory_total_gib()
    memory_text = f", {memory:.0f} GiB memory" if memory is not None else ""
    command = shlex.join(["python", *_relative_argv()])
    return [
        f"- Command: `{command}`",
        f"- Machine: {cpu_model()}, {os.cpu_count()} logical cores{memory_text}, "
        f"{platform.system()} {platform.release()}; torch uses {torch.get_num_threads()} threads",
        f"- Load average (1 / 5 / 15 min): {load_at_start} at start, {load_average()} at end",
        f"- Versions: Python {platform.python_version()}, torch {torch.__version__}, "
        f"opacus {opacus.__version__}, numpy {np.__version__}, tensorboard {tensorboard.__version__}, "
        f"dp-grad-callbacks {dp_grad_callbacks.__version__} at commit {git_commit()}",
    ]


def _relative_argv() -> list[str]:
    script = Path(sys.argv[0]).resolve()
    try:
        shown = str(script.relative_to(BENCHMARKS_DIR.parent))
    except ValueError:
        shown = str(script)
    return [shown, *sys.argv[1:]]


# ---------------------------------------------------------------------- RESULTS.md

_HEADER = """# Benchmark results

Written by the scripts in `benchmarks/`; each script replaces its own section. Rerun one with
the command given in its section, or all of them with `python benchmarks/run.py`.
"""


def write_section(path: Path, name: str, title: str, lines: list[str]) -> None:
    """Replace the section ``name`` of the Markdown file at ``path``, creating the file if needed.

    Sections are delimited by HTML comments, so the rest of the file stays as it is, and a
    new section is placed in the order of :data:`SECTIONS`.
    """
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = "\n".join([begin, f"## {title}", "", *lines, end])
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER

    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = _insert_section(text, name, block)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    print(f"wrote the {name} section of {path}")


def _insert_section(text: str, name: str, block: str) -> str:
    later = SECTIONS[SECTIONS.index(name) + 1 :] if name in SECTIONS else ()
    for other in later:
        marker = f"<!-- begin {other} -->"
        if marker in text:
            return text.replace(marker, f"{block}\n\n{marker}", 1)
    return f"{text.rstrip()}\n\n{block}\n"


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Format a Markdown table; every row has one cell per header column."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


# ---------------------------------------------------------------------- models


def tiny_mlp() -> nn.Module:
    """Return the MLP of the tests: 6 inputs, 8 hidden units, 3 classes."""
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def wide_mlp() -> nn.Module:
    """Return an MLP with 64 inputs, three hidden layers of 512 units and 10 classes."""
    return nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 512), nn.ReLU(),
        nn.Linear(512, 10),
    )


def conv_net() -> nn.Module:
    """Return a small convolutional net for 1 x 28 x 28 images and 10 classes."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: how to build it, its input shape, class count and batch size."""

    name: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    classes: int
    batch_size: int


MODELS = {
    "tiny-mlp": ModelSpec("tiny-mlp", tiny_mlp, (6,), 3, 16),
    "wide-mlp": ModelSpec("wide-mlp", wide_mlp, (64,), 10, 256),
    "conv-net": ModelSpec("conv-net", conv_net, (1, 28, 28), 10, 64),
}


def make_batches(
    spec: ModelSpec, *, count: int, batch_size: int, seed: int = 0
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Draw ``count`` fixed batches of Gaussian inputs and uniform labels."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, *spec.input_shape, generator=generator),
            torch.randint(0, spec.classes, (batch_size,), generator=generator),
        )
        for _ in range(count)
    ]


@dataclass
class Training:
    """One model trained under Opacus, stepped one batch at a time by :meth:`step`."""

    engine: PrivacyEngine
    model: nn.Module
    optimizer: Any
    criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Run forward, backward and ``optimizer.step()``, then free the gradients."""
        x, y = batch
        loss = self.criterion(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        # Dropping the per-sample gradients here keeps one step's worth alive, not one per
        # variant of an interleaved benchmark.
        self.optimizer.zero_grad(set_to_none=True)


def make_training(
    spec: ModelSpec,
    *,
    batch_size: int,
    grad_sample_mode: GradSampleMode = "hooks",
    seed: int = 0,
) -> Training:
    """Build ``spec``'s model with seeded weights, made private by Opacus with SGD.

    Two calls with the same arguments give trainings that stay bitwise identical step for
    step, because both the weights and the noise generator are seeded.
    """
    torch.manual_seed(seed)
    model = spec.build()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    dataset = TensorDataset(*make_batches(spec, count=1, batch_size=batch_size, seed=seed)[0])
    with warnings.catch_warnings():
        # Opacus warns on every call that secure mode is off, which is what a benchmark wants.
        warnings.simplefilter("ignore")
        engine = PrivacyEngine()
        result = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(dataset, batch_size=batch_size),
            noise_multiplier=NOISE_MULTIPLIER,
            max_grad_norm=MAX_GRAD_NORM,
            poisson_sampling=False,
            grad_sample_mode=grad_sample_mode,
            noise_generator=torch.Generator().manual_seed(seed + 1),
        )
    if grad_sample_mode == "ghost":
        private_model, private_optimizer, criterion, _ = result
    else:
        private_model, private_optimizer, _ = result
        criterion = nn.CrossEntropyLoss()
    return Training(engine, private_model, private_optimizer, criterion)


def same_parameters(first: nn.Module, second: nn.Module) -> bool:
    """Tell whether two models' parameters are bitwise equal."""
    return all(
        torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters(), strict=True)
    )


# ---------------------------------------------------------------------- features


def supports_ghost() -> bool:
    """Tell whether ``GradNormCallback.attach`` takes the ``module`` that ghost clipping needs."""
    return "module" in inspect.signature(GradNormCallback.attach).parameters


def supports_private() -> bool:
    """Tell whether ``GradNormCallback`` has the ``privacy`` option."""
    return "privacy" in inspect.signature(GradNormCallback.__init__).parameters


def quiet_warnings() -> None:
    """Hide warnings that repeat at every step or attach and carry no information here."""
    # Opacus's full backward hooks warn on every step when the inputs need no gradient.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    # Raw norms warn at every attach that the DP guarantee does not cover them.
    raw_norms_warning = getattr(dp_grad_callbacks, "RawNormsWarning", None)
    if raw_norms_warning is not None:
        warnings.filterwarnings("ignore", category=raw_norms_warning)
