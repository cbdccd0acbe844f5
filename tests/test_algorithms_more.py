"""RLOO, REINFORCE, REINFORCE++ and DAPO: advantages and losses against hand numbers, the overlong
penalty at its breakpoints, registry entries, padding safety, and a few SGD steps per algorithm."""

import math
from types import SimpleNamespace

import pytest
import torch

from flux.algorithms import get_algorithm, list_algorithms
from flux.algorithms.dapo import DAPO, dapo_advantages, overlong_penalty
from flux.algorithms.grpo import grpo_advantages, grpo_loss
from flux.algorithms.losses import decoupled_policy_loss
from flux.algorithms.reinforce import (
    REINFORCE_PP,
    kl_to_go,
    reinforce_advantages,
    reinforce_pp_advantages,
    reinforce_pp_loss,
)
from flux.algorithms.rloo import RLOO, rloo_advantages

torch.set_num_threads(1)

REWARDS = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])


# ---- advantages -------------------------------------------------------------------------------------
def test_rloo_advantages_hand_numbers():
    # r_i − mean of the other three: 1 − 1/3, 0 − 2/3; 3 − 5/3, 1 − 7/3, 2 − 6/3
    expected = torch.tensor([[2 / 3, -2 / 3, -2 / 3, 2 / 3], [4 / 3, -4 / 3, 0.0, 0.0]])
    torch.testing.assert_close(rloo_advantages(REWARDS), expected)
    torch.testing.assert_close(rloo_advantages(torch.tensor([[1.0, 0.0]])), torch.tensor([[1.0, -1.0]]))
    # = n/(n−1) · (r − group mean)
    torch.testing.assert_close(rloo_advantages(REWARDS), 4 / 3 * (REWARDS - REWARDS.mean(1, keepdim=True)))


def test_rloo_advantages_single_sample_and_zero_variance_are_exactly_zero():
    assert torch.equal(rloo_advantages(torch.tensor([[2.0], [5.0]])), torch.zeros(2, 1))
    flat = torch.tensor([[0.1, 0.1, 0.1], [0.7, 0.7, 0.7], [1.0, 0.0, 0.5]])
    adv = rloo_advantages(flat)
    assert torch.equal(adv[:2], torch.zeros(2, 3))
    torch.testing.assert_close(adv[2], torch.tensor([0.75, -0.75, 0.0]))
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor([1.0, 0.0]))


def test_reinforce_advantages_group_mean_baseline_no_std():
    expected = torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]])
    torch.testing.assert_close(reinforce_advantages(REWARDS), expected)
    assert torch.equal(reinforce_advantages(torch.tensor([[3.0], [4.0]])), torch.zeros(2, 1))
    assert torch.equal(reinforce_advantages(torch.tensor([[0.1, 0.1, 0.1]])), torch.zeros(1, 3))


def test_reinforce_pp_advantages_use_global_batch_statistics():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # all four: mean 0.25, unbiased var (0.75² + 3·0.25²)/3 = 0.25 → std 0.5
    adv = reinforce_pp_advantages(rewards, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1.5, -0.5], [-0.5, -0.5]]))
    # the zero-variance group still gets a (negative) advantage: the baseline is the batch, not the group
    assert (adv[1] < 0).all()
    # the grouping does not matter, only the batch
    torch.testing.assert_close(reinforce_pp_advantages(REWARDS),
                               reinforce_pp_advantages(REWARDS.view(1, 8)).view(2, 4))
    assert not torch.allclose(reinforce_pp_advantages(REWARDS), grpo_advantages(REWARDS))


def test_reinforce_pp_advantages_group_baseline_and_degenerate_batches():
    rewards = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    # centred per group: [0.5, −0.5, 0, 0]; mean 0, unbiased std sqrt(0.5/3)
    s = math.sqrt(0.5 / 3)
    adv = reinforce_pp_advantages(rewards, eps=0.0, group_baseline=True)
    torch.testing.assert_close(adv, torch.tensor([[0.5 / s, -0.5 / s], [0.0, 0.0]]))
    assert torch.equal(reinforce_pp_advantages(torch.tensor([[3.0]])), torch.zeros(1, 1))
    assert torch.equal(reinforce_pp_advantages(torch.full((3, 4), 0.3)), torch.zeros(3, 4))
    # every group flat but at different levels: the global baseline sees signal, the group baseline none
    levels = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    assert reinforce_pp_advantages(levels)[0, 0] > 0
    assert torch.equal(reinforce_pp_advantages(levels, group_baseline=True), torch.zeros(2, 2))


