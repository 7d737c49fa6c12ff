"""The callback under DPDDP: two gloo processes on the CPU, with empty local batches.

Each process trains the same tiny MLP on its own shard of the data. Each step, every rank
draws its local batch by Poisson sampling (each example of its shard independently with
probability ``SAMPLE_RATE``), which is small enough that local batches are often empty.
Opacus 1.6's own distributed Poisson sampler skips an empty local batch, so one rank would
take fewer steps than the other and the gradient all-reduce would fail. This test therefore
draws the batches itself and feeds the empty ones through. Each local batch is split into physical
batches of at most ``PHYSICAL_BATCH`` with ``signal_skip_step``, as ``BatchMemoryManager``
does, so the ranks run different numbers of physical batches per logical step.

Each rank saves its local batch sizes, brute-force norms and records to a file; the test
process checks them and rank 0's event files.
"""

from __future__ import annotations

import pickle
import socket
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from opacus import PrivacyEngine
from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from torch import nn
from torch.utils.data import DataLoader

from conftest import make_dataset, make_mlp, read_events
from dp_grad_callbacks import GradNormCallback
from reference_norms import brute_force_param_norms, per_layer_clipped, total_norms

WORLD_SIZE = 2
STEPS = 8
DATASET_SIZE = 24
SAMPLE_RATE = 0.15
PHYSICAL_BATCH = 2
PER_LAYER_BOUNDS = [1.0, 0.5, 1.0, 0.05]
NAMES = ["0.weight", "0.bias", "2.weight", "2.bias"]

# Name -> (make_private options, callback options).
SCENARIOS = {
    "flat": ({"max_grad_norm": 0.5}, {"per_layer": True}),
    "per_layer": (
        {"clipping": "per_layer", "max_grad_norm": PER_LAYER_BOUNDS},
        {"per_layer": True, "log_every": 2},
    ),
    "ghost": ({"grad_sample_mode": "ghost", "max_grad_norm": 0.5}, {"per_layer": True}),
    "dry_run": ({"max_grad_norm": 0.5}, {"dry_run": True, "seed": 0}),
}
REAL = ["flat", "per_layer", "ghost"]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        # A rank that skips a collective makes the other fail here instead of hanging.
        timeout=timedelta(seconds=60),
    )
    try:
        for name, (options, callback_options) in SCENARIOS.items():
            results = _train(rank, Path(out_dir) / name, options, callback_options)
            with open(Path(out_dir) / f"{name}-rank{rank}.pkl", "wb") as file:
                pickle.dump(results, file)
    finally:
        dist.destroy_process_group()


