"""GradNormCallback with privacy="private": noisy release, accounting, preview, refusals."""

from __future__ import annotations

import logging
import math
import warnings

import numpy as np
import pytest
import torch
from conftest import IN_FEATURES, make_mlp, make_private, read_events
from training import train_epochs, train_step
from opacus import GradSampleModule
from opacus.accountants import create_accountant
from opacus.optimizers import DistributedDPOptimizer, DPOptimizer
from opacus.optimizers.ddp_perlayeroptimizer import DistributedPerLayerOptimizer
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.tensorboard import SummaryWriter

from dp_grad_callbacks import GradNormCallback, GradNormRecord
from dp_grad_callbacks.noisy_histogram import SecureGaussianNoise, SeededGaussianNoise
from dp_grad_callbacks.privacy import (
    RawNormsWarning,
    combined_noise_multiplier,
    diagnostics_history,
    preview_epsilon,
)
from dp_grad_callbacks.stats import bucket_counts, bucket_limits
from dp_grad_callbacks.tensorboard import write_record

NOISE = 2.0  # histogram noise s of most tests
DELTA = 1e-5


def use_accountant(private, mechanism):
    """Charge the optimizer to a fresh accountant, attached as make_private attaches it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "gdp" accountant warns that it is experimental
        private.engine.accountant = create_accountant(mechanism=mechanism)
    hook = private.engine.accountant.get_optimizer_hook_fn(sample_rate=1 / len(private.loader))
    private.optimizer.attach_step_hook(hook)
    return private.engine.accountant


def private_callback(logdir, private, **options):
    options.setdefault("histogram_noise", NOISE)
    return GradNormCallback(logdir, privacy="private", **options).attach(private.optimizer)


def numpy_global_state():
    """Return numpy's global generator state, position within the key included."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return name, keys.tobytes(), position, has_gauss, cached


