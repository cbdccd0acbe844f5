"""GRPO: group-relative advantages, no critic (Shao et al. 2024, "DeepSeekMath", arXiv:2402.03300).

Each prompt is sampled n times; a sample's advantage is its reward standardised within its group, and
every token of the sample shares it. The policy loss is the decoupled clipped loss of `losses.py`, so
stale samples from asynchronous generation are importance-corrected, plus an optional k3 KL penalty to
a frozen reference policy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flux.algorithms import register_algorithm
from flux.algorithms.losses import aggregate, decoupled_policy_loss, k3_kl


def grpo_advantages(rewards: Tensor, *, eps: float = 1e-6, scale_std: bool = True) -> Tensor:
    """Group-relative advantages: (r − mean_group) / (std_group + eps).

    `scale_std=False` drops the division (Dr. GRPO, Liu et al. 2025, "Understanding R1-Zero-Like
    Training"): dividing by the group std up-weights prompts that are nearly always solved or failed.
    The std is the unbiased sample std (as in TRL and verl). A group whose rewards are all equal, or
    that has a single sample, carries no signal and gets exactly 0 (no NaN, no eps-amplified noise).

    Shape: rewards (G, n) groups × samples → advantages (G, n) float32.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 2:
        raise ValueError(f"rewards must be shaped (groups, samples), got {tuple(r.shape)}")
    centred = r - r.mean(dim=1, keepdim=True)
    # Equal rewards: the centred value is float round-off, which / eps would blow up; zero it.
    flat = (r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True))
    if not scale_std:
        return torch.where(flat, torch.zeros_like(centred), centred)
    if r.shape[1] < 2:
        return torch.zeros_like(r)
    adv = centred / (r.std(dim=1, keepdim=True) + eps)
    return torch.where(flat, torch.zeros_like(adv), adv)


def grpo_loss(logprobs: Tensor, proximal_logprobs: Tensor | None, behaviour_logprobs: Tensor, advantages: Tensor,
              mask: Tensor, ref_logprobs: Tensor | None = None, *, clip_low: float = 0.2, clip_high: float = 0.2,
              kl_coef: float = 0.0, tis_cap: float | None = 2.0, correction: bool = True,
              agg: str = "token-mean") -> tuple[Tensor, dict[str, float]]:
    """GRPO loss = decoupled clipped policy loss + kl_coef · k3 KL(π ‖ π_ref), both aggregated by `agg`.

    GRPO puts the KL in the loss (not in the reward, unlike PPO-RLHF) with Schulman's k3 estimator
    (Shao et al. 2024, eq. 3-4). The KL term is added only when `ref_logprobs` is given and kl_coef > 0.

    Shape: logprobs, proximal_logprobs, behaviour_logprobs, mask, ref_logprobs (b, t); advantages (b,)
    or (b, t) → (scalar loss, stats). Stats: those of `decoupled_policy_loss` plus pg_loss, kl (when a
    reference is given) and loss.
    """
    pg_loss, stats = decoupled_policy_loss(
        logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask,
        clip_low=clip_low, clip_high=clip_high, tis_cap=tis_cap, correction=correction, agg=agg,
    )
    loss = pg_loss
    stats["pg_loss"] = pg_loss.item()
    if ref_logprobs is not None:
        kl = aggregate(k3_kl(logprobs, ref_logprobs.detach().to(logprobs.dtype)), mask, agg)
        stats["kl"] = kl.item()
        if kl_coef > 0:
            loss = loss + kl_coef * kl
    stats["loss"] = loss.item()
    return loss, stats


GRPO = register_algorithm("grpo", advantages=grpo_advantages, loss=grpo_loss, reference=("kl_coef",))
