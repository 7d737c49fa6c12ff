"""The callback in every single-process Opacus training mode, against brute-force norms."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from opacus import PrivacyEngine
from opacus.grad_sample import (
    GradSampleHooksFastGradientClippingTP,
    GradSampleModuleFastGradientClippingFSDP,
)
from opacus.optimizers import FSDPOptimizerFastGradientClipping
from opacus.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer
from opacus.optimizers.optimizer import DPOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch import nn
from torch.utils.data import DataLoader

from conftest import (
    CLASSES,
    IN_FEATURES,
    Private,
    make_dataset,
    make_mlp,
    make_private,
    read_events,
)
from dp_grad_callbacks import GradNormCallback, MissingPerSampleGradientsError, UnsupportedModeError
from reference_norms import brute_force_param_norms, per_layer_clipped, total_norms

ADAPTIVE = dict(
    clipping="adaptive",
    target_unclipped_quantile=0.5,
    clipbound_learning_rate=0.5,
    max_clipbound=10.0,
    min_clipbound=0.01,
    unclipped_num_std=1.0,
)
# Per-layer bounds in named_parameters order: 0.weight, 0.bias, 2.weight, 2.bias. The small
# bound of 2.bias clips samples whose total norm stays below the overall bound.
PER_LAYER_BOUNDS = [1.0, 0.5, 1.0, 0.05]
PER_LAYER = dict(clipping="per_layer", max_grad_norm=PER_LAYER_BOUNDS)
GHOST = dict(grad_sample_mode="ghost")


def run_steps(private, callback, steps=4, *, model=None):
    """Train ``steps`` batches and return each step's (x, y, reference norms, record)."""
    model = private.model if model is None else model
    results = []
    for step, (x, y) in enumerate(private.loader):
        if step == steps:
            break
        reference = brute_force_param_norms(model, x, y)
        private.optimizer.zero_grad()
        private.criterion(model(x), y).backward()
        private.optimizer.step()
        results.append((x, y, reference, callback.last_record))
    return results


def assert_close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- per-sample gradient modes


@pytest.mark.parametrize(
    ("grad_sample_mode", "poisson"),
    [("hooks", True), ("functorch", True), ("ew", False)],
)
def test_grad_sample_modes_match_brute_force(tmp_path, grad_sample_mode, poisson):
    # Expanded weights (torch) reject an empty batch, which Poisson sampling can draw.
    private = make_private(grad_sample_mode=grad_sample_mode, poisson=poisson)
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        results = run_steps(private, callback)

    for step, (x, _, reference, record) in enumerate(results):
        expected = total_norms(reference, len(x))
        assert record.step == step
        assert_close(record.before, expected)
        assert_close(record.after, expected * np.minimum(1.0, 0.5 / (expected + 1e-6)))
        assert record.max_grad_norm == 0.5
        if len(x):
            assert record.clipped_fraction == np.count_nonzero(expected > 0.5) / len(x)


# ---------------------------------------------------------------- ghost clipping


@pytest.mark.parametrize("wrap_model", [True, False])
def test_ghost_norms_match_brute_force(tmp_path, wrap_model):
    private = make_private(wrap_model=wrap_model, **GHOST)
    model = private.model if wrap_model else private.model._module
    with GradNormCallback(tmp_path, fallback="raise") as callback:
        callback.attach(private.optimizer, private.model)
        results = run_steps(private, callback, model=model)

    for x, _, reference, record in results:
        expected = total_norms(reference, len(x))
        assert record.num_samples == len(x)
        assert_close(record.before, expected)
        assert_close(record.after, expected * np.minimum(1.0, 0.5 / (expected + 1e-6)))


def test_ghost_reports_module_bound(tmp_path):
    # Ghost clipping clips with the module's max_grad_norm, and the optimizer's sets the noise.
    private = make_private(**GHOST)
    private.model.max_grad_norm = 0.2
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer, private.model)
        results = run_steps(private, callback, steps=2)

    for x, _, reference, record in results:
        expected = total_norms(reference, len(x))
        assert record.max_grad_norm == 0.2
        assert_close(record.after, expected * np.minimum(1.0, 0.2 / (expected + 1e-6)))
        if len(x):
            assert record.clipped_fraction == np.count_nonzero(expected > 0.2) / len(x)
    assert private.optimizer.max_grad_norm == 0.5


