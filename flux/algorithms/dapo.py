"""DAPO: Decoupled clip and Dynamic sAmpling Policy Optimization (Yu et al. 2025, arXiv:2503.14476).

DAPO is GRPO with four changes; in Flux they live where they act:
  - **clip-higher**: asymmetric clip range [1 − 0.2, 1 + 0.28]. A wider upper bound lets low-probability
    tokens grow, which keeps the policy's entropy from collapsing (paper §3.1). Registered defaults here.
  - **token-level policy loss**: "token-mean" aggregation, so every token weighs the same and long
    (often wrong, often rambling) answers are not down-weighted per token (§3.3). Registered default.
  - **dynamic sampling**: groups whose rewards are all equal have zero advantage and no gradient; they
    are skipped and replaced by fresh groups (§3.2). That is the buffer's job: set
    `dynamic_sampling: true` in the config (the composer drops zero-variance groups and counts them).
  - **overlong reward shaping**: a soft length penalty added to the reward (§3.4), `overlong_penalty`
    below, applied by `dapo_advantages` before the group normalisation when `overlong_cache > 0`
    (`algo: {overlong_cache: 4}`); the length cap is `rollout.max_new_tokens`.
No KL term by default (kl_coef = 0): the paper drops it for long-CoT reasoning, where the policy is meant
to move far from the initial model.

Advantages are GRPO's after the overlong shaping; the loss is `grpo.grpo_loss` with these defaults.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flux.algorithms import register_algorithm
from flux.algorithms.grpo import grpo_advantages, grpo_loss


def overlong_penalty(lengths: Tensor, max_len: int, cache_len: int) -> Tensor:
    """DAPO's soft overlong punishment (Yu et al. 2025, eq. 13), a reward term in [−1, 0].

        0                                 if len ≤ max_len − cache_len
        ((max_len − cache_len) − len) / cache_len   if max_len − cache_len < len ≤ max_len
        −1                                if len > max_len

    The linear ramp over the last `cache_len` tokens tells the policy it is getting too long before the
    hard cut, instead of punishing a truncated but otherwise sound answer as hard as a wrong one.
    `cache_len = 0` is the hard step (0 up to max_len, −1 beyond).

    Shape: lengths (N,) response lengths in tokens → (N,) float32.
    """
    if not 0 <= cache_len <= max_len:
        raise ValueError(f"need 0 <= cache_len <= max_len, got cache_len={cache_len}, max_len={max_len}")
    n = torch.as_tensor(lengths, dtype=torch.float32)
    start = float(max_len - cache_len)
    ramp = (start - n) / max(cache_len, 1)
    penalty = torch.where(n <= start, torch.zeros_like(n), ramp)
    return torch.where(n > max_len, torch.full_like(n, -1.0), penalty)


def dapo_advantages(rewards: Tensor, lengths: Tensor | None = None, max_new_tokens: int | None = None, *,
                    eps: float = 1e-6, scale_std: bool = True, overlong_cache: int = 0,
                    overlong_coef: float = 1.0) -> Tensor:
    """GRPO advantages of rewards + overlong_coef · `overlong_penalty`(lengths, max_new_tokens, overlong_cache).

    `overlong_cache = 0` turns the shaping off (then lengths are not needed).

    Shape: rewards, lengths (G, n) → advantages (G, n) float32.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if overlong_cache > 0:
        if lengths is None or max_new_tokens is None:
            raise ValueError("overlong shaping needs response lengths and max_new_tokens")
        r = r + overlong_coef * overlong_penalty(lengths, max_new_tokens, overlong_cache).reshape(r.shape)
    return grpo_advantages(r, eps=eps, scale_std=scale_std)


# Clip-higher; everything else is GRPO's signature defaults.
DAPO = register_algorithm("dapo", advantages=dapo_advantages, loss=grpo_loss, reference=("kl_coef",),
                          defaults=dict(clip_high=0.28))
