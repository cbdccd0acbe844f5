"""Staleness of a training batch: how old its tokens are, and how far off-policy they really are.

Definitions (docs/concepts.md, "Staleness"). A batch is trained at policy version v; token i was
sampled by version v_i, so its **lag** is v − v_i (steps). The lag is a hard bound (η_max: older
samples are dropped and counted) and a reported metric; it is *not* what the controller regulates, since
the lag is set by admission, that is by the controller itself.

What the controller regulates is how far the current policy π has moved from the behaviour policy μ
that sampled the tokens, **above the floor that exists at lag 0**: an engine and a learner never agree
exactly (other kernels, other precision, other batch shapes), so even a synchronous batch shows some
divergence, and that part is not staleness. The learner reports, per batch, each candidate signal over
all tokens and over the lag-0 tokens (`batch_signals`); the controller's `StalenessMonitor` estimates the
floor from the lag-0 tokens of recent batches and computes

    excess = max(0, signal − floor)
    S      = w_lag · min(1, mean_lag / η_max) + (1 − w_lag) · min(1, excess / d_ref)   ∈ [0, 1]

with the signal `staleness.signal` (default `k3`, the k3 estimate of KL(μ ‖ π) in nats per token) and
by default w_lag = 0, d_ref = 0.1: S = 0.1 means "the batch's tokens are 0.01 nats/token further from the
policy that trains on them than a synchronous batch's would be".

Candidate signals (all reported every step, as `sig_<name>`, `sig_<name>_lag0`):
- k3:       mean of exp(x) − x − 1, x = log π(y) − log μ(y) (Schulman 2020), ≥ 0 token by token;
- ess_loss: 1 − ESS/N of the token importance weights w = π/μ, ESS = (Σw)² / Σw² (Kish);
- is_cap:   fraction of tokens whose weight exceeds the truncated-IS cap (`tis_cap`, default 2).

Pure functions and one small state object; inputs may be torch tensors, numpy arrays or lists.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


def lag_stats(versions: Any, current_version: int, mask: Any = None) -> dict[str, float]:
    """Lag v − v_token over the tokens: mean, 95th percentile (linear interpolation) and max.

    Shape: versions (N,) or (b, t) ints; mask, if given, same shape (non-zero = a real token).
    An empty selection gives zeros.
    """
    v = _np(versions).astype(np.int64)
    if mask is not None:
        v = v[_np(mask) > 0]
    lag = (int(current_version) - v.reshape(-1)).astype(np.float64)
    if lag.size == 0:
        return {"mean": 0.0, "p95": 0.0, "max": 0.0}
    return {"mean": float(lag.mean()), "p95": float(np.percentile(lag, 95)), "max": float(lag.max())}


def divergence(logprobs: Any, behaviour_logprobs: Any, mask: Any) -> dict[str, float]:
    """How far π has moved from μ on the batch's tokens, as means over the masked tokens.

    - abs_log_ratio: mean |log π(y) − log μ(y)|.
    - k3: mean of exp(x) − x − 1 with x = log π(y) − log μ(y), the k3 estimator (Schulman 2020,
      "Approximating KL Divergence") of KL(μ ‖ π). The tokens were sampled from μ, so this is the
      direction k3 estimates without bias; it is ≥ 0 token by token.

    Shape: logprobs, behaviour_logprobs, mask (b, t) (or any equal shapes). Empty mask gives zeros.
    """
    return _divergence(_log_ratios(logprobs, behaviour_logprobs, mask))


def _log_ratios(logprobs: Any, behaviour_logprobs: Any, mask: Any) -> np.ndarray:
    """x = log π − log μ on the masked tokens (1-D, float64)."""
    on = _np(mask) > 0
    return (_np(logprobs).astype(np.float64) - _np(behaviour_logprobs).astype(np.float64))[on]


def _divergence(x: np.ndarray) -> dict[str, float]:
    if x.size == 0:
        return {"abs_log_ratio": 0.0, "k3": 0.0}
    return {"abs_log_ratio": float(np.abs(x).mean()), "k3": float((np.expm1(x) - x).mean())}


def combined_staleness(mean_lag: float, div: float, *, eta_max: float, d_ref: float,
                       w_lag: float = 0.5) -> float:
    """S = w_lag · min(1, mean_lag/η_max) + (1 − w_lag) · min(1, div/D_ref), in [0, 1].

    A zero η_max (fully synchronous) or D_ref makes its term a step: 0 when the quantity is 0, else 1
    (no division by zero). Negative inputs count as 0.
    """
    if not 0.0 <= w_lag <= 1.0:
        raise ValueError(f"w_lag must be in [0, 1], got {w_lag}")

    def term(x: float, scale: float) -> float:
        x = max(0.0, float(x))
        if scale <= 0:
            return 0.0 if x == 0 else 1.0
        return min(1.0, x / scale)

    return w_lag * term(mean_lag, eta_max) + (1.0 - w_lag) * term(div, d_ref)


SIGNALS = ("k3", "ess_loss", "is_cap")


def _signals(x: np.ndarray, tis_cap: float) -> dict[str, float]:
    """The candidate signals of log-ratios x = log π − log μ (1-D, float64), with abs_log_ratio beside."""
    out = _divergence(x)
    if x.size == 0:
        return {**out, "ess_loss": 0.0, "is_cap": 0.0}
    w = np.exp(np.clip(x, -50.0, 50.0))
    ess = w.sum() ** 2 / max(1e-300, float((w * w).sum()))
    return {**out, "ess_loss": float(max(0.0, 1.0 - ess / x.size)), "is_cap": float((w > tis_cap).mean())}


def batch_signals(logprobs: Any, behaviour_logprobs: Any, mask: Any, versions: Any, current_version: int,
                  tis_cap: float = 2.0) -> dict[str, float]:
    """What a learner step reports about staleness, in one flat dict (the controller turns it into S).

    Keys: lag_mean, lag_p95, lag_max, div_abs_log_ratio, div_k3, sig_tokens, lag0_tokens, and per candidate
    signal `sig_<name>` (over all tokens) and `sig_<name>_lag0` (over the tokens of lag 0 only).

    Shape: all tensors (b, t).
    """
    x = _log_ratios(logprobs, behaviour_logprobs, mask)
    fresh = (int(current_version) - _np(versions).astype(np.int64))[_np(mask) > 0] == 0
    lag = lag_stats(versions, current_version, mask)
    every, lag0 = _signals(x, tis_cap), _signals(x[fresh], tis_cap)
    out = {**{f"lag_{k}": v for k, v in lag.items()},
           "div_abs_log_ratio": every["abs_log_ratio"], "div_k3": every["k3"],
           "sig_tokens": int(x.size), "lag0_tokens": int(fresh.sum())}
    for name in SIGNALS:
        out[f"sig_{name}"], out[f"sig_{name}_lag0"] = every[name], lag0[name]
    return out


class StalenessMonitor:
    """The controller's view of staleness: the lag-0 floor of the regulated signal, and S.

    The floor is the token-weighted mean of `sig_<signal>_lag0` over the last `window` batches that had
    lag-0 tokens (a synchronous run's every batch; an asynchronous run's first ones and any generated on
    the newest weights), so it follows a drifting floor but not one batch's noise. Before any lag-0
    token has been seen the floor is 0.
    """

    def __init__(self, signal: str = "k3", *, eta_max: float, d_ref: float, w_lag: float = 0.0,
                 window: int = 20):
        if signal not in SIGNALS:
            raise ValueError(f"signal must be one of {', '.join(SIGNALS)}, got {signal!r}")
        self.signal, self.eta_max, self.d_ref, self.w_lag, self.window = signal, eta_max, d_ref, w_lag, window
        self.recent: list[list[float]] = []  # [Σ signal·tokens, tokens] of recent batches with lag-0 tokens

    def floor(self) -> float:
        n = sum(t for _, t in self.recent)
        return sum(v for v, _ in self.recent) / n if n else 0.0

    def update(self, m: dict) -> dict[str, float]:
        """One learner step's `batch_signals` → {staleness (S), staleness_floor, staleness_excess}."""
        n0 = int(m.get("lag0_tokens", 0))
        if n0 > 0:
            self.recent = [*self.recent, [float(m[f"sig_{self.signal}_lag0"]) * n0, n0]][-self.window:]
        floor = self.floor()
        excess = max(0.0, float(m.get(f"sig_{self.signal}", 0.0)) - floor)
        s = combined_staleness(float(m.get("lag_mean", 0.0)), excess, eta_max=self.eta_max, d_ref=self.d_ref,
                               w_lag=self.w_lag)
        return {"staleness": s, "staleness_floor": floor, "staleness_excess": excess}

    def state(self) -> dict:
        return {"recent": [list(r) for r in self.recent]}

    def restore(self, state: dict) -> None:
        self.recent = [[float(v), int(t)] for v, t in state.get("recent", [])][-self.window:]