# ---- REINFORCE++ KL-in-reward -----------------------------------------------------------------------
PAD_MASK = torch.tensor([[0.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])


def test_kl_to_go_hand_numbers_and_padding():
    anchor = torch.zeros(2, 4)
    ref = -torch.tensor([[9.0, 0.1, 0.2, 0.3], [0.4, 0.5, 1e4, float("inf")]])  # garbage where masked
    torch.testing.assert_close(kl_to_go(anchor, ref, PAD_MASK),
                               torch.tensor([[0.6, 0.6, 0.5, 0.3], [0.9, 0.5, 0.0, 0.0]]))


def test_reinforce_pp_loss_hand_numbers_with_kl():
    lp = torch.zeros(2, 4, requires_grad=True)
    prox = torch.zeros(2, 4)
    ref = -torch.tensor([[9.0, 0.1, 0.2, 0.3], [0.4, 0.5, 1e4, 1e4]])
    adv = torch.ones(2)
    loss, stats = reinforce_pp_loss(lp, prox, prox, adv, PAD_MASK, ref, kl_coef=0.1)
    # ratio 1 everywhere: loss = −mean over the 5 response tokens of (1 − 0.1 · KL-to-go)
    togo = 0.6 + 0.5 + 0.3 + 0.9 + 0.5
    assert loss.item() == pytest.approx(-(5 - 0.1 * togo) / 5)
    assert stats["kl_penalty"] == pytest.approx(0.1 * togo / 5)
    assert stats["kl"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.4 + 0.5) / 5)
    # the first response token carries the KL of the whole rest: its gradient is the smallest push up
    (grad,) = torch.autograd.grad(loss, lp)
    torch.testing.assert_close(grad[0, 1:], -(1 - 0.1 * torch.tensor([0.6, 0.5, 0.3])) / 5)
    assert grad[0, 0] == 0 and grad[1, 2:].eq(0).all()


def test_reinforce_pp_loss_without_kl_is_the_decoupled_loss():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(2, 4, generator=g) * 2
    prox = lp + torch.randn(2, 4, generator=g) * 0.3
    behav = prox - torch.randn(2, 4, generator=g) * 0.5
    ref = lp - 0.2
    adv = torch.tensor([0.7, -1.1])
    base, _ = decoupled_policy_loss(lp, prox, behav, adv, PAD_MASK)
    for kwargs in ({}, {"ref_logprobs": ref}, {"ref_logprobs": ref, "kl_coef": 0.0}):
        loss, stats = reinforce_pp_loss(lp, prox, behav, adv, PAD_MASK, **kwargs)
        assert loss.item() == pytest.approx(base.item())
        assert ("kl" in stats) == ("ref_logprobs" in kwargs) and "kl_penalty" not in stats
    # with the KL: equals the decoupled loss on per-token advantages A − coef·KL-to-go(π_prox, π_ref)
    loss, _ = reinforce_pp_loss(lp, prox, behav, adv, PAD_MASK, ref, kl_coef=0.05)
    expected, _ = decoupled_policy_loss(lp, prox, behav, adv[:, None] - 0.05 * kl_to_go(prox, ref, PAD_MASK),
                                        PAD_MASK)
    assert loss.item() == pytest.approx(expected.item())
    # no proximal: the KL is measured against the behaviour log-probs
    loss, _ = reinforce_pp_loss(lp, None, behav, adv, PAD_MASK, ref, kl_coef=0.05)
    expected, _ = decoupled_policy_loss(lp, None, behav, adv[:, None] - 0.05 * kl_to_go(behav, ref, PAD_MASK),
                                        PAD_MASK)
    assert loss.item() == pytest.approx(expected.item())


# ---- DAPO -------------------------------------------------------------------------------------------
def test_overlong_penalty_breakpoints():
    lengths = torch.tensor([0, 16, 17, 18, 19, 20, 21, 100])
    expected = torch.tensor([0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0, -1.0])
    torch.testing.assert_close(overlong_penalty(lengths, max_len=20, cache_len=4), expected)
    # no cache: a hard step at max_len
    torch.testing.assert_close(overlong_penalty(torch.tensor([20, 21]), 20, 0), torch.tensor([0.0, -1.0]))
    # the whole budget as cache: linear from 0 at length 0
    torch.testing.assert_close(overlong_penalty(torch.tensor([5]), 10, 10), torch.tensor([-0.5]))
    for bad in (-1, 21):
        with pytest.raises(ValueError):
            overlong_penalty(lengths, 20, bad)


def test_dapo_overlong_shaping_enters_the_rewards_before_group_normalisation():
    rewards = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    lengths = torch.tensor([[4, 8, 4, 8]])
    # cap 8, cache 4: length 4 → 0, length 8 → (4 − 8)/4 = −1 (the ramp's end)
    shaped = torch.tensor([[1.0, 0.0, 0.0, -1.0]])
    adv = dapo_advantages(rewards, lengths, 8, overlong_cache=4)
    torch.testing.assert_close(adv, grpo_advantages(shaped))
    half = dapo_advantages(rewards, lengths, 8, overlong_cache=4, overlong_coef=0.5)
    torch.testing.assert_close(half, grpo_advantages(torch.tensor([[1.0, 0.5, 0.0, -0.5]])))
    with pytest.raises(ValueError, match="lengths"):
        dapo_advantages(rewards, overlong_cache=4)
    # through the registry: the learner hands lengths and the cap to the advantage function
    adv2, returns = DAPO.compute_advantages([rewards[0]], None, {"overlong_cache": 4},
                                            group_lengths=[lengths[0]], max_new_tokens=8)
    torch.testing.assert_close(adv2, adv.reshape(-1))
    assert returns is None


