"""Staleness of a training batch: how old its tokens are and how far the policy has moved since.

Definitions (DESIGN.md section 2). A batch is trained at policy version v; token i was sampled by
version v_i, so its **lag** is v − v_i (steps). Its **divergence** D measures how far the current policy π
has actually moved from the behaviour policy μ that sampled the tokens, on those tokens.
The **combined staleness** is

    S = w_lag · min(1, mean_lag / η_max) + (1 − w_lag) · min(1, D / D_ref)   ∈ [0, 1]

η_max is the largest allowed lead in steps (a lag of η_max saturates the age term) and D_ref the
divergence regarded as "fully stale". The default w_lag = ½ weighs age and drift equally. S is what the
adaptive controller regulates; mean S < 0.2 is the stability target.

Pure functions; inputs may be torch tensors, numpy arrays or lists.
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
    on = _np(mask) > 0
    x = (_np(logprobs).astype(np.float64) - _np(behaviour_logprobs).astype(np.float64))[on]
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


def batch_staleness(logprobs: Any, behaviour_logprobs: Any, mask: Any, versions: Any, current_version: int, *,
                    eta_max: float, d_ref: float, w_lag: float = 0.5, metric: str = "k3") -> dict[str, float]:
    """Everything a learner step reports about staleness, in one flat dict.

    Keys: lag_mean, lag_p95, lag_max, div_abs_log_ratio, div_k3, staleness (S, with D the `metric`
    divergence: "k3" or "abs_log_ratio").

    Shape: all tensors (b, t).
    """
    if metric not in ("k3", "abs_log_ratio"):
        raise ValueError(f"metric must be 'k3' or 'abs_log_ratio', got {metric!r}")
    lag = lag_stats(versions, current_version, mask)
    div = divergence(logprobs, behaviour_logprobs, mask)
    s = combined_staleness(lag["mean"], div[metric], eta_max=eta_max, d_ref=d_ref, w_lag=w_lag)
    return {**{f"lag_{k}": v for k, v in lag.items()}, **{f"div_{k}": v for k, v in div.items()},
            "staleness": s}