def empty_step(private):
    x = torch.zeros(0, IN_FEATURES)
    y = torch.zeros(0, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mean of an empty loss is NaN
        train_step(private, x, y)


# ---------------------------------------------------------------- accounting


def test_combined_noise_multiplier_values():
    assert combined_noise_multiplier(1.0, 1.0) == pytest.approx(1 / math.sqrt(2))
    assert combined_noise_multiplier(1.0, 2.0) == pytest.approx((1 + 0.25) ** -0.5)
    assert combined_noise_multiplier(0.0, 2.0) == 0.0
    assert combined_noise_multiplier(3.0, 1e12) == pytest.approx(3.0)


@pytest.mark.parametrize("mechanism", ["rdp", "prv", "gdp"])
def test_every_logged_step_charged_with_z_eff(tmp_path, mechanism):
    private = make_private()
    accountant = use_accountant(private, mechanism)
    callback = private_callback(tmp_path, private)

    train_epochs(private, epochs=2)
    callback.close()

    z_eff = (1.0**-2 + NOISE**-2) ** -0.5
    assert accountant.history == [(z_eff, 0.25, 8)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "gdp" accountant warns that it is experimental
        fresh = create_accountant(mechanism=mechanism)
    fresh.history = [(z_eff, 0.25, 8)]
    assert private.engine.get_epsilon(DELTA) == fresh.get_epsilon(DELTA)
    assert callback.withheld_releases == 0


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_only_logged_steps_charged(tmp_path, mechanism):
    private = make_private()
    accountant = use_accountant(private, mechanism)
    callback = private_callback(tmp_path, private, log_every=3)

    train_epochs(private, epochs=3)  # 12 steps, of which 0, 3, 6 and 9 are logged
    callback.close()

    z_eff = (1.0**-2 + NOISE**-2) ** -0.5
    assert accountant.history == [(z_eff, 0.25, 4), (1.0, 0.25, 8)]
    fresh = create_accountant(mechanism=mechanism)
    fresh.history = [(z_eff, 0.25, 4), (1.0, 0.25, 8)]
    assert private.engine.get_epsilon(DELTA) == fresh.get_epsilon(DELTA)
    events = read_events(tmp_path)
    assert [s.step for s in events.Scalars("grad_norm/samples")] == [0, 3, 6, 9]


def test_grouped_history_keeps_epsilon(tmp_path):
    private = make_private()
    accountant = use_accountant(private, "rdp")
    callback = private_callback(tmp_path, private, log_every=3)
    train_epochs(private, epochs=3)
    callback.close()

    z_eff = combined_noise_multiplier(1.0, NOISE)
    step_by_step = create_accountant(mechanism="rdp")
    for step in range(12):
        noise_multiplier = z_eff if step % 3 == 0 else 1.0
        step_by_step.step(noise_multiplier=noise_multiplier, sample_rate=0.25)

    assert len(step_by_step.history) == 8  # alternating entries, never merged
    assert accountant.get_epsilon(DELTA) == pytest.approx(
        step_by_step.get_epsilon(DELTA), rel=1e-12
    )


def test_unlogged_run_costs_as_without_callback(tmp_path):
    plain = make_private(seed=4)
    train_epochs(plain, epochs=2)
    observed = make_private(seed=4)
    callback = private_callback(tmp_path, observed, log_every=100)
    train_epochs(observed, epochs=2)
    callback.close()

    z_eff = combined_noise_multiplier(1.0, NOISE)
    assert plain.engine.accountant.history == [(1.0, 0.25, 8)]
    assert observed.engine.accountant.history == [(z_eff, 0.25, 1), (1.0, 0.25, 7)]


def test_batch_memory_manager_charges_logical_steps(tmp_path):
    plain = make_private(batch_size=32, dataset_size=128)
    observed = make_private(batch_size=32, dataset_size=128)
    callback = private_callback(tmp_path, observed, log_every=2)

    for private in (plain, observed):
        with BatchMemoryManager(
            data_loader=private.loader, max_physical_batch_size=8, optimizer=private.optimizer
        ) as loader:
            for x, y in loader:
                train_step(private, x, y)
    callback.close()

    [(z, rate, steps)] = plain.engine.accountant.history
    z_eff = combined_noise_multiplier(z, NOISE)
    assert steps == 4
    assert observed.engine.accountant.history == [(z_eff, rate, 2), (z, rate, 2)]
    assert [s.step for s in read_events(tmp_path).Scalars("grad_norm/samples")] == [0, 2]


def test_preview_matches_trained_epsilon(tmp_path):
    plain = make_private(seed=2)
    use_accountant(plain, "rdp")
    train_epochs(plain, epochs=3)
    observed = make_private(seed=2)
    use_accountant(observed, "rdp")
    callback = private_callback(tmp_path, observed, log_every=2)
    train_epochs(observed, epochs=3)
    callback.close()

    preview = preview_epsilon(
        noise_multiplier=1.0,
        histogram_noise=NOISE,
        sample_rate=0.25,
        steps=12,
        log_every=2,
        delta=DELTA,
        accountant="rdp",
    )

    assert preview.without_diagnostics == plain.engine.get_epsilon(DELTA)
    assert preview.with_diagnostics == observed.engine.get_epsilon(DELTA)
    assert preview.with_diagnostics > preview.without_diagnostics


def test_preview_cost_falls_with_histogram_noise():
    costs = [
        preview_epsilon(
            noise_multiplier=1.0,
            histogram_noise=s,
            sample_rate=0.01,
            steps=500,
            delta=DELTA,
            accountant="rdp",
        )
        for s in (1.0, 3.0, 10.0)
    ]
    with_diagnostics = [cost.with_diagnostics for cost in costs]
    assert with_diagnostics == sorted(with_diagnostics, reverse=True)
    assert costs[0].without_diagnostics == costs[2].without_diagnostics
    assert costs[2].with_diagnostics - costs[2].without_diagnostics < 0.05 * (
        costs[0].with_diagnostics - costs[0].without_diagnostics
    )


def test_diagnostics_history_counts_logged_steps():
    z_eff = combined_noise_multiplier(1.5, 4.0)
    history = diagnostics_history(
        noise_multiplier=1.5, histogram_noise=4.0, sample_rate=0.1, steps=10, log_every=4
    )
    assert history == [(z_eff, 0.1, 3), (1.5, 0.1, 7)]
    every = diagnostics_history(
        noise_multiplier=1.5, histogram_noise=4.0, sample_rate=0.1, steps=10, log_every=1
    )
    assert every == [(z_eff, 0.1, 10)]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("noise_multiplier", -1.0),
        ("histogram_noise", 0.0),
        ("histogram_noise", float("inf")),
        ("sample_rate", 1.5),
        ("sample_rate", 0.0),
        ("steps", 0),
        ("steps", 2.5),
        ("log_every", 0),
        ("delta", 1.0),
        ("accountant", "moments"),
    ],
)
def test_preview_rejects_invalid_option(option, value):
    options = dict(
        noise_multiplier=1.0, histogram_noise=2.0, sample_rate=0.1, steps=10, delta=DELTA
    )
    options[option] = value
    with pytest.raises(ValueError, match=f"{option}.*{value!r}"):
        preview_epsilon(**options)


