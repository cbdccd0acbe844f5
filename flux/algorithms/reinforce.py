"""REINFORCE with a group-mean baseline, and REINFORCE++ (global advantage normalisation, KL in reward).

- `reinforce`: Williams 1992, "Simple statistical gradient-following algorithms for connectionist
  reinforcement learning", with the mean reward of the prompt's group as baseline and no std scaling
  (the baseline lowers variance without changing the expected gradient; dividing by a per-group std
  would re-weight prompts by how consistently they are solved).
- `reinforce_pp`: REINFORCE++ (Hu 2025, "REINFORCE++: A Simple and Efficient Approach for Aligning Large
  Language Models", arXiv:2501.03262). No critic and no per-prompt grouping: the advantage is the
  reward normalised with the mean/std of the *whole batch*, which is stable with one sample per prompt
  and avoids the per-group std's over-weighting of easy/hard prompts. The KL to the reference is a
  per-token *reward* (k1 estimate, log π − log π_ref), summed from each token to the end of the response:
      A_t = norm(r) − kl_coef · Σ_{s ≥ t} (log π_prox(a_s) − log π_ref(a_s)).
  `group_baseline=True` subtracts the group mean before the global normalisation (the paper's
  "REINFORCE++-baseline", for n > 1 samples per prompt).

Both losses are the decoupled clipped loss of `losses.py` (REINFORCE++ uses PPO's clipped surrogate; in
Flux the clip and truncated importance weights also correct stale asynchronous samples).

Where the KL goes, and why: the learner calls `advantages(rewards (G, n))` with scalar rewards only, so
the per-token KL part of A_t is added inside `reinforce_pp_loss`, which sees the log-probs. The paper
normalises after adding the KL; here only the reward part is normalised (over the whole batch, which the
loss, seeing one micro-batch, could not do), so kl_coef is in units of the batch reward std.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flux.algorithms import register_algorithm
from flux.algorithms.grpo import grpo_advantages, grpo_loss
from flux.algorithms.losses import decoupled_policy_loss, masked_mean


def reinforce_advantages(rewards: Tensor) -> Tensor:
    """REINFORCE with a group-mean baseline: A_i = r_i − mean_group(r).

    A single-sample group or a group of equal rewards gets exactly 0.

    Shape: rewards (G, n) groups × samples → advantages (G, n) float32.
    """
    return grpo_advantages(rewards, scale_std=False)


def reinforce_pp_advantages(rewards: Tensor, *, eps: float = 1e-6, group_baseline: bool = False) -> Tensor:
    """REINFORCE++ advantages: (r − mean_batch) / (std_batch + eps) over every sample of the batch.

    `group_baseline=True` first subtracts each group's mean (REINFORCE++-baseline). The std is the
    unbiased sample std; a batch of one sample, or of equal (centred) values, gets exactly 0.
    The statistics are those of the matrix passed in: a caller that passes one group at a time gets
    per-group normalisation.

    Shape: rewards (G, n) groups × samples → advantages (G, n) float32.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 2:
        raise ValueError(f"rewards must be shaped (groups, samples), got {tuple(r.shape)}")
    if group_baseline:
        r = grpo_advantages(r, scale_std=False)
    if r.numel() < 2 or bool(r.max() == r.min()):
        return torch.zeros_like(r)
    return (r - r.mean()) / (r.std() + eps)


def kl_to_go(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """Per-token KL penalty of REINFORCE++: Σ_{s ≥ t} mask_s · (logprobs_s − ref_logprobs_s).

    A token's action influences every later token, so it is charged the KL of the rest of the response
    (return-to-go with γ = 1), not only its own. k1 estimator (log ratio): it is a reward, so it needs to
    be unbiased in sum, not non-negative per token. Masked positions contribute 0; no gradient.

    Shape: logprobs, ref_logprobs, mask (b, t) → (b, t).
    """
    kl = torch.where(mask > 0, (logprobs - ref_logprobs).detach(), torch.zeros_like(logprobs))
    return kl.flip(-1).cumsum(-1).flip(-1)


def reinforce_pp_loss(logprobs: Tensor, proximal_logprobs: Tensor | None, behaviour_logprobs: Tensor,
                      advantages: Tensor, mask: Tensor, ref_logprobs: Tensor | None = None, *, clip_low: float = 0.2,
                      clip_high: float = 0.2, kl_coef: float = 0.0, tis_cap: float | None = 2.0, correction: bool = True,
                      agg: str = "token-mean") -> tuple[Tensor, dict[str, float]]:
    """REINFORCE++ loss: the decoupled clipped loss on A_t = A − kl_coef · `kl_to_go`(π_prox, π_ref).

    The KL uses the proximal log-probs (the behaviour ones when there is no proximal): they come from
    the learner's own forward pass, like the reference's, so the log ratio carries no rollout-engine
    numerics and is measured for the policy being updated rather than a possibly stale sampler.
    Without `ref_logprobs` or with kl_coef = 0 this is exactly the decoupled clipped loss.

    Shape: logprobs, proximal_logprobs, behaviour_logprobs, mask, ref_logprobs (b, t); advantages (b,)
    or (b, t) → (scalar loss, stats). Stats: those of `decoupled_policy_loss` plus kl (mean per-token
    k1 against the reference, when given), kl_penalty (mean of kl_coef · KL-to-go) and loss.
    """
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logprobs)
    extra: dict[str, float] = {}
    if ref_logprobs is not None:
        anchor = behaviour_logprobs if proximal_logprobs is None else proximal_logprobs
        anchor, ref = anchor.to(logprobs.dtype), ref_logprobs.to(logprobs.dtype)
        on = mask > 0
        extra["kl"] = masked_mean(torch.where(on, anchor - ref, torch.zeros_like(ref)), mask).item()
        if kl_coef > 0:
            penalty = kl_coef * kl_to_go(anchor, ref, mask)
            adv = adv - penalty
            extra["kl_penalty"] = masked_mean(penalty, mask).item()
    loss, stats = decoupled_policy_loss(
        logprobs, proximal_logprobs, behaviour_logprobs, adv, mask,
        clip_low=clip_low, clip_high=clip_high, tis_cap=tis_cap, correction=correction, agg=agg,
    )
    stats.update(extra)
    stats["loss"] = loss.item()
    return loss, stats


REINFORCE = register_algorithm("reinforce", advantages=reinforce_advantages, loss=grpo_loss, reference=("kl_coef",))
REINFORCE_PP = register_algorithm("reinforce_pp", advantages=reinforce_pp_advantages, loss=reinforce_pp_loss,
                                  reference=("kl_coef",))