def test_dapo_is_grpo_with_clip_higher_token_mean_and_no_kl():
    assert DAPO.loss is grpo_loss
    # without overlong shaping the advantages are GRPO's
    torch.testing.assert_close(DAPO.advantages(REWARDS), grpo_advantages(REWARDS))
    d = DAPO.defaults
    assert (d["clip_low"], d["clip_high"], d["agg"], d["kl_coef"]) == (0.2, 0.28, "token-mean", 0.0)
    assert not DAPO.wants_reference()
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    zeros = torch.zeros(1, 4)
    batch = SimpleNamespace(proximal_logprobs=zeros, behaviour_logprobs=zeros,
                            advantages=torch.tensor([[1.0, -1.0, 1.0, -1.0]]), ref_logprobs=None)
    loss, _ = DAPO.bind()(logprobs=torch.log(ratio), mask=torch.ones(1, 4), batch=batch)
    assert loss.item() == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5) / 4)   # upper clip at 1.28, lower at 0.8


# ---- registry, padding, learning --------------------------------------------------------------------
NEW = ("rloo", "reinforce", "reinforce_pp", "dapo")


def test_registry_lookup():
    assert set(NEW) <= set(list_algorithms())
    assert get_algorithm("rloo") is RLOO and RLOO.advantages is rloo_advantages and RLOO.loss is grpo_loss
    assert get_algorithm("reinforce").advantages is reinforce_advantages
    assert get_algorithm("reinforce_pp") is REINFORCE_PP and REINFORCE_PP.loss is reinforce_pp_loss
    assert get_algorithm("flux.algorithms.dapo:DAPO") is DAPO
    assert get_algorithm("flux.algorithms.reinforce:reinforce_pp") is REINFORCE_PP
    assert REINFORCE_PP.advantage_kwargs({"group_baseline": True}) == {"eps": 1e-6, "group_baseline": True}
    for name in NEW:
        algo = get_algorithm(name)
        assert algo.defaults["clip_low"] == 0.2 and algo.defaults["tis_cap"] == 2.0
        assert not algo.wants_reference() and algo.wants_reference({"kl_coef": 0.01})
        with pytest.raises(ValueError):
            algo.params({"kl_coeff": 0.1})


@pytest.mark.parametrize("name", NEW)
def test_padding_garbage_does_not_leak_into_the_loss(name):
    g = torch.Generator().manual_seed(1)
    lp = -torch.rand(2, 4, generator=g) * 2
    prox = lp + torch.randn(2, 4, generator=g) * 0.3
    clean = dict(behav=prox - 0.1, ref=lp - 0.2)
    dirty = {k: torch.where(PAD_MASK > 0, v, torch.full_like(v, -1e4)) for k, v in clean.items()}
    loss_fn = get_algorithm(name).bind({"kl_coef": 0.1})
    out = []
    for t in (clean, dirty):
        batch = SimpleNamespace(proximal_logprobs=prox, behaviour_logprobs=t["behav"],
                                advantages=torch.tensor([0.5, -1.0]), ref_logprobs=t["ref"])
        out.append(loss_fn(logprobs=lp, mask=PAD_MASK, batch=batch)[0])
    assert torch.isfinite(out[1]) and out[1].item() == pytest.approx(out[0].item())


@pytest.mark.parametrize("name", NEW)
def test_loss_decreases_under_sgd(name):
    """Two groups of 4 sampled sequences over a 5-token vocabulary; logits are the only parameters."""
    g = torch.Generator().manual_seed(0)
    G, n, t, V = 2, 4, 3, 5
    logits = torch.zeros(G * n, t, V, requires_grad=True)
    tokens = torch.randint(0, V, (G * n, t), generator=g)
    mask = torch.ones(G * n, t)
    mask[::3, -1] = 0
    rewards = torch.tensor([[1.0, 0.0, 0.5, 0.0], [0.2, 0.9, 0.9, 0.1]])
    algo = get_algorithm(name)
    params = {"kl_coef": 0.05}
    adv = algo.advantages(rewards, **algo.advantage_kwargs(params)).reshape(-1)

    def logprobs():
        return torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]

    start = logprobs().detach()
    batch = SimpleNamespace(proximal_logprobs=start, behaviour_logprobs=start, advantages=adv,
                            ref_logprobs=start - 0.05)
    loss_fn = algo.bind(params)
    opt = torch.optim.SGD([logits], lr=0.5)
    losses = []
    for _ in range(5):
        loss, _ = loss_fn(logprobs=logprobs(), mask=mask, batch=batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 1e-3
    moved = ((logprobs().detach() - start) * mask).sum(-1)
    # the best sample of each group became more likely, the worst less
    for grp in range(G):
        row = rewards[grp]
        assert moved[grp * n + int(row.argmax())] > 0 > moved[grp * n + int(row.argmin())]
