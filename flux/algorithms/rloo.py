"""RLOO: REINFORCE with a leave-one-out baseline, no critic.

Ahmadian et al. 2024, "Back to Basics: Revisiting REINFORCE Style Optimization for Learning from Human
Feedback in LLMs" (arXiv:2402.14740); the estimator is Kool et al. 2019, "Buy 4 REINFORCE Samples, Get a
Baseline for Free!". Each prompt is sampled n times and a sample's baseline is the mean reward of the
*other* n − 1 samples, so the baseline is independent of the sample it scores and the gradient stays
unbiased (a group mean that includes the sample itself biases it by a factor (n − 1)/n).

The loss is GRPO's (`grpo.grpo_loss`, same defaults): the decoupled clipped loss of `losses.py`, which
importance-corrects stale samples from asynchronous generation, plus an optional k3 KL term. The paper's
RLOO is on-policy and unclipped; the clip only matters once samples are off-policy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flux.algorithms import register_algorithm
from flux.algorithms.grpo import grpo_loss


def rloo_advantages(rewards: Tensor) -> Tensor:
    """Leave-one-out advantages: A_i = r_i − mean_{j≠i} r_j within each group.

    Equals n/(n − 1) · (r_i − mean_group). A group with a single sample has no other sample to compare
    with, and a group whose rewards are all equal carries no signal: both get exactly 0.

    Shape: rewards (G, n) groups × samples → advantages (G, n) float32.
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    if r.dim() != 2:
        raise ValueError(f"rewards must be shaped (groups, samples), got {tuple(r.shape)}")
    n = r.shape[1]
    if n < 2:
        return torch.zeros_like(r)
    baseline = (r.sum(dim=1, keepdim=True) - r) / (n - 1)
    adv = r - baseline
    # Equal rewards: the difference is float round-off of the sum; make it exactly 0.
    flat = r.amax(dim=1, keepdim=True) == r.amin(dim=1, keepdim=True)
    return torch.where(flat, torch.zeros_like(adv), adv)


RLOO = register_algorithm("rloo", advantages=rloo_advantages, loss=grpo_loss, reference=("kl_coef",))
