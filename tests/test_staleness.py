"""Lag, divergence and the combined staleness S, against hand numbers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flux.control.staleness import StalenessMonitor, batch_signals, combined_staleness, divergence, lag_stats

torch.set_num_threads(1)


def test_lag_stats_hand_numbers():
    # lags at version 5: [0, 0, 1, 2, 5]; p95 interpolates between 2 and 5 at 0.8 → 4.4
    stats = lag_stats(torch.tensor([5, 5, 4, 3, 0]), 5)
    assert stats == pytest.approx({"mean": 1.6, "p95": 4.4, "max": 5.0})
    assert lag_stats([7, 7], 7) == {"mean": 0.0, "p95": 0.0, "max": 0.0}


def test_lag_stats_mask_and_empty():
    versions = np.array([[-1, -1, 3, 4], [-1, 2, 2, -1]])
    mask = versions >= 0
    assert lag_stats(versions, 4, mask) == pytest.approx({"mean": 1.25, "p95": 2.0, "max": 2.0})
    assert lag_stats(versions, 4, np.zeros_like(mask)) == {"mean": 0.0, "p95": 0.0, "max": 0.0}


def test_divergence_hand_numbers_ignores_masked_tokens():
    logp = torch.tensor([[-1.0, -2.0, 0.0]])
    behav = torch.tensor([[-1.5, -1.0, -1e4]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    d = divergence(logp, behav, mask)
    # x = logp − behav = [0.5, −1]: k3 = exp(x) − x − 1
    k3 = ((math.exp(0.5) - 1.5) + (math.exp(-1.0) + 1.0 - 1.0)) / 2
    assert d == pytest.approx({"abs_log_ratio": 0.75, "k3": k3})
    assert divergence(logp, logp, mask) == {"abs_log_ratio": 0.0, "k3": 0.0}
    assert divergence(logp, behav, torch.zeros_like(mask)) == {"abs_log_ratio": 0.0, "k3": 0.0}


def test_combined_staleness_worked_example():
    # mean lag 1.6 of η_max 4 → 0.4; D = 0.05 of D_ref 0.1 → 0.5; S = ½·0.4 + ½·0.5
    assert combined_staleness(1.6, 0.05, eta_max=4, d_ref=0.1) == pytest.approx(0.45)
    # weights: w_lag = 0.25 → 0.25·0.4 + 0.75·0.5
    assert combined_staleness(1.6, 0.05, eta_max=4, d_ref=0.1, w_lag=0.25) == pytest.approx(0.475)
    # each term saturates at 1
    assert combined_staleness(10.0, 0.05, eta_max=4, d_ref=0.1) == pytest.approx(0.75)
    assert combined_staleness(10.0, 3.0, eta_max=4, d_ref=0.1) == pytest.approx(1.0)
    assert combined_staleness(0.0, 0.0, eta_max=4, d_ref=0.1) == 0.0


def test_combined_staleness_zero_eta_max_guards_division():
    assert combined_staleness(0.0, 0.0, eta_max=0, d_ref=0.1) == 0.0
    assert combined_staleness(0.5, 0.0, eta_max=0, d_ref=0.1) == pytest.approx(0.5)
    assert combined_staleness(0.0, 0.2, eta_max=0, d_ref=0.0) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        combined_staleness(1.0, 0.1, eta_max=4, d_ref=0.1, w_lag=1.5)


@settings(max_examples=60, deadline=None)
@given(st.floats(0, 100), st.floats(0, 10), st.floats(0, 8), st.floats(0, 1), st.floats(0, 1))
def test_combined_staleness_in_unit_interval(lag, div, eta_max, d_ref, w_lag):
    s = combined_staleness(lag, div, eta_max=eta_max, d_ref=d_ref, w_lag=w_lag)
    assert 0.0 <= s <= 1.0 + 1e-12


def test_batch_signals_split_the_lag_0_tokens_out():
    versions = torch.tensor([[-1, 4, 4], [-1, 3, 1]])           # at version 4: lags [0, 0, 1, 3]
    mask = (versions >= 0).float()
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, -0.5, -0.5]])
    behav = torch.tensor([[0.0, -1.2, -1.8], [0.0, -0.5, -2.0]])
    out = batch_signals(logp, behav, mask, versions, 4, tis_cap=2.0)
    x = np.array([0.2, -0.2, 0.0, 1.5])                          # log π − log μ on the real tokens
    k3 = lambda v: float(np.mean(np.expm1(v) - v))
    w = np.exp(x)
    assert out["sig_tokens"] == 4 and out["lag0_tokens"] == 2 and out["lag_mean"] == pytest.approx(1.0)
    assert out["sig_k3"] == pytest.approx(k3(x)) and out["sig_k3_lag0"] == pytest.approx(k3(x[:2]))
    assert out["sig_ess_loss"] == pytest.approx(1 - w.sum() ** 2 / (w ** 2).sum() / 4)
    assert out["sig_is_cap"] == pytest.approx(0.25) and out["sig_is_cap_lag0"] == 0.0   # e^1.5 > 2
    same = batch_signals(logp, logp + 0.3, mask, versions, 4)    # a constant offset: no weight spread
    assert same["sig_ess_loss"] == pytest.approx(0.0, abs=1e-12) and same["sig_k3"] > 0


def test_the_monitor_subtracts_the_lag_0_floor():
    mon = StalenessMonitor("k3", eta_max=4, d_ref=0.1, window=3)
    # a synchronous batch: every token lag 0, k3 0.02 (the engine/learner mismatch): S = 0
    first = mon.update({"lag_mean": 0.0, "tokens": 100, "lag0_tokens": 100, "sig_k3": 0.02, "sig_k3_lag0": 0.02})
    assert first == pytest.approx({"staleness": 0.0, "staleness_floor": 0.02, "staleness_excess": 0.0})
    # an asynchronous batch with no lag-0 token, k3 0.035: excess 0.015 of d_ref 0.1
    s = mon.update({"lag_mean": 2.0, "tokens": 100, "lag0_tokens": 0, "sig_k3": 0.035, "sig_k3_lag0": 0.0})
    assert s == pytest.approx({"staleness": 0.15, "staleness_floor": 0.02, "staleness_excess": 0.015})
    # the floor is token-weighted over the last `window` batches with lag-0 tokens
    mon.update({"lag_mean": 1.0, "tokens": 100, "lag0_tokens": 300, "sig_k3": 0.05, "sig_k3_lag0": 0.04})
    assert mon.floor() == pytest.approx((0.02 * 100 + 0.04 * 300) / 400)
    for _ in range(3):
        mon.update({"lag_mean": 0.0, "tokens": 10, "lag0_tokens": 10, "sig_k3": 0.01, "sig_k3_lag0": 0.01})
    assert mon.floor() == pytest.approx(0.01)                   # the old batches fell out of the window
    again = StalenessMonitor("k3", eta_max=4, d_ref=0.1, window=3)
    again.restore(mon.state())
    assert again.floor() == mon.floor()
    # with w_lag > 0 the lag term comes back: ½·min(1, 2/4) + ½·min(1, 0.04/0.1)
    lagged = StalenessMonitor("k3", eta_max=4, d_ref=0.1, w_lag=0.5)
    assert lagged.update({"lag_mean": 2.0, "lag0_tokens": 0, "sig_k3": 0.04})["staleness"] == pytest.approx(0.45)
    with pytest.raises(ValueError):
        StalenessMonitor("kl", eta_max=4, d_ref=0.1)