def _train(rank: int, log_root: Path, options: dict, callback_options: dict) -> list[dict]:
    torch.manual_seed(0)
    model = DPDDP(make_mlp())
    dataset = make_dataset(DATASET_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = PrivacyEngine().make_private(
            module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(dataset, batch_size=4),
            noise_multiplier=1.0,
            poisson_sampling=False,
            noise_generator=torch.Generator().manual_seed(1),
            **options,
        )
    if len(result) == 4:
        model, optimizer, criterion, _ = result
    else:
        model, optimizer, _ = result
        criterion = nn.CrossEntropyLoss()

    callback = GradNormCallback(log_root / f"rank{rank}", fallback="raise", **callback_options)
    callback.attach(optimizer, model)
    generator = torch.Generator().manual_seed(100 + rank)
    shard = torch.arange(rank, DATASET_SIZE, WORLD_SIZE)
    inputs, targets = dataset.tensors
    results = []
    for _ in range(STEPS):
        chosen = shard[torch.rand(len(shard), generator=generator) < SAMPLE_RATE]
        x, y = inputs[chosen], targets[chosen]
        reference = brute_force_param_norms(model, x, y)
        chunks = list(zip(x.split(PHYSICAL_BATCH), y.split(PHYSICAL_BATCH))) or [(x, y)]
        for index, (x_chunk, y_chunk) in enumerate(chunks):
            optimizer.zero_grad()
            criterion(model(x_chunk), y_chunk).backward()
            if index < len(chunks) - 1:
                optimizer.signal_skip_step(do_skip=True)
            optimizer.step()
        record = callback.last_record
        results.append({"size": len(x), "reference": reference, "record": record})
    callback.close()
    return results


@pytest.fixture(scope="module")
def distributed_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("distributed")
    with pytest.MonkeyPatch.context() as patch:
        # Gloo connects the ranks over this interface, so nothing leaves the machine.
        patch.setenv("GLOO_SOCKET_IFNAME", "lo")
        mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    runs = {}
    for name in SCENARIOS:
        ranks = []
        for rank in range(WORLD_SIZE):
            with open(out_dir / f"{name}-rank{rank}.pkl", "rb") as file:
                ranks.append(pickle.load(file))
        runs[name] = ranks
    return out_dir, runs


def _global(ranks: list[list[dict]], step: int) -> tuple[int, dict[str, np.ndarray]]:
    """Return the global sample count and reference norms of a step, in rank order."""
    size = sum(rank[step]["size"] for rank in ranks)
    reference = {
        name: np.concatenate([rank[step]["reference"][name] for rank in ranks]) for name in NAMES
    }
    return size, reference


def _logged_steps(name: str) -> list[int]:
    log_every = SCENARIOS[name][1].get("log_every", 1)
    return [step for step in range(STEPS) if step % log_every == 0]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_empty_local_batches_happen(distributed_run, name):
    _, runs = distributed_run
    sizes = [[step["size"] for step in rank] for rank in runs[name]]
    assert any(0 in rank_sizes for rank_sizes in sizes), sizes
    assert any(size > PHYSICAL_BATCH for rank_sizes in sizes for size in rank_sizes), sizes


@pytest.mark.parametrize("name", REAL)
def test_records_hold_global_batch(distributed_run, name):
    _, runs = distributed_run
    logged = _logged_steps(name)
    for rank in runs[name]:
        for step in range(STEPS):
            size, reference = _global(runs[name], step)
            record = rank[step]["record"]
            # last_record keeps the last logged step across the steps in between.
            assert record.step == max(s for s in logged if s <= step)
            if record.step != step:
                continue
            assert not record.synthetic
            assert record.num_samples == size
            np.testing.assert_allclose(
                record.before, total_norms(reference, size), rtol=1e-5, atol=1e-9
            )
            for layer in NAMES:
                np.testing.assert_allclose(
                    record.layer_before[layer], reference[layer], rtol=1e-5, atol=1e-9
                )


def test_dry_run_counts_global_batch(distributed_run):
    _, runs = distributed_run
    for rank in runs["dry_run"]:
        for step in range(STEPS):
            record = rank[step]["record"]
            assert record.synthetic
            assert record.num_samples == _global(runs["dry_run"], step)[0]


def test_flat_after_clipping(distributed_run):
    _, runs = distributed_run
    for step in range(STEPS):
        size, reference = _global(runs["flat"], step)
        expected = total_norms(reference, size)
        record = runs["flat"][0][step]["record"]
        np.testing.assert_allclose(
            record.after, expected * np.minimum(1.0, 0.5 / (expected + 1e-6)), rtol=1e-5
        )


def test_per_layer_after_clipping(distributed_run):
    _, runs = distributed_run
    bounds = dict(zip(NAMES, PER_LAYER_BOUNDS))
    for step in _logged_steps("per_layer"):
        size, reference = _global(runs["per_layer"], step)
        record = runs["per_layer"][0][step]["record"]
        clipped = per_layer_clipped(reference, bounds)
        np.testing.assert_allclose(record.after, total_norms(clipped, size), rtol=1e-5, atol=1e-9)
        assert record.layer_max_grad_norms == bounds


@pytest.mark.parametrize("name", REAL)
def test_rank0_events_count_every_sample(distributed_run, name):
    out_dir, runs = distributed_run
    events = read_events(out_dir / name / "rank0")
    logged = _logged_steps(name)
    samples = events.Scalars("grad_norm/samples")
    assert [event.step for event in samples] == logged
    assert [int(event.value) for event in samples] == [_global(runs[name], s)[0] for s in logged]

    nonempty = [s for s in logged if _global(runs[name], s)[0] > 0]
    for tag in ("grad_norm/before_clipping", "grad_norm/layer/0.weight/after_clipping"):
        histograms = events.Histograms(tag)
        assert [event.step for event in histograms] == nonempty
        counts = [event.histogram_value.num for event in histograms]
        assert counts == [_global(runs[name], s)[0] for s in nonempty]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_other_ranks_write_nothing(distributed_run, name):
    out_dir, _ = distributed_run
    assert (out_dir / name / "rank0").is_dir()
    assert not (out_dir / name / "rank1").exists()


def test_rank0_dry_run_events(distributed_run):
    out_dir, runs = distributed_run
    events = read_events(out_dir / "dry_run" / "rank0")
    samples = events.Scalars("grad_norm/synthetic/samples")
    assert [int(event.value) for event in samples] == [
        _global(runs["dry_run"], step)[0] for step in range(STEPS)
    ]
    assert "grad_norm/samples" not in events.Tags()["scalars"]
