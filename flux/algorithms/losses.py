"""Loss pieces shared by the policy-gradient algorithms: aggregation, the decoupled clipped loss, k3 KL.

Every function is a pure function of tensors. Shapes use b = sequences in the (micro-)batch and
t = token positions; `mask` is 1.0 on the tokens that count (the generated response) and 0.0 elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum-norm")


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of `x` over the positions where `mask` is non-zero; 0 when the mask is empty.

    Shape: x, mask (b, t) → scalar.
    """
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(loss_tok: Tensor, mask: Tensor, mode: str = "token-mean", max_len: int | None = None) -> Tensor:
    """Reduce a per-token loss to a scalar.

    Shape: loss_tok, mask (b, t) → scalar.

    Modes:
      - "token-mean": sum over all response tokens / number of response tokens. Every token weighs the
        same, so long answers are not down-weighted (DAPO, Yu et al. 2025, "token-level policy loss").
      - "seq-mean-token-mean": mean over sequences of each sequence's token mean (the original GRPO,
        Shao et al. 2024). Sequences with no response token (padding rows) are left out of the mean.
      - "seq-mean-token-sum": mean over sequences of each sequence's token sum.
      - "token-sum-norm": sum / (b · max_len) with a constant max_len (Dr. GRPO, Liu et al. 2025,
        "Understanding R1-Zero-Like Training"): removes the length bias of per-sequence normalisation.
        `max_len` defaults to t, the padded width of the batch; pass the generation budget to match the paper.
    """
    mask = mask.to(loss_tok.dtype)
    # torch.where, not a product: a masked-out inf/NaN must not leak into the sum as inf·0.
    masked = torch.where(mask > 0, loss_tok, torch.zeros_like(loss_tok))
    if mode == "token-mean":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if mode in ("seq-mean-token-mean", "seq-mean-token-sum"):
        tok_per_seq = mask.sum(-1)
        seq = masked.sum(-1)
        if mode == "seq-mean-token-mean":
            seq = seq / tok_per_seq.clamp(min=1.0)
        has_tokens = (tok_per_seq > 0).to(seq.dtype)
        return (seq * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    if mode == "token-sum-norm":
        width = loss_tok.shape[-1] if max_len is None else max_len
        return masked.sum() / float(loss_tok.shape[0] * width)
    raise ValueError(f"unknown aggregation mode {mode!r}; known: {', '.join(AGG_MODES)}")


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(π ‖ π_ref) from samples of π: exp(r) − r − 1 with r = ref − logp.

    Schulman 2020, "Approximating KL Divergence": unbiased, always ≥ 0 and low-variance. Not masked:
    aggregate it with the response mask. Gradients flow through `logprobs`.

    Shape: logprobs, ref_logprobs (b, t) → (b, t).
    """
    r = ref_logprobs - logprobs
    return torch.exp(r) - r - 1.0


def decoupled_policy_loss(
    logprobs: Tensor,
    proximal_logprobs: Tensor | None,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    tis_cap: float | None = 2.0,
    correction: bool = True,
    agg: str = "token-mean",
    max_len: int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Decoupled clipped policy loss with truncated importance weights for stale (off-policy) samples.

    Decoupled PPO (Hilton et al. 2022, "Batch size-invariance for policy optimization"; used by AReaL,
    Fu et al. 2025) separates the two jobs of PPO's "old" policy:
      - the *proximal* policy π_prox anchors the trust region: ratio = π/π_prox is clipped to
        [1 − clip_low, 1 + clip_high] (asymmetric clip-higher as in DAPO, Yu et al. 2025);
      - the *behaviour* policy μ that sampled the tokens (possibly several versions old) is corrected by
        the importance weight w = π_prox/μ, detached and truncated at `tis_cap` (truncated IS:
        Espeholt et al. 2018, IMPALA; Yao et al. 2025, "Your efficient RL framework secretly brings you
        off-policy RL training").
    Per-token loss = −w · min(ratio·A, clip(ratio)·A), then `aggregate(…, agg)`.

    With `correction=False` the behaviour log-probs are ignored and w = 1: the standard PPO loss against
    `proximal_logprobs` (an ablation). `proximal_logprobs=None` means π_prox := μ, i.e. plain PPO against
    the behaviour policy (then w = 1 too).

    Shape: logprobs, proximal_logprobs, behaviour_logprobs, mask (b, t); advantages (b,) or (b, t)
    → (scalar loss, stats). Gradients flow only through `logprobs`.

    Stats (means over masked tokens): clip_frac (tokens where the clipped branch is the active one),
    iw_mean / iw_max (untruncated behaviour weight w), iw_trunc_frac (tokens with w > tis_cap),
    approx_kl (k3 of π against π_prox), ratio_mean.
    """
    on = mask > 0
    zeros = torch.zeros_like(logprobs)
    adv = advantages.to(logprobs.dtype)
    if adv.dim() == 1:
        adv = adv[:, None]
    prox = behaviour_logprobs if proximal_logprobs is None else proximal_logprobs
    prox = prox.detach().to(logprobs.dtype)

    # Masked positions get log-ratio 0 (ratio 1, w 1): padding must not produce exp overflow → NaN.
    log_ratio = torch.where(on, logprobs - prox, zeros)
    ratio = torch.exp(log_ratio)
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    surr = ratio * adv
    surr_clipped = clipped * adv
    pg_tok = -torch.minimum(surr, surr_clipped)

    if correction and proximal_logprobs is not None:
        log_w = torch.where(on, prox - behaviour_logprobs.detach().to(logprobs.dtype), zeros)
        w_raw = torch.exp(log_w)
    else:
        w_raw = torch.ones_like(logprobs)
    w = w_raw if tis_cap is None else w_raw.clamp(max=tis_cap)
    loss = aggregate(w * pg_tok, mask, agg, max_len=max_len)

    with torch.no_grad():
        n_on = on.sum()
        stats = {
            # The clipped branch is active when it gives the smaller objective: zero gradient there.
            "clip_frac": masked_mean((surr_clipped < surr).to(logprobs.dtype), mask).item(),
            "iw_mean": masked_mean(w_raw, mask).item(),
            "iw_max": (w_raw[on].max().item() if n_on > 0 else 1.0),
            "iw_trunc_frac": (masked_mean((w_raw > tis_cap).to(logprobs.dtype), mask).item()
                              if tis_cap is not None else 0.0),
            "approx_kl": masked_mean(k3_kl(logprobs.detach(), prox), mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
        }
    return loss, stats
