"""Epsilon per step and the step choices of the dry run, against Opacus's accountants."""

from __future__ import annotations

import warnings

import pytest
from opacus.accountants import create_accountant

from dp_grad_callbacks.dryrun import (
    EpsilonCalculator,
    PrivacySettings,
    default_epsilon_every,
    dry_run,
    epsilon_steps,
)
from dp_grad_callbacks.epsilon import AccountantError, EpsilonCostError


def opacus_epsilon(accountant: str, noise_multiplier: float, sample_rate: float, steps: int,
                   delta: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = create_accountant(accountant)
        reference.history = [(noise_multiplier, sample_rate, steps)]
        return reference.get_epsilon(delta)


@pytest.mark.parametrize("steps", [1, 7, 250, 10_000])
def test_rdp_epsilon_equals_opacus_accountant(steps):
    calculator = EpsilonCalculator(noise_multiplier=1.1, sample_rate=0.02, accountant="rdp")

    epsilon = calculator.epsilon(steps, 1e-5)

    assert epsilon == pytest.approx(opacus_epsilon("rdp", 1.1, 0.02, steps, 1e-5), rel=1e-12)


@pytest.mark.parametrize("accountant", ["gdp", "prv"])
def test_gdp_prv_epsilon_equal_opacus_accountant(accountant):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        calculator = EpsilonCalculator(noise_multiplier=1.0, sample_rate=0.05, accountant=accountant)

    epsilon = calculator.epsilon(40, 1e-5)

    assert epsilon == pytest.approx(opacus_epsilon(accountant, 1.0, 0.05, 40, 1e-5), rel=1e-12)


def test_epsilon_grows_with_steps():
    calculator = EpsilonCalculator(noise_multiplier=1.0, sample_rate=0.01)

    values = [calculator.epsilon(steps, 1e-5) for steps in (1, 10, 100, 1000)]

    assert values == sorted(values)
    assert values[0] < values[-1]


@pytest.mark.parametrize(
    ("steps", "every", "expected"),
    [
        (10, 1, list(range(10))),
        (10, 4, [3, 7, 9]),
        (10, 5, [4, 9]),
        (3, 10, [2]),
        (1, 1, [0]),
    ],
)
def test_epsilon_steps_include_last_step(steps, every, expected):
    assert epsilon_steps(steps, every) == expected


def test_default_epsilon_every_per_accountant():
    assert default_epsilon_every("rdp", 10_000) == 1
    assert default_epsilon_every("gdp", 10_000) == 100
    assert default_epsilon_every("prv", 10_000) == 500
    assert default_epsilon_every("prv", 5) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_multiplier", 0.0),
        ("noise_multiplier", float("inf")),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("delta", 0.0),
        ("delta", 1.0),
        ("accountant", "moments"),
        ("epsilon_every", 0),
    ],
)
def test_privacy_settings_reject_bad_value(field, value):
    arguments = {"noise_multiplier": 1.0, "sample_rate": 0.1, field: value}

    with pytest.raises(ValueError, match=field):
        PrivacySettings(**arguments)


@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_size", 0), ("steps", -1), ("log_every", 1.5), ("max_grad_norm", 0.0),
     ("sigma", -0.1), ("median_ratio", 0.0), ("tag_prefix", "/")],
)
def test_dry_run_rejects_bad_value_before_writing(tmp_path, option, value):
    arguments = {"max_grad_norm": 1.0, "batch_size": 4, "steps": 2, option: value}

    with pytest.raises(ValueError):
        dry_run(tmp_path / "run", **arguments)

    assert not (tmp_path / "run").exists()


def test_costly_prv_epsilon_rejected_before_writing(tmp_path):
    privacy = PrivacySettings(noise_multiplier=0.01, sample_rate=1.0, accountant="prv")

    with pytest.raises(EpsilonCostError, match="5 steps at noise multiplier 0.01"):
        dry_run(tmp_path / "run", max_grad_norm=1.0, batch_size=4, steps=5, privacy=privacy)

    assert not (tmp_path / "run").exists()


@pytest.mark.filterwarnings("ignore")
def test_failing_accountant_error_names_parameters():
    calculator = EpsilonCalculator(noise_multiplier=0.01, sample_rate=1.0, accountant="gdp")

    with pytest.raises(AccountantError) as caught:
        calculator.epsilon(1, 1e-5)

    assert str(caught.value).startswith(
        "the gdp accountant failed to compute epsilon after 1 step at noise multiplier 0.01 "
        "and sample rate 1 (ValueError: "
    )
    assert str(caught.value).endswith("Use the rdp accountant or a larger noise multiplier")