def test_preview_gdp_rejects_sparse_logging():
    with pytest.raises(ValueError, match="'gdp'.*log_every=1, got 5"):
        preview_epsilon(
            noise_multiplier=1.0,
            histogram_noise=2.0,
            sample_rate=0.1,
            steps=10,
            delta=DELTA,
            log_every=5,
            accountant="gdp",
        )


def test_gdp_rejects_sparse_logging_at_attach(tmp_path):
    private = make_private()
    use_accountant(private, "gdp")
    callback = GradNormCallback(tmp_path, privacy="private", histogram_noise=NOISE, log_every=2)
    with pytest.raises(ValueError, match="'gdp'.*log_every=1, got 2"):
        callback.attach(private.optimizer)
    assert not callback.attached
    callback.close()


def test_gdp_rejects_history_of_other_noise(tmp_path):
    private = make_private()
    accountant = use_accountant(private, "gdp")
    train_step(private, *next(iter(private.loader)))
    callback = GradNormCallback(tmp_path, privacy="private", histogram_noise=NOISE)

    with pytest.raises(ValueError, match=r"'gdp' accountant already recorded.*\[1\.0\]"):
        callback.attach(private.optimizer)
    assert accountant.history == [(1.0, 0.25, 1)]
    callback.close()


# ---------------------------------------------------------------- release


def run_records(logdir, privacy, *, seed=3, log_every=1, epochs=2):
    private = make_private(seed=seed, max_grad_norm=0.7)
    options = {"histogram_noise": NOISE} if privacy == "private" else {}
    records = []
    with GradNormCallback(
        logdir, privacy=privacy, seed=11, log_every=log_every, **options
    ) as callback:
        callback.attach(private.optimizer)
        for _ in range(epochs):
            for x, y in private.loader:
                train_step(private, x, y)
                if callback.last_record is not None and (
                    not records or records[-1].step != callback.last_record.step
                ):
                    records.append(callback.last_record)
    return records


def test_noisy_counts_are_true_counts_plus_seeded_noise(tmp_path):
    raw = run_records(tmp_path / "raw", "raw")
    released = run_records(tmp_path / "private", "private")
    noise = SeededGaussianNoise(seed=11)
    limits = bucket_limits(0.7)

    assert [r.step for r in released] == [r.step for r in raw] == list(range(8))
    for raw_record, record in zip(raw, released):
        true_counts = bucket_counts(raw_record.before, limits)
        np.testing.assert_array_equal(record.noisy_counts, true_counts + noise.draw(NOISE, 52))
        np.testing.assert_array_equal(record.bucket_limits, limits)
        assert record.histogram_noise == NOISE
        assert record.max_grad_norm == 0.7
        assert record.private
        assert not record.synthetic


def test_private_record_holds_no_per_sample_values(tmp_path):
    [record] = run_records(tmp_path, "private", epochs=1, log_every=4)

    assert isinstance(record, GradNormRecord)
    assert record.before.size == 0
    assert record.after.size == 0
    counts = np.maximum(record.noisy_counts, 0)
    assert record.num_samples == round(float(counts.sum()))
    assert record.clipped_fraction == pytest.approx(counts[31:].sum() / counts.sum())
    with pytest.raises(ValueError):
        record.before[...] = 1.0  # the empty arrays are read-only


