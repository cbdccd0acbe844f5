"""A custom algorithm, registered from outside Flux: rank-based group advantages.

Run it (from the directory holding this file):

    PYTHONPATH=. flux train --set algorithm=custom_algorithm:RANK --set algo.power=2

An algorithm is two pure functions of tensors (no config, no sockets): advantages from rewards, and a loss
from log-probs. Here the advantage of a sample is its centred rank within its group (ties share the
mean rank), scaled to [-1, 1] and raised to a power (> 1 concentrates the update on the group's best
and worst samples): robust to the scale and outliers of the reward. The loss is Flux's shared decoupled clipped loss, so stale samples from
asynchronous generation are corrected exactly as for the built-in algorithms.
"""

import torch

from flux.algorithms import register_algorithm
from flux.algorithms.losses import decoupled_policy_loss


def rank_advantages(rewards, *, power: float = 1.0):
    """Centred, tie-averaged ranks within each group, in [-1, 1], then sign(x)·|x|^power.

    Shape: rewards (G, n) → (G, n).
    """
    r = torch.as_tensor(rewards, dtype=torch.float32)
    n = r.shape[1]
    if n < 2:
        return torch.zeros_like(r)
    # rank of each sample = number of samples below it + half the ties (itself excluded)
    below = (r[:, None, :] < r[:, :, None]).sum(-1).float()
    ties = (r[:, None, :] == r[:, :, None]).sum(-1).float() - 1
    ranks = below + 0.5 * ties                      # 0 … n−1
    centred = 2 * ranks / (n - 1) - 1               # −1 … 1, 0 for a flat group
    return centred.sign() * centred.abs() ** power


@register_algorithm("rank", advantages=rank_advantages)
def rank_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None, *,
              clip: float = 0.2, tis_cap: float = 2.0):
    loss, stats = decoupled_policy_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask,
                                        clip_low=clip, clip_high=clip, tis_cap=tis_cap)
    stats["loss"] = loss.item()
    return loss, stats


# `algorithm: custom_algorithm:RANK` finds this object; `custom_algorithm:rank` finds it by name.
from flux.algorithms import get_algorithm

RANK = get_algorithm("rank")
