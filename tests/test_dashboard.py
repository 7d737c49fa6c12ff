"""Tests of the dashboard: Custom Scalars layout, DP settings text and the epsilon scalar."""

from __future__ import annotations

import logging

import re
from pathlib import Path

import pytest
import torch
from opacus.accountants import PRVAccountant
from tensorboard.plugins.custom_scalar import layout_pb2
from torch.utils.tensorboard import SummaryWriter

from dp_grad_callbacks import GradNormCallback
from dp_grad_callbacks import dashboard
from dp_grad_callbacks.dashboard import EPSILON_TAG, custom_scalar_layout, dp_settings

from conftest import make_private, read_events
from training import train

DELTA = 1e-5


def read_layout(logdir: Path) -> layout_pb2.Layout:
    events = read_events(logdir)
    layout = layout_pb2.Layout()
    layout.ParseFromString(events.Tensors("custom_scalars__config__")[-1].tensor_proto.string_val[0])
    return layout


def read_text(logdir: Path, tag: str) -> str:
    events = read_events(logdir)
    return events.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


def chart_patterns(layout: layout_pb2.Layout) -> dict[str, list[str]]:
    return {
        chart.title: list(chart.multiline.tag)
        for category in layout.category
        for chart in category.chart
    }


@pytest.mark.parametrize("dry_run", [False, True])
def test_layout_patterns_match_written_tags(tmp_path: Path, dry_run: bool) -> None:
    private = make_private()
    with GradNormCallback(
        tmp_path, tag_prefix="dp", dry_run=dry_run, privacy_engine=private.engine, delta=DELTA
    ) as callback:
        callback.attach(private.optimizer)
        train(private, 2)

    scalar_tags = read_events(tmp_path).Tags()["scalars"]
    charts = chart_patterns(read_layout(tmp_path))
    matched = {}
    for title, patterns in charts.items():
        matched[title] = []
        for pattern in patterns:
            hits = [tag for tag in scalar_tags if re.search(pattern, tag)]
            assert len(hits) == 1, (pattern, hits)
            matched[title] += hits

    root = "dp/synthetic" if dry_run else "dp"
    assert matched == {
        f"Per-sample gradient norms against C ({root})": [
            f"{root}/median",
            f"{root}/p90",
            f"{root}/max",
            f"{root}/max_grad_norm",
        ],
        f"Fraction of samples clipped ({root})": [f"{root}/clipped_fraction"],
        "Privacy budget spent (epsilon)": [EPSILON_TAG],
    }


def test_layout_without_epsilon_has_two_charts() -> None:
    layout = custom_scalar_layout("grad_norm")
    charts = layout["DP-SGD clipping"]
    assert len(charts) == 2
    assert all(kind == "Multiline" for kind, _ in charts.values())


def test_settings_text_lists_flat_clipping(tmp_path: Path) -> None:
    private = make_private(batch_size=16, dataset_size=64, max_grad_norm=0.5, noise_multiplier=1.3)
    with GradNormCallback(tmp_path, privacy_engine=private.engine, delta=DELTA) as callback:
        callback.attach(private.optimizer)

    text = read_text(tmp_path, "grad_norm/dp_settings")
    rows = dict(line.strip("|").split(" | ", 1) for line in text.splitlines()[2:])
    rows = {name.strip(): value.strip() for name, value in rows.items()}
    assert rows == {
        "Clipping bound C (max_grad_norm)": "0.5",
        "Noise multiplier": "1.3",
        "Expected batch size": "16",
        "Sample rate": "0.25",
        "Clipping mode": "flat",
        "Grad sample mode": "per-sample gradients (hooks, functorch or ew)",
        "Loss reduction": "mean",
        "Secure mode": "off",
        "Distributed": "no",
        "Accountant": "prv",
        "Delta": "1e-05",
    }


def test_settings_without_engine_find_accountant() -> None:
    private = make_private(batch_size=8, dataset_size=64)
    settings = dp_settings(private.optimizer)
    assert settings["Accountant"] == "prv"
    assert settings["Sample rate"] == "0.125"
    assert "Delta" not in settings