def expected_histogram(counts, limits):
    """Rebuild a histogram proto's fields from counts, independently of the package."""
    nonzero = np.flatnonzero(counts)
    first, last = max(nonzero[0] - 1, 0), min(nonzero[-1] + 2, counts.size)
    lower = np.concatenate(([0.0], limits[:-1]))
    upper = np.append(limits[:-1], limits[-2] ** 2 / limits[-3])
    middle = (lower + upper) / 2
    return {
        "min": lower[nonzero[0]],
        "max": upper[nonzero[-1]],
        "num": counts.sum(),
        "sum": counts @ middle,
        "sum_squares": counts @ middle**2,
        "bucket_limit": limits[first:last].tolist(),
        "bucket": counts[first:last].tolist(),
    }


def expected_quantile(counts, limits, q):
    """Interpolate a quantile linearly inside the bucket where the cumulative count reaches it."""
    lower = np.concatenate(([0.0], limits[:-1]))
    upper = np.append(limits[:-1], limits[-2] ** 2 / limits[-3])
    cumulative = np.cumsum(counts)
    target = q * cumulative[-1]
    i = np.flatnonzero((cumulative >= target) & (counts > 0))[0]
    share = (target - (cumulative[i] - counts[i])) / counts[i]
    return lower[i] + share * (upper[i] - lower[i])


def assert_proto_fields(proto, expected):
    for field in ("min", "max", "num", "sum", "sum_squares"):
        assert getattr(proto, field) == pytest.approx(expected[field], rel=1e-12), field
    assert list(proto.bucket_limit) == pytest.approx(expected["bucket_limit"], rel=1e-15)
    assert list(proto.bucket) == pytest.approx(expected["bucket"], rel=1e-15)


def test_event_file_derives_only_from_noisy_counts(tmp_path):
    raw = run_records(tmp_path / "raw", "raw")
    released = run_records(tmp_path / "private", "private")
    events = read_events(tmp_path / "private")
    raw_values = np.concatenate([r.before for r in raw] + [r.after for r in raw])
    before_protos = events.Histograms("grad_norm/before_clipping")
    after_protos = events.Histograms("grad_norm/after_clipping")
    scalars = {
        name: [s.value for s in events.Scalars(f"grad_norm/{name}")]
        for name in ("samples", "clipped_fraction", "median", "p90", "max", "histogram_noise")
    }

    assert len(before_protos) == len(after_protos) == len(released) == 8
    for i, record in enumerate(released):
        limits = record.bucket_limits
        counts = np.maximum(record.noisy_counts, 0.0)
        after = counts.copy()
        after[30] = counts[30:].sum()
        after[31:] = 0.0
        before_proto = before_protos[i].histogram_value
        after_proto = after_protos[i].histogram_value

        assert_proto_fields(before_proto, expected_histogram(counts, limits))
        assert_proto_fields(after_proto, expected_histogram(after, limits))
        proto_values = [
            getattr(proto, field)
            for proto in (before_proto, after_proto)
            for field in ("min", "max", "sum", "sum_squares")
        ]
        assert not np.isin(proto_values, raw_values).any()

        # Event files store scalars as float32.
        assert scalars["samples"][i] == pytest.approx(counts.sum(), rel=1e-6)
        assert scalars["clipped_fraction"][i] == pytest.approx(
            counts[31:].sum() / counts.sum(), rel=1e-6
        )
        assert scalars["median"][i] == pytest.approx(expected_quantile(counts, limits, 0.5))
        assert scalars["p90"][i] == pytest.approx(expected_quantile(counts, limits, 0.9))
        assert scalars["max"][i] == pytest.approx(expected_histogram(counts, limits)["max"])
        assert scalars["histogram_noise"][i] == NOISE


def test_noisy_record_with_zero_counts_writes_scalars_only(tmp_path):
    limits = bucket_limits(1.0)
    record = GradNormRecord(
        step=4,
        before=np.zeros(0),
        after=np.zeros(0),
        max_grad_norm=1.0,
        noisy_counts=np.full(limits.size, -0.5),
        bucket_limits=limits,
        histogram_noise=0.5,
    )
    with SummaryWriter(tmp_path) as writer:
        write_record(writer, record, prefix="grad_norm", limits=limits)

    tags = read_events(tmp_path).Tags()
    assert sorted(tags["scalars"]) == [
        "grad_norm/histogram_noise",
        "grad_norm/max_grad_norm",
        "grad_norm/samples",
    ]
    assert tags["histograms"] == []
    assert read_events(tmp_path).Scalars("grad_norm/samples")[0].value == 0.0


