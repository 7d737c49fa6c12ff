"""Names of the parameters that Opacus clips, for the per-layer view."""

from __future__ import annotations

from opacus.distributed import DifferentiallyPrivateDistributedDataParallel as DPDDP
from opacus.grad_sample import AbstractGradSampleHooks
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def unwrap_model(module: object) -> object:
    """Return the user's model inside Opacus's and torch's wrappers.

    Peels ``GradSampleModule`` and the hooks object of ``wrap_model=False`` (``_module``),
    and ``DPDDP`` and ``DistributedDataParallel`` (``module``), in any nesting.
    """
    while True:
        if isinstance(module, AbstractGradSampleHooks):
            module = module._module
        elif isinstance(module, (DPDDP, DistributedDataParallel)):
            module = module.module
        else:
            return module


def parameter_names(module: object, optimizer: DPOptimizer) -> dict[int, str]:
    """Return each parameter's name in the user's model, by ``id(parameter)``.

    Names are those of ``named_parameters()`` of the model inside the wrappers, so
    ``_module.0.weight`` and ``_module.module.0.weight`` both become ``0.weight``.

    Raises:
        TypeError: If ``module`` is not a ``torch.nn.Module`` or an Opacus hooks object.
        ValueError: If a parameter of the optimizer is not in ``module``.
    """
    model = unwrap_model(module)
    if not isinstance(model, nn.Module):
        raise TypeError(
            "module must be the torch.nn.Module (or the Opacus hooks object) that "
            f"make_private returned, got {type(module).__module__}.{type(module).__qualname__}"
        )
    names = {id(p): name for name, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in names:
                raise ValueError(
                    "module must hold every parameter of the optimizer, but a parameter of "
                    f"shape {tuple(p.shape)} is not in the {type(model).__name__} given; pass "
                    "the module that make_private returned together with this optimizer"
                )
    return names
