"""Lag, divergence and the combined staleness S, against hand numbers."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flux.control.staleness import batch_staleness, combined_staleness, divergence, lag_stats

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


def test_batch_staleness_combines_the_pieces():
    versions = torch.tensor([[-1, 3, 3], [-1, -1, 1]])
    mask = (versions >= 0).float()
    logp = torch.tensor([[0.0, -1.0, -2.0], [0.0, 0.0, -0.5]])
    behav = torch.tensor([[0.0, -1.2, -1.8], [0.0, 0.0, -0.5]])
    out = batch_staleness(logp, behav, mask, versions, 4, eta_max=2, d_ref=0.5, metric="abs_log_ratio")
    # lags [1, 1, 3] → mean 5/3; |x| = [0.2, 0.2, 0] → 2/15
    assert out["lag_mean"] == pytest.approx(5 / 3) and out["lag_max"] == 3.0
    assert out["div_abs_log_ratio"] == pytest.approx(2 / 15)
    assert out["staleness"] == pytest.approx(0.5 * (5 / 6) + 0.5 * (2 / 15) / 0.5)
    with pytest.raises(ValueError):
        batch_staleness(logp, behav, mask, versions, 4, eta_max=2, d_ref=0.5, metric="kl")
