"""GradNormCallback in Opacus's default mode: flat clipping, per-sample gradients from hooks."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
from conftest import IN_FEATURES, brute_force_norms, make_private, read_events
from training import train_epochs, train_step
from opacus.utils.batch_memory_manager import BatchMemoryManager
from torch.utils.tensorboard import SummaryWriter

from dp_grad_callbacks import GradNormCallback, GradNormRecord, MissingPerSampleGradientsError
from dp_grad_callbacks import capture as capture_module


@pytest.mark.parametrize("poisson", [True, False])
def test_norms_match_brute_force(tmp_path, poisson):
    private = make_private(poisson=poisson, max_grad_norm=1.0)
    callback = GradNormCallback(tmp_path).attach(private.optimizer)

    steps = 0
    for x, y in private.loader:
        expected = brute_force_norms(private.model, x, y)
        train_step(private, x, y)
        record = callback.last_record
        assert record.step == steps
        assert record.before.shape == (len(x),)
        np.testing.assert_allclose(record.before, expected, rtol=1e-5)
        steps += 1

    assert steps == 4
    callback.close()


def test_after_clipping_follows_opacus_formula(tmp_path):
    private = make_private(max_grad_norm=1.0)
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    clipped = unclipped = 0

    for x, y in private.loader:
        train_step(private, x, y)
        record = callback.last_record
        c = record.max_grad_norm
        expected = record.before * np.minimum(1.0, c / (record.before + 1e-6))
        np.testing.assert_allclose(record.after, expected, rtol=1e-12)
        assert np.all(record.after <= c * (1 + 1e-6))
        clipped += int(np.sum(record.before > c))
        unclipped += int(np.sum(record.before <= c))

    # Both branches of the clip factor were exercised.
    assert clipped > 0
    assert unclipped > 0
    callback.close()


def test_record_is_frozen_float_arrays(tmp_path):
    private = make_private()
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        x, y = next(iter(private.loader))
        train_step(private, x, y)

    record = callback.last_record
    assert isinstance(record, GradNormRecord)
    assert record.before.dtype == np.float64
    assert record.after.dtype == np.float64
    assert record.max_grad_norm == 0.5
    assert record.synthetic is False
    with pytest.raises(AttributeError):
        record.step = 5  # type: ignore[misc]


def test_batch_memory_manager_one_record_per_logical_step(tmp_path):
    private = make_private(batch_size=32, dataset_size=128, max_grad_norm=1.0)
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    optimizer = private.optimizer

    logical_batches, pending_x, pending_y, records = [], [], [], []
    with BatchMemoryManager(
        data_loader=private.loader, max_physical_batch_size=8, optimizer=optimizer
    ) as loader:
        for x, y in loader:
            if not pending_x:
                state = {k: v.clone() for k, v in private.model.state_dict().items()}
            pending_x.append(x)
            pending_y.append(y)
            step_before = callback.step
            train_step(private, x, y)
            if callback.step > step_before:
                logical_batches.append((torch.cat(pending_x), torch.cat(pending_y), state))
                records.append(callback.last_record)
                pending_x, pending_y = [], []

    assert len(records) == 4
    assert [r.step for r in records] == [0, 1, 2, 3]
    reference = make_private(batch_size=32, dataset_size=128).model
    for record, (x, y, state) in zip(records, logical_batches):
        reference.load_state_dict(state)
        assert record.before.size == len(x)
        np.testing.assert_allclose(record.before, brute_force_norms(reference, x, y), rtol=1e-5)
    # The physical batches were smaller than the logical ones.
    assert max(len(x) for x, _, _ in logical_batches) > 8
    callback.close()


def test_two_backward_passes_are_one_step(tmp_path):
    private = make_private(poisson=False, max_grad_norm=1.0)
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    batches = iter(private.loader)
    (x1, y1), (x2, y2) = next(batches), next(batches)
    expected = np.concatenate(
        [brute_force_norms(private.model, x1, y1), brute_force_norms(private.model, x2, y2)]
    )

    private.optimizer.zero_grad()
    private.criterion(private.model(x1), y1).backward()
    private.criterion(private.model(x2), y2).backward()
    private.optimizer.step()

    assert callback.step == 1
    np.testing.assert_allclose(callback.last_record.before, expected, rtol=1e-5)
    callback.close()


def test_empty_batch_logs_zero_samples(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    x = torch.zeros(0, IN_FEATURES)
    y = torch.zeros(0, dtype=torch.long)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mean of an empty loss is NaN
        train_step(private, x, y)
    callback.close()

    assert callback.last_record.before.size == 0
    events = read_events(tmp_path)
    assert [s.value for s in events.Scalars("grad_norm/samples")] == [0.0]
    assert "grad_norm/before_clipping" not in events.Tags()["histograms"]


def test_poisson_empty_batches_write_no_histogram(tmp_path):
    # A sample rate of 1/64 over 64 examples draws an empty batch with probability ~0.37.
    private = make_private(batch_size=1, dataset_size=64)
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            train_epochs(private)

    events = read_events(tmp_path)
    samples = {s.step: s.value for s in events.Scalars("grad_norm/samples")}
    histogram_steps = {h.step for h in events.Histograms("grad_norm/before_clipping")}
    empty_steps = {step for step, count in samples.items() if count == 0}
    assert len(samples) == 64
    assert empty_steps
    assert histogram_steps == set(samples) - empty_steps


@pytest.mark.parametrize("log_every", [1, 3])
def test_event_file_tags_steps_and_counts(tmp_path, log_every):
    private = make_private(batch_size=16, dataset_size=64)
    counts = []
    with GradNormCallback(tmp_path, log_every=log_every) as callback:
        callback.attach(private.optimizer)
        for _ in range(2):
            for x, y in private.loader:
                train_step(private, x, y)
                counts.append(len(x))

    events = read_events(tmp_path)
    expected_steps = [s for s in range(len(counts)) if s % log_every == 0]
    scalar_tags = {
        f"grad_norm/{name}"
        for name in (
            "clipped_fraction", "median", "p90", "max", "max_grad_norm", "samples", "nonfinite"
        )
    }
    assert set(events.Tags()["scalars"]) == scalar_tags
    assert set(events.Tags()["histograms"]) == {
        "grad_norm/before_clipping",
        "grad_norm/after_clipping",
    }
    for tag in scalar_tags:
        assert [s.step for s in events.Scalars(tag)] == expected_steps, tag
    samples = [s.value for s in events.Scalars("grad_norm/samples")]
    assert samples == [counts[s] for s in expected_steps]
    for tag in events.Tags()["histograms"]:
        histograms = events.Histograms(tag)
        assert [h.step for h in histograms] == expected_steps
        assert [h.histogram_value.num for h in histograms] == samples
        assert [sum(h.histogram_value.bucket) for h in histograms] == samples


def test_scalars_match_record(tmp_path):
    private = make_private(max_grad_norm=1.0)
    with GradNormCallback(tmp_path, tag_prefix="clip") as callback:
        callback.attach(private.optimizer)
        x, y = next(iter(private.loader))
        train_step(private, x, y)

    record = callback.last_record
    scalars = {tag: read_events(tmp_path).Scalars(tag)[0].value for tag in (
        "clip/clipped_fraction", "clip/median", "clip/p90", "clip/max", "clip/max_grad_norm"
    )}
    assert scalars["clip/clipped_fraction"] == pytest.approx(np.mean(record.before > 1.0))
    assert scalars["clip/median"] == pytest.approx(np.median(record.before), rel=1e-6)
    assert scalars["clip/p90"] == pytest.approx(np.quantile(record.before, 0.9), rel=1e-6)
    assert scalars["clip/max"] == pytest.approx(record.before.max(), rel=1e-6)
    assert scalars["clip/max_grad_norm"] == 1.0


def test_clipped_samples_pile_up_in_bucket_ending_at_c(tmp_path):
    private = make_private(max_grad_norm=0.5)
    with GradNormCallback(tmp_path) as callback:
        callback.attach(private.optimizer)
        x, y = next(iter(private.loader))
        train_step(private, x, y)

    clipped = int(np.sum(callback.last_record.before > 0.5))
    after = read_events(tmp_path).Histograms("grad_norm/after_clipping")[0].histogram_value
    at_c = after.bucket_limit.index(0.5)
    assert clipped > 0
    assert after.bucket[at_c] >= clipped


def run_training(attach, poisson, seed=3):
    private = make_private(seed=seed, poisson=poisson, max_grad_norm=0.7)
    callback = None
    if attach is not None:
        callback = GradNormCallback(attach).attach(private.optimizer)
    train_epochs(private, epochs=2)
    if callback is not None:
        callback.close()
    params = [p.detach().clone() for p in private.model.parameters()]
    return params, private.engine.get_epsilon(1e-5), private.engine.accountant.history


@pytest.mark.parametrize("poisson", [True, False])
def test_training_is_bitwise_identical(tmp_path, poisson):
    plain_params, plain_eps, plain_history = run_training(None, poisson)
    observed_params, observed_eps, observed_history = run_training(tmp_path, poisson)

    for plain, observed in zip(plain_params, observed_params):
        assert torch.equal(plain, observed)
    assert observed_eps == plain_eps
    assert observed_history == plain_history
    assert len(observed_history) > 0


def test_global_random_state_untouched(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path, dry_run=True).attach(private.optimizer)
    x, y = next(iter(private.loader))
    private.optimizer.zero_grad()
    private.criterion(private.model(x), y).backward()
    torch_state = torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()

    private.optimizer.step()

    assert callback.last_record.synthetic
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    callback.close()


def test_detach_restores_optimizer(tmp_path):
    private = make_private()
    optimizer = private.optimizer
    before = dict(vars(optimizer))
    hook = optimizer.step_hook

    callback = GradNormCallback(tmp_path).attach(optimizer)
    assert optimizer.pre_step != type(optimizer).pre_step.__get__(optimizer)
    assert optimizer.step_hook is hook
    callback.detach()

    assert vars(optimizer) == before
    assert optimizer.pre_step == type(optimizer).pre_step.__get__(optimizer)
    assert optimizer.clip_and_accumulate.__func__ is type(optimizer).clip_and_accumulate
    assert optimizer.step_hook is hook
    callback.close()


def test_context_manager_closes_on_exception(tmp_path):
    private = make_private()
    with pytest.raises(ZeroDivisionError):
        with GradNormCallback(tmp_path) as callback:
            callback.attach(private.optimizer)
            x, y = next(iter(private.loader))
            train_step(private, x, y)
            raise ZeroDivisionError

    assert not callback.attached
    assert "pre_step" not in vars(private.optimizer)
    assert [s.step for s in read_events(tmp_path).Scalars("grad_norm/samples")] == [0]


def test_user_writer_stays_open(tmp_path):
    writer = SummaryWriter(tmp_path)
    private = make_private()
    with GradNormCallback(writer) as callback:
        callback.attach(private.optimizer)
    writer.add_scalar("user/after", 1.0, 0)
    writer.close()
    assert "user/after" in read_events(tmp_path).Tags()["scalars"]


def test_attach_rejects_plain_optimizer(tmp_path):
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    callback = GradNormCallback(tmp_path)
    with pytest.raises(TypeError, match=r"torch\.optim\.sgd\.SGD.*DPOptimizer|DPOptimizer.*SGD"):
        callback.attach(optimizer)
    callback.close()


def test_attach_twice_raises(tmp_path):
    private = make_private()
    callback = GradNormCallback(tmp_path).attach(private.optimizer)
    with pytest.raises(RuntimeError, match="already attached"):
        callback.attach(private.optimizer)
    callback.close()


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("log_every", 0),
        ("log_every", 1.5),
        ("log_every", True),
        ("tag_prefix", ""),
        ("tag_prefix", 3),
        ("dry_run", "yes"),
        ("fallback", "skip"),
        ("seed", -1),
        ("seed", "0"),
    ],
)
def test_invalid_option_raises(tmp_path, option, value):
    with pytest.raises(ValueError, match=f"{option}.*{value!r}".replace("(", r"\(")):
        GradNormCallback(tmp_path, **{option: value})


def test_writer_of_wrong_type_raises():
    with pytest.raises(TypeError, match="SummaryWriter"):
        GradNormCallback(42)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("log_every", np.int64(0)),
        ("log_every", np.float64(2.0)),
        ("log_every", np.bool_(True)),
        ("seed", np.int64(-1)),
        ("epsilon_every", np.int32(0)),
        ("epsilon_every", np.float32(2.0)),
    ],
)
def test_invalid_numpy_option_raises(tmp_path, option, value):
    with pytest.raises(ValueError, match=f"{option} must be .*{re.escape(repr(value))}"):
        GradNormCallback(tmp_path, **{option: value})


def test_numpy_integer_options_log_as_ints(tmp_path):
    private = make_private()
    with GradNormCallback(
        tmp_path,
        log_every=np.int64(3),
        seed=np.int32(7),
        privacy_engine=private.engine,
        delta=1e-5,
        epsilon_every=np.uint8(1),
    ) as callback:
        callback.attach(private.optimizer)
        train_epochs(private)

    assert type(callback.log_every) is int
    assert type(callback.step) is int
    events = read_events(tmp_path)
    # 64 samples in batches of 16 make 4 steps, of which steps 0 and 3 are logged.
    assert [event.step for event in events.Scalars("grad_norm/samples")] == [0, 3]
    assert [event.step for event in events.Scalars("privacy/epsilon")] == [0, 3]


def test_numpy_seed_same_norms_as_int(tmp_path):
    records = []
    for run, seed in enumerate([7, np.int64(7)]):
        private = make_private()
        with GradNormCallback(tmp_path / str(run), dry_run=True, seed=seed) as callback:
            callback.attach(private.optimizer)
            x, y = next(iter(private.loader))
            train_step(private, x, y)
        records.append(callback.last_record)
    np.testing.assert_array_equal(records[0].before, records[1].before)


def test_step_setter_accepts_numpy_integer(tmp_path):
    with GradNormCallback(tmp_path) as callback:
        callback.step = np.int64(4)
        assert callback.step == 4
        assert type(callback.step) is int
        message = r"step must be a non-negative integer, got np.int64\(-1\)"
        with pytest.raises(ValueError, match=message):
            callback.step = np.int64(-1)


def test_empty_log_directory_raises(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ValueError, match=r"writer must be .*non-empty log directory.*got ''"):
        GradNormCallback("")

    # SummaryWriter("") would have created its default directory ./runs/<date>_<host>.
    assert list(tmp_path.iterdir()) == []


def test_dry_run_never_reads_per_sample_gradients(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("per-sample gradients were read in a dry run")

    monkeypatch.setattr(capture_module, "param_norm_matrix", fail)
    monkeypatch.setattr(capture_module, "clip_and_accumulate_keeping_norms", fail)
    private = make_private()
    counts = []
    with GradNormCallback(tmp_path, dry_run=True, seed=1) as callback:
        callback.attach(private.optimizer)
        for x, y in private.loader:
            train_step(private, x, y)
            counts.append(len(x))
            assert callback.last_record.synthetic

    events = read_events(tmp_path)
    assert all(tag.startswith("grad_norm/synthetic/") for tag in events.Tags()["scalars"])
    assert all(tag.startswith("grad_norm/synthetic/") for tag in events.Tags()["histograms"])
    assert [s.value for s in events.Scalars("grad_norm/synthetic/samples")] == counts
    assert [s.value for s in events.Scalars("grad_norm/synthetic/max_grad_norm")] == [0.5] * 4


def frozen_private():
    private = make_private()
    for parameter in private.model.parameters():
        parameter.requires_grad_(False)
    return private


def test_fallback_synthetic_warns_once(tmp_path):
    private = frozen_private()
    x, y = next(iter(private.loader))
    with GradNormCallback(tmp_path, seed=0) as callback:
        callback.attach(private.optimizer)
        with pytest.warns(RuntimeWarning, match="synthetic") as caught:
            for _ in range(3):
                private.optimizer.step()
    assert len([w for w in caught if "synthetic" in str(w.message)]) == 1

    record = callback.last_record
    assert record.synthetic
    assert record.before.size == private.optimizer.expected_batch_size
    tags = read_events(tmp_path).Tags()
    assert "grad_norm/synthetic/before_clipping" in tags["histograms"]
    assert "grad_norm/before_clipping" not in tags["histograms"]
    assert "grad_norm/samples" not in tags["scalars"]


def test_fallback_raise_names_what_is_missing(tmp_path):
    private = frozen_private()
    callback = GradNormCallback(tmp_path, fallback="raise").attach(private.optimizer)
    with pytest.raises(MissingPerSampleGradientsError, match="per-sample gradient"):
        private.optimizer.step()
    callback.close()


def test_synthetic_norms_reproducible_by_seed(tmp_path):
    records = []
    for run in range(2):
        private = make_private()
        with GradNormCallback(tmp_path / str(run), dry_run=True, seed=7) as callback:
            callback.attach(private.optimizer)
            x, y = next(iter(private.loader))
            train_step(private, x, y)
        records.append(callback.last_record)
    np.testing.assert_array_equal(records[0].before, records[1].before)