def test_settings_list_per_layer_bounds() -> None:
    private = make_private(clipping="per_layer", max_grad_norm=[0.5, 1.0, 2.0, 0.25])
    settings = dp_settings(private.optimizer)
    assert settings["Clipping mode"] == "per_layer"
    assert settings["Clipping bound C (max_grad_norm)"] == (
        "[0.5, 1, 2, 0.25], one per parameter (L2 norm 2.30489)"
    )


def test_settings_describe_adaptive_clipping() -> None:
    private = make_private(
        clipping="adaptive",
        max_grad_norm=1.0,
        poisson=False,
        target_unclipped_quantile=0.7,
        clipbound_learning_rate=0.2,
        max_clipbound=5.0,
        min_clipbound=0.1,
        unclipped_num_std=2.0,
    )
    settings = dp_settings(private.optimizer)
    assert settings["Clipping mode"] == "adaptive"
    assert settings["Clipping bound C (max_grad_norm)"] == (
        "1 at attach, adapted each step towards the unclipped quantile 0.7 within [0.1, 5]"
    )


def test_epsilon_every_logged_steps_and_last(tmp_path: Path) -> None:
    private = make_private(batch_size=8, dataset_size=64)
    with GradNormCallback(
        tmp_path, log_every=2, privacy_engine=private.engine, delta=DELTA, epsilon_every=2
    ) as callback:
        callback.attach(private.optimizer)
        train(private, 7)

    # Logged steps 0, 2, 4 and 6: epsilon at the 1st and 3rd, and after the last step (6).
    scalars = read_events(tmp_path).Scalars(EPSILON_TAG)
    assert [event.step for event in scalars] == [0, 4, 6]
    sample_rate = 8 / 64
    for event in scalars:
        reference = PRVAccountant()
        reference.history = [(1.0, sample_rate, event.step + 1)]
        assert event.value == pytest.approx(reference.get_epsilon(DELTA), rel=1e-6)


def test_final_epsilon_after_unlogged_steps(tmp_path: Path) -> None:
    private = make_private(batch_size=8, dataset_size=64)
    with GradNormCallback(
        tmp_path, log_every=4, privacy_engine=private.engine, delta=DELTA
    ) as callback:
        callback.attach(private.optimizer)
        train(private, 6)

    scalars = read_events(tmp_path).Scalars(EPSILON_TAG)
    assert [event.step for event in scalars] == [0, 5]


def test_no_epsilon_without_logged_step(tmp_path: Path) -> None:
    private = make_private()
    with GradNormCallback(tmp_path, privacy_engine=private.engine, delta=DELTA) as callback:
        callback.attach(private.optimizer)

    assert EPSILON_TAG not in read_events(tmp_path).Tags()["scalars"]


def test_epsilon_failure_keeps_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    private = make_private()
    calls = []

    def fail(delta: float) -> float:
        calls.append(delta)
        raise RuntimeError("accountant failed")

    monkeypatch.setattr(private.engine, "get_epsilon", fail)
    with GradNormCallback(
        tmp_path, privacy_engine=private.engine, delta=DELTA, epsilon_every=1
    ) as callback:
        callback.attach(private.optimizer)
        train(private, 3)

    # A failed computation is not tried again: the history it failed on only grows.
    assert calls == [DELTA]
    assert callback.dashboard.failures == 1
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert logged == [
        "privacy/epsilon is not written from step 0 on, because computing epsilon failed: "
        "RuntimeError: accountant failed. Training continues."
    ]
    assert callback.step == 3
    tags = read_events(tmp_path).Tags()["scalars"]
    assert EPSILON_TAG not in tags
    assert "grad_norm/median" in tags


def test_training_identical_with_epsilon(tmp_path: Path) -> None:
    plain = make_private(seed=3)
    train(plain, 4)

    observed = make_private(seed=3)
    with GradNormCallback(
        tmp_path, privacy_engine=observed.engine, delta=DELTA, epsilon_every=1
    ) as callback:
        callback.attach(observed.optimizer)
        train(observed, 4)

    for expected, actual in zip(plain.model.parameters(), observed.model.parameters()):
        assert torch.equal(expected, actual)
    assert len(read_events(tmp_path).Scalars(EPSILON_TAG)) == 4


