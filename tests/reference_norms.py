"""Per-parameter per-sample gradient norms computed one example at a time, for reference.

Independent of Opacus: the model's weights are loaded into a fresh copy of the tiny MLP, each
example's loss is differentiated alone, and the norms are taken in float64.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from conftest import make_mlp


def inner_model(module: object) -> nn.Module:
    """Return the MLP inside GradSampleModule, hooks objects and DPDDP wrappers."""
    while True:
        if hasattr(module, "_module"):
            module = module._module
        elif type(module).__name__ == "DifferentiallyPrivateDistributedDataParallel":
            module = module.module
        else:
            assert isinstance(module, nn.Module)
            return module


def brute_force_param_norms(
    module: object, x: torch.Tensor, y: torch.Tensor
) -> dict[str, np.ndarray]:
    """Return each trainable parameter's per-example gradient norms, by parameter name."""
    inner = inner_model(module)
    reference = make_mlp()
    reference.load_state_dict(copy.deepcopy(inner.state_dict()))
    trainable = {name for name, p in inner.named_parameters() if p.requires_grad}
    named = [(name, p) for name, p in reference.named_parameters() if name in trainable]
    norms: dict[str, list[float]] = {name: [] for name, _ in named}
    for i in range(len(x)):
        loss = nn.functional.cross_entropy(reference(x[i : i + 1]), y[i : i + 1])
        grads = torch.autograd.grad(loss, [p for _, p in named])
        for (name, _), grad in zip(named, grads):
            norms[name].append(grad.double().norm().item())
    return {name: np.array(values, dtype=np.float64) for name, values in norms.items()}


def total_norms(param_norms: dict[str, np.ndarray], size: int) -> np.ndarray:
    """Return the L2 norm over all parameters of each sample."""
    if not param_norms:
        return np.zeros(size)
    return np.sqrt(sum(np.square(values) for values in param_norms.values()))


def per_layer_clipped(
    param_norms: dict[str, np.ndarray], bounds: dict[str, float]
) -> dict[str, np.ndarray]:
    """Return each parameter's norms after clipping to its own bound, as Opacus scales them."""
    return {
        name: values * np.minimum(1.0, bounds[name] / (values + 1e-6))
        for name, values in param_norms.items()
    }