def test_reattach_continues_noise_stream(tmp_path):
    private = make_private()
    callback = private_callback(tmp_path, private, seed=5)
    empty_step(private)  # an empty batch has all-zero true counts
    first = callback.last_record.noisy_counts
    callback.detach()
    callback.attach(private.optimizer)
    empty_step(private)
    second = callback.last_record.noisy_counts
    callback.close()

    noise = SeededGaussianNoise(seed=5)
    np.testing.assert_array_equal(first, noise.draw(NOISE, 52))
    np.testing.assert_array_equal(second, noise.draw(NOISE, 52))


def test_dry_run_releases_noisy_synthetic_counts(tmp_path):
    private = make_private()
    callback = private_callback(tmp_path, private, dry_run=True)
    train_epochs(private)
    callback.close()

    record = callback.last_record
    assert record.synthetic
    assert record.private
    assert record.before.size == 0
    tags = read_events(tmp_path).Tags()
    assert "grad_norm/synthetic/before_clipping" in tags["histograms"]
    assert "grad_norm/synthetic/histogram_noise" in tags["scalars"]
    z_eff = combined_noise_multiplier(1.0, NOISE)
    assert private.engine.accountant.history == [(z_eff, 0.25, 4)]


# ---------------------------------------------------------------- training unchanged


def run_training(logdir, poisson, seed=3):
    private = make_private(seed=seed, poisson=poisson, max_grad_norm=0.7)
    callback = None
    if logdir is not None:
        callback = private_callback(logdir, private, seed=9)
    train_epochs(private, epochs=2)
    if callback is not None:
        callback.close()
    return [p.detach().clone() for p in private.model.parameters()]


@pytest.mark.parametrize("poisson", [True, False])
def test_training_is_bitwise_identical_when_private(tmp_path, poisson):
    plain = run_training(None, poisson)
    plain_torch_state = torch.get_rng_state()
    numpy_state = numpy_global_state()
    observed = run_training(tmp_path, poisson)

    for plain_param, observed_param in zip(plain, observed):
        assert torch.equal(plain_param, observed_param)
    # make_private seeds torch's global generator, so both runs must leave it alike.
    assert torch.equal(torch.get_rng_state(), plain_torch_state)
    assert numpy_global_state() == numpy_state


def test_private_noise_leaves_global_random_state(tmp_path):
    private = make_private()
    callback = private_callback(tmp_path, private)
    x, y = next(iter(private.loader))
    private.optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    torch_state = torch.get_rng_state()
    numpy_state = numpy_global_state()

    private.optimizer.step()

    assert callback.last_record.private
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert numpy_global_state() == numpy_state
    callback.close()


def test_detach_restores_private_optimizer(tmp_path):
    private = make_private()
    optimizer = private.optimizer
    before = dict(vars(optimizer))
    hook = optimizer.step_hook

    callback = private_callback(tmp_path, private)
    assert optimizer.step_hook is not hook
    train_step(private, *next(iter(private.loader)))
    callback.detach()

    assert vars(optimizer) == before
    assert optimizer.step_hook is hook
    assert optimizer.noise_multiplier == 1.0
    callback.close()


# ---------------------------------------------------------------- refusals and checks


def adaptive_private():
    return make_private(
        clipping="adaptive",
        max_grad_norm=0.5,
        target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2,
        max_clipbound=10.0,
        min_clipbound=0.01,
        unclipped_num_std=1.0,
    )


@pytest.mark.parametrize(
    ("build", "name", "reason"),
    [
        (lambda: make_private(clipping="per_layer", max_grad_norm=[0.5] * 4),
         "DPPerLayerOptimizer", "per-layer clipping"),
        (adaptive_private, "AdaClipDPOptimizer", "adaptive clipping"),
        (lambda: make_private(grad_sample_mode="ghost"),
         "DPOptimizerFastGradientClipping", "ghost clipping"),
    ],
)
def test_private_rejects_other_clipping_modes(tmp_path, build, name, reason):
    private = build()
    callback = GradNormCallback(tmp_path, privacy="private", histogram_noise=NOISE)
    with pytest.raises(TypeError, match=f"flat clipping.*got {name}: {reason}"):
        callback.attach(private.optimizer)
    assert not callback.attached
    assert "pre_step" not in vars(private.optimizer)
    callback.close()


