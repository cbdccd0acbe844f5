"""PPO with a learned critic (Schulman et al. 2017, arXiv:1707.06347; RLHF form: Ouyang et al. 2022).

The critic is a separate model: a copy of the policy's backbone with a scalar value head (zero-initialised,
so the first values are 0), trained by its own AdamW at `learner.critic_lr` (see
`flux.learner.torch_learner.TorchCritic`). A separate copy is what verl and OpenRLHF do by default: the
value loss cannot pull the policy's features around, and the critic can be sized or initialised apart.

Per token of a response of length T, with the scalar reward r on the last token:
    r_t    = −kl_coef · (log μ(a_t) − log π_ref(a_t)) + [t = T] · r        (KL penalty in the reward)
    δ_t    = r_t + γ V(s_{t+1}) − V(s_t),   V(s_{T+1}) = 0
    A_t    = Σ_k (γλ)^k δ_{t+k}  (GAE, Schulman et al. 2016),   R_t = A_t + V(s_t)
then A is whitened over the batch's response tokens. The policy loss is the decoupled clipped loss of
`losses.py` (so stale asynchronous samples are importance-corrected), plus an optional k3 KL term in the
loss (`kl_loss_coef`, GRPO style) instead of, or besides, the KL in the reward. The critic loss is the
clipped value loss ½·max((V − R)², (V_old + clip(V − V_old, ±value_clip) − R)²).
"""

from __future__ import annotations

import torch
from torch import Tensor

from flux.algorithms import register_algorithm
from flux.algorithms.grpo import grpo_loss
from flux.algorithms.losses import aggregate, masked_mean


def gae(token_rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float = 1.0, lam: float = 0.95
        ) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over the response tokens of each row (Schulman et al. 2016).

    The response is the masked run of each row (prompt before it, padding after it both masked out);
    the value after the last response token is 0 (the episode ends). Masked positions get 0.

    Shape: token_rewards, values, mask (b, t) → (advantages (b, t), returns (b, t)), float32.
    """
    r, v = token_rewards.float(), values.float().detach()
    on = mask > 0
    adv = torch.zeros_like(r)
    running = torch.zeros(r.shape[0], dtype=r.dtype)
    next_value = torch.zeros_like(running)
    for t in reversed(range(r.shape[1])):
        delta = r[:, t] + gamma * next_value - v[:, t]
        running = torch.where(on[:, t], delta + gamma * lam * running, running)
        next_value = torch.where(on[:, t], v[:, t], next_value)
        adv[:, t] = torch.where(on[:, t], running, torch.zeros_like(running))
    returns = torch.where(on, adv + v, torch.zeros_like(adv))
    return adv, returns


def whiten(x: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(x − mean) / std over the masked positions (unbiased std); masked-out positions get 0."""
    on = mask > 0
    vals = x[on]
    if vals.numel() < 2:
        return torch.zeros_like(x)
    out = (x - vals.mean()) / (vals.std() + eps)
    return torch.where(on, out, torch.zeros_like(out))


def ppo_advantages(rewards: Tensor, values: Tensor, mask: Tensor, behaviour_logprobs: Tensor,
                   ref_logprobs: Tensor | None = None, *, gamma: float = 1.0, lam: float = 0.95,
                   kl_coef: float = 0.0, whiten_advantages: bool = True) -> tuple[Tensor, Tensor]:
    """Per-token PPO advantages and critic targets (see the module docstring for the formulas).

    The reward goes on each row's last response token; with kl_coef > 0 and `ref_logprobs`, every token
    also gets −kl_coef · (log μ − log π_ref) (k1, the sampler's own log-probs: the KL of what was sampled).

    Shape: rewards (b,); values, mask, behaviour_logprobs, ref_logprobs (b, t)
    → (advantages (b, t), returns (b, t)).
    """
    on = mask > 0
    if not bool(on.any(-1).all()):
        raise ValueError("every row needs at least one response token")
    last = on.shape[1] - 1 - on.flip(-1).to(torch.int64).argmax(-1)  # index of each row's last token
    token_rewards = torch.zeros(mask.shape, dtype=torch.float32)
    token_rewards[torch.arange(mask.shape[0]), last] = torch.as_tensor(rewards, dtype=torch.float32)
    if ref_logprobs is not None and kl_coef > 0:
        kl = torch.where(on, behaviour_logprobs.float() - ref_logprobs.float(), torch.zeros_like(token_rewards))
        token_rewards = token_rewards - kl_coef * kl
    adv, returns = gae(token_rewards, values, mask, gamma=gamma, lam=lam)
    return (whiten(adv, mask) if whiten_advantages else adv), returns


def ppo_loss(logprobs: Tensor, proximal_logprobs: Tensor | None, behaviour_logprobs: Tensor, advantages: Tensor,
             mask: Tensor, ref_logprobs: Tensor | None = None, *, clip_low: float = 0.2, clip_high: float = 0.2,
             kl_loss_coef: float = 0.0, tis_cap: float | None = 2.0, correction: bool = True,
             agg: str = "token-mean") -> tuple[Tensor, dict[str, float]]:
    """PPO's policy loss: the decoupled clipped surrogate on per-token advantages, + kl_loss_coef · k3 KL.

    Shape: as `grpo.grpo_loss` (advantages (b, t)). Stats: those of `grpo_loss`.
    """
    return grpo_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs,
                     clip_low=clip_low, clip_high=clip_high, kl_coef=kl_loss_coef, tis_cap=tis_cap,
                     correction=correction, agg=agg)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *,
               value_clip: float | None = 0.2, agg: str = "token-mean") -> tuple[Tensor, dict[str, float]]:
    """Clipped value loss: ½ · max((V − R)², (V_old + clip(V − V_old, −c, c) − R)²), aggregated by `agg`.

    Clipping keeps one update from moving a value estimate further than `value_clip` from the one the
    advantages were computed with (as the policy's ratio clip does); `value_clip=None` is plain MSE.

    Shape: values (with grad), old_values, returns, mask (b, t) → (scalar loss, stats). Stats: vf_loss,
    vf_clip_frac (tokens where the clipped branch is the larger), value_mean, return_mean,
    explained_var (1 − Var(R − V)/Var(R) over the response tokens, of the old values).
    """
    old, ret = old_values.detach().float(), returns.detach().float()
    err = (values - ret) ** 2
    if value_clip is None:
        per_tok, clipped_frac = 0.5 * err, 0.0
    else:
        v_clip = old + (values - old).clamp(-value_clip, value_clip)
        err_clip = (v_clip - ret) ** 2
        per_tok = 0.5 * torch.maximum(err, err_clip)
        clipped_frac = masked_mean((err_clip > err).float(), mask).item()
    loss = aggregate(per_tok, mask, agg)
    with torch.no_grad():
        on = mask > 0
        var_r = ret[on].var() if on.sum() > 1 else torch.tensor(0.0)
        explained = (1 - (ret - old)[on].var() / var_r).item() if var_r > 0 else 0.0
        stats = {"vf_loss": loss.item(), "vf_clip_frac": clipped_frac,
                 "value_mean": masked_mean(values.detach(), mask).item(),
                 "return_mean": masked_mean(ret, mask).item(), "explained_var": explained}
    return loss, stats


PPO = register_algorithm(
    "ppo",
    advantages=ppo_advantages,
    loss=ppo_loss,
    value_loss=value_loss,
    inputs="token",
    reference=("kl_coef", "kl_loss_coef"),
)
