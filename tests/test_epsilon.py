"""The memory check in front of Opacus's PRV accountant, alone and in the callback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from opacus.accountants import GaussianAccountant, PRVAccountant, RDPAccountant

from dp_grad_callbacks import GradNormCallback, epsilon, preview_epsilon
from dp_grad_callbacks.dashboard import EPSILON_TAG
from dp_grad_callbacks.epsilon import (
    AccountantError,
    EpsilonCostError,
    check_epsilon_cost,
    prv_mesh_points,
)

from conftest import make_private, read_events
from training import train

DELTA = 1e-5


def accountant_with(accountant, noise_multiplier, sample_rate, steps):
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return accountant


def test_mesh_points_match_get_epsilon(monkeypatch):
    accountant = accountant_with(PRVAccountant(), 1.0, 0.02, 300)
    used = []
    get_domain = accountant._get_domain

    def spy(**kwargs):
        domain = get_domain(**kwargs)
        used.append(domain.size)
        return domain

    expected = prv_mesh_points(accountant, DELTA)
    monkeypatch.setattr(accountant, "_get_domain", spy)
    accountant.get_epsilon(DELTA)

    assert used == [expected]
    assert 10_000 < expected < epsilon.PRV_MESH_LIMIT


def test_small_noise_prv_raises_with_fix():
    # Opacus would need about 1.5e8 points, over 20 GB, for these 12 steps.
    accountant = accountant_with(PRVAccountant(), 0.01, 0.5, 12)

    with pytest.raises(EpsilonCostError) as caught:
        check_epsilon_cost(accountant, DELTA)

    message = str(caught.value)
    assert "mesh points" in message
    assert "12 steps at noise multiplier 0.01" in message
    assert "Use the rdp accountant" in message


@pytest.mark.filterwarnings("ignore:GDP accounting is experimental")
@pytest.mark.parametrize("accountant", [RDPAccountant, GaussianAccountant])
def test_other_accountants_pass(accountant):
    check_epsilon_cost(accountant_with(accountant(), 0.01, 0.5, 12), DELTA)


def test_empty_prv_history_passes():
    check_epsilon_cost(PRVAccountant(), DELTA)


def test_callback_skips_costly_epsilon_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A low limit makes this short run too costly, so that a broken check costs seconds,
    # not the machine's memory.
    monkeypatch.setattr(epsilon, "PRV_MESH_LIMIT", 1_000)
    private = make_private()
    assert isinstance(private.engine.accountant, PRVAccountant)

    with GradNormCallback(
        tmp_path, privacy_engine=private.engine, delta=DELTA, epsilon_every=1
    ) as callback:
        callback.attach(private.optimizer)
        train(private, 3)

    assert callback.step == 3
    assert callback.dashboard.failures == 1
    logged = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(logged) == 1
    assert logged[0].startswith(
        "privacy/epsilon is not written from step 0 on, because computing epsilon failed: "
        "EpsilonCostError: the prv accountant would compute epsilon on"
    )
    assert EPSILON_TAG not in read_events(tmp_path).Tags()["scalars"]


def test_preview_epsilon_rejects_costly_prv():
    with pytest.raises(EpsilonCostError, match="mesh points"):
        preview_epsilon(noise_multiplier=0.01, histogram_noise=1.0, sample_rate=0.5, steps=12,
                        delta=DELTA, accountant="prv")


@pytest.mark.filterwarnings("ignore")
def test_preview_epsilon_wraps_solver_failure():
    with pytest.raises(AccountantError, match="the gdp accountant failed to compute epsilon "
                       "for 345 steps at noise multiplier 0.03, histogram noise 2"):
        preview_epsilon(noise_multiplier=0.03, histogram_noise=2.0, sample_rate=1 / 23,
                        steps=345, delta=DELTA, accountant="gdp")