def test_ghost_batch_memory_manager_one_record(tmp_path):
    private = make_private(batch_size=16, **GHOST)
    records = []
    with GradNormCallback(tmp_path, fallback="raise") as callback:
        callback.attach(private.optimizer, private.model)
        with BatchMemoryManager(
            data_loader=private.loader, max_physical_batch_size=3, optimizer=private.optimizer
        ) as loader:
            physical_norms = []
            for x, y in loader:
                reference = brute_force_param_norms(private.model, x, y)
                physical_norms.append(total_norms(reference, len(x)))
                private.optimizer.zero_grad()
                private.criterion(private.model(x), y).backward()
                steps_before = callback.step
                private.optimizer.step()
                if callback.step > steps_before:
                    records.append((np.concatenate(physical_norms), callback.last_record))
                    physical_norms = []

    assert len(records) == 4
    assert max(record.num_samples for _, record in records) > 3
    for step, (expected, record) in enumerate(records):
        assert record.step == step
        assert_close(record.before, expected)


def test_ghost_stale_norms_are_missing(tmp_path):
    # A backward pass through the plain criterion clips nothing and leaves the previous
    # batch's norms on the module. The callback must not log them again.
    private = make_private(poisson=False, **GHOST)
    batches = iter(private.loader)
    with GradNormCallback(tmp_path, fallback="raise") as callback:
        callback.attach(private.optimizer, private.model)
        x, y = next(batches)
        private.optimizer.zero_grad()
        private.criterion(private.model(x), y).backward()
        private.optimizer.step()
        assert callback.last_record.num_samples == len(x)

        x, y = next(batches)
        private.optimizer.zero_grad()
        nn.functional.cross_entropy(private.model(x), y).backward()
        with pytest.raises(MissingPerSampleGradientsError, match="step 1"):
            private.optimizer.step()


def test_ghost_stale_physical_batch_fails_step(tmp_path):
    # One stale physical batch must not leave a record with only the other batch's samples.
    private = make_private(poisson=False, **GHOST)
    x, y = next(iter(private.loader))
    with GradNormCallback(tmp_path, fallback="raise") as callback:
        callback.attach(private.optimizer, private.model)
        private.optimizer.zero_grad()
        private.criterion(private.model(x[:8]), y[:8]).backward()
        private.optimizer.signal_skip_step(do_skip=True)
        private.optimizer.step()

        private.optimizer.zero_grad()
        nn.functional.cross_entropy(private.model(x[8:]), y[8:]).backward()
        with pytest.raises(MissingPerSampleGradientsError, match="step 0"):
            private.optimizer.step()


def test_ghost_without_module_raises(tmp_path):
    private = make_private(**GHOST)
    with GradNormCallback(tmp_path) as callback:
        with pytest.raises(TypeError, match="attach\\(optimizer, module\\)"):
            callback.attach(private.optimizer)
        with pytest.raises(TypeError, match="GradSampleModuleFastGradientClipping.*Sequential"):
            callback.attach(private.optimizer, private.model._module)
        other = make_private(**GHOST)
        with pytest.raises(ValueError, match="not in the GradSampleModuleFastGradientClipping"):
            callback.attach(private.optimizer, other.model)
        assert not callback.attached


def test_ghost_dry_run_counts_samples(tmp_path):
    private = make_private(**GHOST)
    with GradNormCallback(tmp_path, dry_run=True, seed=1) as callback:
        callback.attach(private.optimizer, private.model)
        results = run_steps(private, callback, steps=3)

    for x, _, _, record in results:
        assert record.synthetic
        assert record.num_samples == len(x)


# ---------------------------------------------------------------- per-layer clipping


