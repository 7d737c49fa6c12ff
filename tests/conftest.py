"""Shared fixtures: a tiny MLP under Opacus, and an independent per-sample norm reference."""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

REPO_ROOT = Path(__file__).resolve().parents[1]
IN_FEATURES = 6
CLASSES = 3


def make_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(IN_FEATURES, 8), nn.ReLU(), nn.Linear(8, CLASSES))


def make_dataset(size: int = 64, seed: int = 0) -> TensorDataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, IN_FEATURES, generator=generator)
    y = torch.randint(0, CLASSES, (size,), generator=generator)
    return TensorDataset(x, y)


@dataclass
class Private:
    engine: PrivacyEngine
    model: nn.Module
    optimizer: torch.optim.Optimizer
    loader: DataLoader
    criterion: nn.Module


def make_private(
    *,
    seed: int = 0,
    batch_size: int = 16,
    dataset_size: int = 64,
    poisson: bool = True,
    max_grad_norm: float | list[float] = 0.5,
    noise_multiplier: float = 1.0,
    **kwargs,
) -> Private:
    """Build a seeded tiny MLP, SGD optimizer and loader, made private by Opacus."""
    torch.manual_seed(seed)
    model = make_mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(make_dataset(dataset_size, seed), batch_size=batch_size)
    engine = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            poisson_sampling=poisson,
            noise_generator=torch.Generator().manual_seed(seed + 1),
            **kwargs,
        )
    if len(result) == 4:
        module, dp_optimizer, criterion, dp_loader = result
    else:
        module, dp_optimizer, dp_loader = result
        criterion = nn.CrossEntropyLoss()
    return Private(engine, module, dp_optimizer, dp_loader, criterion)


def brute_force_norms(module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """Return each example's gradient norm, computed alone on a fresh copy of the model."""
    inner = getattr(module, "_module", module)
    reference = make_mlp()
    reference.load_state_dict(copy.deepcopy(inner.state_dict()))
    params = [p for p in reference.parameters() if p.requires_grad]
    norms = []
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, params)
        norms.append(torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item())
    return np.array(norms)


def checkout_env() -> dict[str, str]:
    """Return an environment in which a subprocess imports this checkout's package first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def read_events(logdir: Path) -> EventAccumulator:
    accumulator = EventAccumulator(str(logdir), size_guidance={"histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.fixture
def private() -> Private:
    return make_private()
