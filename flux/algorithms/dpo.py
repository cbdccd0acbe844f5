"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv:2305.18290), and its IPO variant.

DPO trains on (chosen, rejected) pairs against a frozen reference model, with no reward model and no
sampling in the loss. In Flux the pairs travel as two-sample groups through the same actors as every
other algorithm:
  - **offline**: a preference file (`{"prompt", "chosen", "rejected"}` JSONL) as `prompts`; generators
    do not sample, they score the given pair with their current weights and send it as a group with
    rewards (1, 0);
  - **online**: generators sample `rollout.group_size` completions per prompt, the reward function
    scores them, and the best and the worst of each group form the pair (online DPO, Guo et al. 2024,
    "Direct Language Model Alignment from Online AI Feedback"). Groups whose samples all score the same
    make no pair: the buffer drops them (counted as `dropped_zero_variance`) and more are admitted.
`dpo_pairs` marks the pair as advantages +1 (chosen) and −1 (rejected); the learner trains on those rows
only, each pair adjacent and kept in one micro-batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from flux.algorithms import register_algorithm

LOSS_TYPES = ("sigmoid", "ipo")


def dpo_pairs(rewards: Tensor) -> Tensor:
    """+1 on each group's best sample, −1 on its worst (first of ties), 0 elsewhere and for flat groups.

    Shape: rewards (G, n) → (G, n) float32.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 2:
        raise ValueError(f"rewards must be shaped (groups, samples), got {tuple(r.shape)}")
    out = torch.zeros_like(r)
    rows = torch.arange(r.shape[0])
    has_pair = r.amax(1) > r.amin(1)
    out[rows[has_pair], r.argmax(1)[has_pair]] = 1.0
    out[rows[has_pair], r.argmin(1)[has_pair]] = -1.0
    return out


def sequence_logprob(logprobs: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Sum (or mean, with `average`) of each row's masked token log-probs. Shape: (b, t) → (b,)."""
    m = mask.to(logprobs.dtype)
    total = (torch.where(mask > 0, logprobs, torch.zeros_like(logprobs))).sum(-1)
    return total / m.sum(-1).clamp(min=1.0) if average else total


def dpo_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor | None,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    ref_logprobs: Tensor | None = None,
    *,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    loss_type: str = "sigmoid",
    sft_coef: float = 0.0,
) -> tuple[Tensor, dict[str, float]]:
    """DPO loss over the pairs of a batch: rows with advantage > 0 are the chosen responses, rows with
    advantage < 0 the rejected ones, matched in order (the i-th chosen with the i-th rejected).

    With h = (log π(y_c) − log π_ref(y_c)) − (log π(y_r) − log π_ref(y_r)) (sequence log-probs):
      - "sigmoid" (DPO): −(1 − ε) log σ(β h) − ε log σ(−β h); ε = `label_smoothing` is the conservative
        DPO of Mitchell 2023 (labels flipped with probability ε);
      - "ipo" (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
        Preferences"): (h − 1/(2β))², with length-averaged log-probs as in TRL (IPO regresses the margin
        to a fixed target, so it does not push the likelihoods to ±∞ on deterministic preferences).
    `sft_coef` > 0 adds sft_coef · NLL of the chosen responses (token mean): RPO (Pang et al. 2024,
    "Iterative Reasoning Preference Optimization"; TRL's `rpo_alpha`). Plain DPO only widens the margin
    and often lowers the chosen likelihood too; the NLL term keeps the chosen answers likely, which is
    what makes greedy decoding better.
    Proximal and behaviour log-probs are not used: DPO's data is whatever produced the pairs.

    Shape: logprobs, mask, ref_logprobs (b, t); advantages (b,) → (scalar loss, stats). Stats: loss,
    pref_acc (pairs whose implicit reward β·(log π − log π_ref) ranks chosen above rejected; a tie counts
    ½, so the reference policy scores 0.5), margin
    (mean β·h), chosen_reward, rejected_reward, pairs, sft_nll (with sft_coef).
    """
    if ref_logprobs is None:
        raise ValueError("dpo needs reference log-probs")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: {', '.join(LOSS_TYPES)}")
    adv = advantages if advantages.dim() == 1 else advantages[:, 0]
    chosen, rejected = adv > 0, adv < 0
    if int(chosen.sum()) != int(rejected.sum()):
        raise ValueError(f"dpo needs as many chosen as rejected rows, got {int(chosen.sum())} and "
                         f"{int(rejected.sum())}")
    average = loss_type == "ipo"
    delta = (sequence_logprob(logprobs, mask, average)
             - sequence_logprob(ref_logprobs.detach().to(logprobs.dtype), mask, average))
    h = delta[chosen] - delta[rejected]
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    else:
        losses = (h - 1 / (2 * beta)) ** 2
    loss = losses.mean() if losses.numel() else logprobs.sum() * 0.0
    nll = None
    if sft_coef > 0 and losses.numel():
        on = (mask > 0) & chosen[:, None]
        nll = -(torch.where(on, logprobs, torch.zeros_like(logprobs))).sum() / on.sum().clamp(min=1)
        loss = loss + sft_coef * nll
    with torch.no_grad():
        n = max(1, h.numel())
        stats = {"loss": loss.item(), "pairs": float(h.numel()),
                 "pref_acc": (float((h > 0).sum()) + 0.5 * float((h == 0).sum())) / n, "margin": float((beta * h).sum()) / n,
                 "chosen_reward": float((beta * delta[chosen]).sum()) / n,
                 "rejected_reward": float((beta * delta[rejected]).sum()) / n}
        if nll is not None:
            stats["sft_nll"] = nll.item()
    return loss, stats


DPO = register_algorithm("dpo", advantages=dpo_pairs, loss=dpo_loss, reference=True, preference=True)
