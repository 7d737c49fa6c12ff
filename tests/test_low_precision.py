"""Per-sample gradients in float16 and bfloat16: norms computed in float32 or wider."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from opacus import PrivacyEngine
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.tensorboard import SummaryWriter

from conftest import IN_FEATURES, brute_force_norms, make_dataset, make_mlp, read_events
from dp_grad_callbacks import GradNormCallback

HALF_DTYPES = [torch.float16, torch.bfloat16]
# float16 overflows above 65504, so Opacus's own norm of this gradient is inf in float16.
LARGE_INPUT = 5e4


class RecordingWriter(SummaryWriter):
    """A real SummaryWriter that also keeps every value handed to it."""

    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        self.scalars: list[object] = []
        self.histograms: list[dict[str, object]] = []

    def add_scalar(self, tag, scalar_value, global_step=None, *args, **kwargs):
        self.scalars.append(scalar_value)
        return super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)

    def add_histogram_raw(self, tag, **kwargs):
        self.histograms.append(kwargs)
        return super().add_histogram_raw(tag, **kwargs)


def make_private_linear(dtype: torch.dtype):
    """Return a bias-free linear model whose per-sample gradient is its input, made private."""
    torch.manual_seed(0)
    model = nn.Linear(IN_FEATURES, 1, bias=False).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.full((4, IN_FEATURES), LARGE_INPUT)
    loader = DataLoader(TensorDataset(x, torch.zeros(4)), batch_size=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            poisson_sampling=False,
            loss_reduction="sum",
            noise_generator=torch.Generator().manual_seed(1),
        )


def assert_full_precision(value: object) -> None:
    if isinstance(value, np.generic):
        assert value.dtype in (np.float32, np.float64, np.int64)
    else:
        assert type(value) in (int, float)


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_norm_above_float16_max(tmp_path, dtype):
    model, optimizer, loader = make_private_linear(dtype)
    # The model receives the input rounded to dtype, and the norm is sqrt(features) times that.
    expected = math.sqrt(IN_FEATURES) * torch.tensor(LARGE_INPUT, dtype=dtype).item()
    writer = RecordingWriter(str(tmp_path))

    with GradNormCallback(writer) as callback:
        callback.attach(optimizer)
        for x, _ in loader:
            optimizer.zero_grad()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the backward hook warns for inputs without grad
                model(x.to(dtype)).sum().backward()
            optimizer.step()
    writer.close()

    record = callback.last_record
    assert record.before.dtype == np.float64
    assert np.isfinite(record.before).all()
    np.testing.assert_allclose(record.before, expected, rtol=1e-6)
    assert record.num_nonfinite == 0
    assert expected > 1e5

    events = read_events(tmp_path)
    assert events.Scalars("grad_norm/max")[0].value == pytest.approx(expected, rel=1e-6)
    assert events.Scalars("grad_norm/nonfinite")[0].value == 0
    histogram = events.Histograms("grad_norm/before_clipping")[0].histogram_value
    assert histogram.max == pytest.approx(expected, rel=1e-6)
    assert histogram.num == 4

    assert writer.scalars
    for value in writer.scalars:
        assert_full_precision(value)
    for arguments in writer.histograms:
        for name in ("min", "max", "sum", "sum_squares"):
            assert type(arguments[name]) is float
        assert all(type(limit) is float for limit in arguments["bucket_limits"])


@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
def test_half_mlp_matches_brute_force(tmp_path, dtype):
    torch.manual_seed(0)
    model = make_mlp().to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = DataLoader(make_dataset(16), batch_size=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, optimizer, loader = PrivacyEngine().make_private(
            module=model,
            optimizer=optimizer,
            data_loader=loader,
            noise_multiplier=1.0,
            max_grad_norm=0.5,
            poisson_sampling=False,
        )

    x, y = next(iter(loader))
    x = x.to(dtype)
    # The reference runs in float32 on the same, already rounded, weights and inputs.
    reference = brute_force_norms(model, x.float(), y)
    with GradNormCallback(tmp_path) as callback:
        callback.attach(optimizer)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x).float(), y).backward()
        optimizer.step()

    record = callback.last_record
    assert record.before.dtype == np.float64
    assert np.isfinite(record.before).all()
    # Opacus computes the per-sample gradients themselves in dtype, so they carry its
    # rounding error (8 significant bits for bfloat16, 11 for float16).
    np.testing.assert_allclose(record.before, reference, rtol=1e-2)