def test_per_layer_clipping_matches_brute_force(tmp_path):
    private = make_private(**PER_LAYER)
    bounds = dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], PER_LAYER_BOUNDS))
    overall = float(np.sqrt(np.sum(np.square(PER_LAYER_BOUNDS))))
    with GradNormCallback(tmp_path, per_layer=True, fallback="raise") as callback:
        callback.attach(private.optimizer, private.model)
        results = run_steps(private, callback)

    fractions_differ = False
    for x, _, reference, record in results:
        clipped = per_layer_clipped(reference, bounds)
        assert sorted(record.layer_before) == sorted(bounds)
        assert record.layer_max_grad_norms == bounds
        for name in bounds:
            assert_close(record.layer_before[name], reference[name])
            assert_close(record.layer_after[name], clipped[name])
        expected_after = total_norms(clipped, len(x))
        assert_close(record.before, total_norms(reference, len(x)))
        assert_close(record.after, expected_after)
        assert record.max_grad_norm == pytest.approx(overall, rel=1e-6)
        assert np.all(record.after <= record.max_grad_norm * (1 + 1e-6))
        if len(x):
            any_clipped = np.any([reference[name] > bounds[name] for name in bounds], axis=0)
            assert record.clipped_fraction == pytest.approx(np.mean(any_clipped))
            fractions_differ |= np.mean(any_clipped) != np.mean(record.before > overall)
    assert fractions_differ, "the bounds must clip a sample whose total norm is below C"


def test_per_layer_clipping_without_view(tmp_path):
    private = make_private(**PER_LAYER)
    bounds = dict(zip(["0.weight", "0.bias", "2.weight", "2.bias"], PER_LAYER_BOUNDS))
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        results = run_steps(private, callback, steps=2)

    for x, _, reference, record in results:
        assert dict(record.layer_before) == {}
        assert_close(record.after, total_norms(per_layer_clipped(reference, bounds), len(x)))
        assert record.clipped.shape == (len(x),)


def test_per_layer_histograms_use_layer_bounds(tmp_path):
    private = make_private(**PER_LAYER)
    with GradNormCallback(tmp_path, per_layer=True) as callback:
        callback.attach(private.optimizer, private.model)
        results = run_steps(private, callback, steps=3)

    events = read_events(tmp_path)
    histograms = events.Tags()["histograms"]
    logged_steps = [record.step for *_, record in results if record.num_samples]
    for name, bound in zip(["0.weight", "0.bias", "2.weight", "2.bias"], PER_LAYER_BOUNDS):
        for kind in ("before_clipping", "after_clipping"):
            tag = f"grad_norm/layer/{name}/{kind}"
            assert tag in histograms
            assert [event.step for event in events.Histograms(tag)] == logged_steps
        limits = events.Histograms(f"grad_norm/layer/{name}/after_clipping")[0].histogram_value
        assert min(abs(np.array(limits.bucket_limit) / bound - 1)) < 1e-9


# ---------------------------------------------------------------- per-layer view, flat clipping


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_layer_view_flat_clipping(tmp_path, mode):
    private = make_private(grad_sample_mode=mode)
    with GradNormCallback(tmp_path, per_layer=True, fallback="raise") as callback:
        callback.attach(private.optimizer, private.model)
        results = run_steps(private, callback, steps=3)

    for x, _, reference, record in results:
        total = total_norms(reference, len(x))
        factors = np.minimum(1.0, 0.5 / (total + 1e-6))
        assert sorted(record.layer_before) == ["0.bias", "0.weight", "2.bias", "2.weight"]
        assert dict(record.layer_max_grad_norms) == {}
        for name, values in reference.items():
            assert_close(record.layer_before[name], values)
            assert_close(record.layer_after[name], values * factors)

    histograms = read_events(tmp_path).Tags()["histograms"]
    assert "grad_norm/layer/0.weight/before_clipping" in histograms
    assert "grad_norm/layer/2.bias/after_clipping" in histograms