@pytest.fixture
def process_group(tmp_path):
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    yield
    torch.distributed.destroy_process_group()


@pytest.mark.parametrize("optimizer_class", [DistributedDPOptimizer, DistributedPerLayerOptimizer])
def test_private_rejects_distributed(tmp_path, process_group, optimizer_class):
    model = GradSampleModule(make_mlp())
    max_grad_norm = 0.5 if optimizer_class is DistributedDPOptimizer else [0.5] * 4
    optimizer = optimizer_class(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=max_grad_norm,
        expected_batch_size=16,
    )
    callback = GradNormCallback(tmp_path / "run", privacy="private", histogram_noise=NOISE)
    with pytest.raises(TypeError, match=f"got {optimizer_class.__name__}: each rank sees"):
        callback.attach(optimizer)
    callback.close()


def test_private_requires_step_hook(tmp_path):
    private = make_private()
    private.optimizer.step_hook = None
    callback = GradNormCallback(tmp_path, privacy="private", histogram_noise=NOISE)
    with pytest.raises(ValueError, match="no step hook.*PrivacyEngine.make_private"):
        callback.attach(private.optimizer)
    callback.close()


def test_wrapped_hook_needs_privacy_engine(tmp_path):
    private = make_private()
    opacus_hook = private.optimizer.step_hook
    calls = []

    def user_hook(optimizer):
        calls.append(optimizer.noise_multiplier)
        opacus_hook(optimizer)

    private.optimizer.step_hook = user_hook
    callback = GradNormCallback(tmp_path, privacy="private", histogram_noise=NOISE)
    with pytest.raises(ValueError, match="no privacy accountant.*privacy_engine"):
        callback.attach(private.optimizer)
    callback.close()

    callback = GradNormCallback(
        tmp_path, privacy="private", histogram_noise=NOISE, privacy_engine=private.engine,
        delta=DELTA,
    )
    callback.attach(private.optimizer)
    train_epochs(private)
    callback.close()

    z_eff = combined_noise_multiplier(1.0, NOISE)
    assert private.engine.accountant.history == [(z_eff, 0.25, 4)]
    assert calls == [z_eff] * 4  # the hook reads z_eff while it charges a logged step
    assert callback.withheld_releases == 0


def test_privacy_engine_of_other_accountant_rejected(tmp_path):
    private = make_private()
    other = make_private()
    callback = GradNormCallback(
        tmp_path, privacy="private", histogram_noise=NOISE, privacy_engine=other.engine,
        delta=DELTA,
    )
    with pytest.raises(ValueError, match="different accountant"):
        callback.attach(private.optimizer)
    callback.close()


def test_uncharged_step_is_withheld(tmp_path, caplog):
    private = make_private()
    callback = private_callback(tmp_path, private)
    # A hook attached after the callback charges the plain noise multiplier, not z_eff.
    private.optimizer.attach_step_hook(
        private.engine.accountant.get_optimizer_hook_fn(sample_rate=0.25)
    )

    with caplog.at_level(logging.ERROR, logger="dp_grad_callbacks.callback"):
        train_epochs(private)
    callback.close()

    assert callback.withheld_releases == 4
    assert callback.last_record is None
    assert "did not release the gradient norms of step 3" in caplog.text
    assert "withheld 4 so far" in caplog.text
    assert read_events(tmp_path).Tags()["histograms"] == []
    assert private.engine.accountant.history == [(1.0, 0.25, 4)]


def secure_optimizer():
    model = GradSampleModule(make_mlp())
    optimizer = DPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        noise_multiplier=1.0,
        max_grad_norm=0.5,
        expected_batch_size=16,
        secure_mode=True,
    )
    accountant = create_accountant(mechanism="rdp")
    optimizer.attach_step_hook(accountant.get_optimizer_hook_fn(sample_rate=0.25))
    return model, optimizer, accountant