def test_other_ranks_write_no_dashboard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dashboard, "is_rank_zero", lambda: False)
    private = make_private()
    with GradNormCallback(tmp_path, privacy_engine=private.engine, delta=DELTA) as callback:
        callback.attach(private.optimizer)
        train(private, 2)

    tags = read_events(tmp_path).Tags()
    assert tags["tensors"] == []
    assert EPSILON_TAG not in tags["scalars"]


def test_step_setter_moves_record_step(tmp_path: Path) -> None:
    private = make_private()
    with GradNormCallback(tmp_path, log_every=5) as callback:
        callback.attach(private.optimizer)
        callback.step = 10
        train(private, 2)
        assert callback.last_record is not None
        assert callback.last_record.step == 10
        assert callback.step == 12

    histograms = read_events(tmp_path).Histograms("grad_norm/before_clipping")
    assert [event.step for event in histograms] == [10]


@pytest.mark.parametrize("value", [-1, 1.5, True, "3"])
def test_step_setter_rejects_invalid(tmp_path: Path, value: object) -> None:
    with GradNormCallback(tmp_path) as callback:
        with pytest.raises(ValueError, match=r"step must be a non-negative integer, got"):
            callback.step = value  # type: ignore[assignment]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"delta": 1e-5}, ValueError, r"privacy_engine and delta must be given together"),
        ({"privacy_engine": "engine", "delta": 1e-5}, TypeError, r"privacy_engine must be"),
        ({"delta": 0.0}, ValueError, r"delta must be a number between 0 and 1.*0\.0"),
        ({"delta": 1}, ValueError, r"delta must be a number between 0 and 1.*, got 1$"),
        ({"delta": True}, ValueError, r"delta must be a number.*True"),
        ({"delta": "1e-5"}, ValueError, r"delta must be a number.*'1e-5'"),
        ({"epsilon_every": 0}, ValueError, r"epsilon_every must be a positive integer, got 0"),
        ({"epsilon_every": True}, ValueError, r"epsilon_every must be a positive integer"),
    ],
)
def test_privacy_options_rejected(
    tmp_path: Path, options: dict, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        GradNormCallback(tmp_path, **options)


def test_engine_without_delta_rejected(tmp_path: Path) -> None:
    private = make_private()
    with pytest.raises(ValueError, match=r"privacy_engine and delta must be given together"):
        GradNormCallback(tmp_path, privacy_engine=private.engine)


def test_dashboard_write_failure_is_counted(tmp_path: Path) -> None:
    private = make_private()
    callback = GradNormCallback(tmp_path)
    callback._writer.add_custom_scalars = None  # type: ignore[assignment, union-attr]
    callback.attach(private.optimizer)
    train(private, 1)
    callback.close()

    assert callback.dashboard.failures == 1
    assert callback.last_record is not None


def test_shared_writer_keeps_both_layouts(tmp_path: Path) -> None:
    first = make_private(seed=0)
    second = make_private(seed=1)
    writer = SummaryWriter(str(tmp_path))
    with GradNormCallback(writer, tag_prefix="encoder") as encoder_callback:
        with GradNormCallback(writer, tag_prefix="decoder") as decoder_callback:
            encoder_callback.attach(first.optimizer)
            decoder_callback.attach(second.optimizer)
    writer.close()

    titles = set(chart_patterns(read_layout(tmp_path)))
    assert titles == {
        "Per-sample gradient norms against C (encoder)",
        "Fraction of samples clipped (encoder)",
        "Per-sample gradient norms against C (decoder)",
        "Fraction of samples clipped (decoder)",
    }


def test_infinite_epsilon_warns_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    private = make_private()
    calls = []

    def infinite(delta: float) -> float:
        calls.append(delta)
        return float("inf")

    monkeypatch.setattr(private.engine, "get_epsilon", infinite)
    with GradNormCallback(
        tmp_path, privacy_engine=private.engine, delta=DELTA, epsilon_every=1
    ) as callback:
        callback.attach(private.optimizer)
        train(private, 3)

    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert calls == [DELTA]
    assert logged == [
        "privacy/epsilon is not written from step 0 on, because epsilon is inf. "
        "Training continues."
    ]
    assert callback.dashboard.failures == 0