def test_layer_view_needs_module(tmp_path):
    private = make_private()
    with GradNormCallback(tmp_path, per_layer=True) as callback:
        with pytest.raises(TypeError, match="per_layer=True"):
            callback.attach(private.optimizer)
        with pytest.raises(ValueError, match="module must hold every parameter"):
            callback.attach(private.optimizer, make_private().model)
        assert not callback.attached


def test_layer_view_option_validated(tmp_path):
    with pytest.raises(ValueError, match="per_layer must be True or False, got 'yes'"):
        GradNormCallback(tmp_path, per_layer="yes")


# ---------------------------------------------------------------- adaptive clipping


def test_adaptive_reports_bound_that_clipped(tmp_path):
    # AdaClipDPOptimizer fails on an empty batch in opacus 1.6, so no Poisson sampling here.
    private = make_private(poisson=False, **ADAPTIVE)
    bounds_in_force = []
    results = []
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        for x, y in private.loader:
            reference = total_norms(brute_force_param_norms(private.model, x, y), len(x))
            bounds_in_force.append(float(private.optimizer.max_grad_norm))
            private.optimizer.zero_grad()
            private.criterion(private.model(x), y).backward()
            private.optimizer.step()
            results.append((reference, callback.last_record))

    assert len(set(bounds_in_force)) == len(bounds_in_force), "C must move every step"
    for bound, (expected, record) in zip(bounds_in_force, results):
        assert record.max_grad_norm == bound
        assert_close(record.before, expected)
        assert_close(record.after, expected * np.minimum(1.0, bound / (expected + 1e-6)))
        assert record.clipped_fraction == np.count_nonzero(expected > bound) / len(expected)

    scalars = read_events(tmp_path).Scalars("grad_norm/max_grad_norm")
    np.testing.assert_allclose([event.value for event in scalars], bounds_in_force, rtol=1e-6)


def test_adaptive_empty_batch_keeps_opacus_error(tmp_path):
    def empty_batch_error(attach):
        private = make_private(**ADAPTIVE)
        callback = GradNormCallback(tmp_path)
        if attach:
            callback.attach(private.optimizer)
        x = torch.zeros((0, IN_FEATURES))
        y = torch.zeros((0,), dtype=torch.long)
        private.optimizer.zero_grad()
        private.criterion(private.model(x), y).backward()
        with pytest.raises(RuntimeError) as error:
            private.optimizer.step()
        callback.close()
        return str(error.value)

    assert empty_batch_error(attach=True) == empty_batch_error(attach=False)


# ---------------------------------------------------------------- which parameters count


def make_private_frozen(name: str) -> Private:
    """Build the tiny MLP under Opacus with parameter ``name`` frozen beforehand."""
    torch.manual_seed(0)
    model = make_mlp()
    model.get_parameter(name).requires_grad_(False)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    engine = PrivacyEngine()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module, optimizer, loader = engine.make_private(
            module=model,
            optimizer=optimizer,
            data_loader=DataLoader(make_dataset(), batch_size=16),
            noise_multiplier=1.0,
            max_grad_norm=0.5,
        )
    return Private(engine, module, optimizer, loader, nn.CrossEntropyLoss())


@pytest.mark.parametrize("when", ["before_make_private", "after_make_private"])
def test_frozen_parameter_left_out(tmp_path, when):
    if when == "before_make_private":
        private = make_private_frozen("0.bias")
    else:
        private = make_private()
        private.model._module[0].bias.requires_grad_(False)
    with GradNormCallback(tmp_path, per_layer=True, fallback="raise") as callback:
        callback.attach(private.optimizer, private.model)
        results = run_steps(private, callback, steps=3)

    for x, _, reference, record in results:
        assert sorted(reference) == ["0.weight", "2.bias", "2.weight"]
        assert sorted(record.layer_before) == sorted(reference)
        assert_close(record.before, total_norms(reference, len(x)))


class WithUnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(IN_FEATURES, CLASSES)
        self.unused = nn.Linear(IN_FEATURES, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


@pytest.mark.parametrize("options", [{}, {"clipping": "per_layer"}, ADAPTIVE])
def test_parameter_without_gradient_keeps_opacus_error(tmp_path, options):
    def step_error(attach):
        torch.manual_seed(0)
        model = WithUnusedLayer()
        bound = [0.5] * 4 if options.get("clipping") == "per_layer" else 0.5
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, loader = PrivacyEngine().make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=DataLoader(make_dataset(16), batch_size=8),
                noise_multiplier=1.0,
                max_grad_norm=bound,
                poisson_sampling=False,
                **options,
            )
        callback = GradNormCallback(tmp_path, fallback="raise")
        if attach:
            callback.attach(optimizer)
        x, y = next(iter(loader))
        nn.functional.cross_entropy(model(x), y).backward()
        with pytest.raises(Exception) as error:
            optimizer.step()
        callback.close()
        return type(error.value), str(error.value)

    assert step_error(attach=True) == step_error(attach=False)


# ---------------------------------------------------------------- unsupported modes


@pytest.fixture
def single_process_group(tmp_path, monkeypatch):
    """A one-process gloo group, which the distributed-only optimizers need to exist."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("optimizer_class", "message"),
    [
        (DistributedPerLayerOptimizer, "per-layer clipping inside backward hooks"),
        (FSDPOptimizerFastGradientClipping, "ghost clipping with FSDP"),
    ],
)
def test_unsupported_optimizer_raises(tmp_path, single_process_group, optimizer_class, message):
    model = nn.Linear(IN_FEATURES, CLASSES)
    bound = [1.0, 1.0] if optimizer_class is DistributedPerLayerOptimizer else 1.0
    optimizer = optimizer_class(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=bound,
        expected_batch_size=4,
    )
    with GradNormCallback(tmp_path / "logs") as callback:
        with pytest.raises(UnsupportedModeError, match=message):
            callback.attach(optimizer)
        assert not callback.attached
    assert "pre_step" not in optimizer.__dict__


@pytest.mark.parametrize(
    "module_class",
    [GradSampleHooksFastGradientClippingTP, GradSampleModuleFastGradientClippingFSDP],
)
def test_sharded_ghost_module_raises(tmp_path, module_class):
    private = make_private(**GHOST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = module_class(make_mlp(), max_grad_norm=0.5)
    expected = f"ghost clipping with {module_class.__name__}"
    with GradNormCallback(tmp_path) as callback:
        with pytest.raises(UnsupportedModeError, match=expected):
            callback.attach(private.optimizer, module)


class CustomClipping(DPOptimizer):
    def clip_and_accumulate(self) -> None:
        super().clip_and_accumulate()


def test_custom_clipping_raises(tmp_path):
    model = nn.Linear(IN_FEATURES, CLASSES)
    optimizer = CustomClipping(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
    )
    with GradNormCallback(tmp_path) as callback:
        with pytest.raises(UnsupportedModeError, match="test_modes.CustomClipping"):
            callback.attach(optimizer)


# ---------------------------------------------------------------- observation only


def train_parameters(log_dir, options, attach):
    private = make_private(**options)
    callback = GradNormCallback(log_dir, per_layer=True)
    if attach:
        callback.attach(private.optimizer, private.model)
    for step, (x, y) in enumerate(private.loader):
        if step == 4:
            break
        private.optimizer.zero_grad()
        private.criterion(private.model(x), y).backward()
        private.optimizer.step()
    callback.close()
    return [copy.deepcopy(p.detach()) for p in private.model.parameters()]


@pytest.mark.parametrize(
    "options",
    [GHOST, PER_LAYER, {**ADAPTIVE, "poisson": False}, {"grad_sample_mode": "functorch"}],
    ids=["ghost", "per_layer", "adaptive", "functorch"],
)
def test_training_identical_with_callback(tmp_path, options):
    with_callback = train_parameters(tmp_path, options, attach=True)
    without = train_parameters(tmp_path, options, attach=False)
    for a, b in zip(with_callback, without):
        assert torch.equal(a, b)