def test_secure_mode_rejects_seed(tmp_path):
    _, optimizer, _ = secure_optimizer()
    callback = GradNormCallback(tmp_path, privacy="private", histogram_noise=NOISE, seed=1)
    with pytest.raises(ValueError, match="seed must be None.*secure_mode, got 1"):
        callback.attach(optimizer)
    callback.close()


def test_secure_mode_draws_secure_noise(tmp_path, monkeypatch):
    sizes = []
    original_draw = SecureGaussianNoise.draw

    def draw(self, std, size):
        sizes.append((std, size))
        return original_draw(self, std, size)

    monkeypatch.setattr(SecureGaussianNoise, "draw", draw)
    model, optimizer, accountant = secure_optimizer()
    callback = GradNormCallback(tmp_path, privacy="private", histogram_noise=NOISE)
    callback.attach(optimizer)
    x = torch.randn(16, IN_FEATURES)
    y = torch.randint(0, 3, (16,))
    optimizer.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    callback.close()

    assert sizes == [(NOISE, 52)]
    assert callback.last_record.private
    assert accountant.history == [(combined_noise_multiplier(1.0, NOISE), 0.25, 1)]


def test_raw_warns_once_at_attach(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path)
    with pytest.warns(RawNormsWarning, match="not cover") as caught:
        callback.attach(private.optimizer)
        callback.detach()
        callback.attach(private.optimizer)
    callback.close()
    assert len([w for w in caught if issubclass(w.category, RawNormsWarning)]) == 1
    assert caught[0].filename == __file__


def test_private_does_not_warn_raw(tmp_path):
    private = make_private()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        callback = private_callback(tmp_path, private)
    callback.close()
    assert not [w for w in caught if issubclass(w.category, RawNormsWarning)]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"privacy": "secret"}, r"privacy must be one of \('raw', 'private'\), got 'secret'"),
        ({"privacy": "private"}, "histogram_noise is required with privacy=.private., got None"),
        ({"privacy": "private", "histogram_noise": 0}, "histogram_noise.*got 0"),
        ({"privacy": "private", "histogram_noise": -1.0}, r"histogram_noise.*got -1\.0"),
        ({"privacy": "private", "histogram_noise": float("nan")}, "histogram_noise.*got nan"),
        ({"privacy": "private", "histogram_noise": True}, "histogram_noise.*got True"),
        ({"privacy": "private", "histogram_noise": "1"}, "histogram_noise.*got '1'"),
        ({"histogram_noise": 1.0}, "only with privacy='private', got 1.0 with privacy='raw'"),
    ],
)
def test_invalid_privacy_option_raises(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        GradNormCallback(tmp_path, **options)


def test_private_rejects_per_layer_view(tmp_path):
    with pytest.raises(ValueError, match="per_layer must be False with privacy='private'"):
        GradNormCallback(tmp_path, per_layer=True, privacy="private", histogram_noise=NOISE)


def test_step_without_trainable_parameters_withheld(tmp_path, caplog):
    private = make_private()
    for parameter in private.model.parameters():
        parameter.requires_grad_(False)
    callback = private_callback(tmp_path, private)

    with caplog.at_level(logging.ERROR, logger="dp_grad_callbacks.callback"):
        with pytest.warns(RuntimeWarning, match="synthetic"):
            private.optimizer.step()
    callback.close()

    assert callback.withheld_releases == 1
    assert "no trainable parameters" in caplog.text
    assert private.engine.accountant.history == []
    assert read_events(tmp_path).Tags()["scalars"] == []


def test_settings_text_names_histogram_noise(tmp_path):
    private = make_private()
    callback = private_callback(tmp_path, private)
    callback.close()

    events = read_events(tmp_path)
    text = events.Tensors("grad_norm/dp_settings/text_summary")[-1].tensor_proto.string_val[0]
    rows = dict(line.strip("|").split(" | ", 1) for line in text.decode().splitlines()[2:])
    rows = {name.strip(): value.strip() for name, value in rows.items()}
    assert rows["Histogram noise (private diagnostics)"] == (
        "std 2 on each bucket count, charged to the accountant"
    )
    # The header is written before the step hook is wrapped, so the accountant is found.
    assert rows["Accountant"] == "prv"
    assert rows["Sample rate"] == "0.25"
