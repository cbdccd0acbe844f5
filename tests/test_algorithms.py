"""Registry, shared loss pieces and GRPO, against hand numbers and a loop-based reference."""

import math
from types import SimpleNamespace

import pytest
import torch

import flux.algorithms as algorithms
from flux.algorithms import Algorithm, get_algorithm, list_algorithms, register_algorithm
from flux.algorithms.grpo import grpo_advantages, grpo_loss
from flux.algorithms.losses import aggregate, decoupled_policy_loss, k3_kl

torch.set_num_threads(1)


@pytest.fixture
def clean_registry():
    saved = dict(algorithms._REGISTRY)
    yield
    algorithms._REGISTRY.clear()
    algorithms._REGISTRY.update(saved)


# ---- GRPO advantages --------------------------------------------------------------------------------
def test_grpo_advantages_hand_numbers():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]])
    adv = grpo_advantages(rewards, eps=0.0)
    # group 0: mean 0.5, unbiased std sqrt(1/3) → ±0.5·sqrt(3)
    h = 0.5 * math.sqrt(3.0)
    torch.testing.assert_close(adv[0], torch.tensor([h, -h, -h, h]))
    # group 1: mean 2, unbiased std sqrt(2/3)
    s = math.sqrt(2.0 / 3.0)
    torch.testing.assert_close(adv[1], torch.tensor([1 / s, -1 / s, 0.0, 0.0]))


def test_grpo_advantages_zero_variance_and_single_sample():
    rewards = torch.tensor([[0.1, 0.1, 0.1], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    adv = grpo_advantages(rewards)
    assert torch.equal(adv, torch.zeros(3, 3))
    assert torch.equal(grpo_advantages(torch.tensor([[2.0], [5.0]])), torch.zeros(2, 1))
    assert torch.equal(grpo_advantages(torch.tensor([[0.1, 0.1, 0.1]]), scale_std=False), torch.zeros(1, 3))


def test_grpo_advantages_without_std_scaling():
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [3.0, 1.0, 2.0, 2.0]]), scale_std=False)
    torch.testing.assert_close(adv, torch.tensor([[0.5, -0.5, -0.5, 0.5], [1.0, -1.0, 0.0, 0.0]]))


def test_grpo_advantages_rejects_flat_rewards():
    with pytest.raises(ValueError):
        grpo_advantages(torch.tensor([1.0, 0.0]))


# ---- aggregation and k3 -----------------------------------------------------------------------------
LOSS = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 7.0, 7.0, 7.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 17 / 5),
    ("seq-mean-token-mean", (6 / 3 + 11 / 2) / 2),   # the empty third row is not a sequence
    ("seq-mean-token-sum", (6 + 11) / 2),
    ("token-sum-norm", 17 / (3 * 4)),
])
def test_aggregate_hand_numbers(mode, expected):
    assert aggregate(LOSS, MASK, mode).item() == pytest.approx(expected)


def test_aggregate_token_sum_norm_max_len_and_masked_nan():
    assert aggregate(LOSS, MASK, "token-sum-norm", max_len=10).item() == pytest.approx(17 / 30)
    poisoned = LOSS.clone()
    poisoned[2] = float("inf")
    poisoned[0, 3] = float("nan")
    assert aggregate(poisoned, MASK, "token-mean").item() == pytest.approx(17 / 5)
    with pytest.raises(ValueError, match="token-mean"):
        aggregate(LOSS, MASK, "mean")


def test_k3_kl_hand_numbers():
    logp = torch.log(torch.tensor([[0.5, 0.3]]))
    ref = torch.log(torch.tensor([[0.25, 0.3]]))
    # r = log(0.25/0.5) = −log 2: exp(r) − r − 1 = 0.5 + log 2 − 1
    torch.testing.assert_close(k3_kl(logp, ref), torch.tensor([[0.5 + math.log(2.0) - 1.0, 0.0]]))


# ---- decoupled policy loss --------------------------------------------------------------------------
def reference_loss(lp, prox, behav, adv, mask, clip_low, clip_high, tis_cap, correction):
    """Token-by-token loop, token-mean aggregation."""
    total, count = 0.0, 0
    for i in range(lp.shape[0]):
        for j in range(lp.shape[1]):
            if mask[i, j] == 0:
                continue
            a = adv[i, j] if adv.dim() == 2 else adv[i]
            ratio = torch.exp(lp[i, j] - prox[i, j])
            clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
            w = math.exp(prox[i, j] - behav[i, j]) if correction else 1.0
            if tis_cap is not None:
                w = min(w, tis_cap)
            total = total - w * torch.minimum(ratio * a, clipped * a)
            count += 1
    return total / count


def make_inputs(seed=0, b=3, t=6):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, t)
    mask[0, :2] = 0          # prompt
    mask[1, 4:] = 0          # right padding
    mask[2, :1] = 0
    lp = (-torch.rand(b, t, generator=g) * 2).requires_grad_(True)
    # ratios spread around 1 so both clip sides are hit; proximal-behaviour gaps up to e^1.5 > tis_cap
    prox = (lp.detach() + torch.randn(b, t, generator=g) * 0.4)
    behav = prox - torch.randn(b, t, generator=g) * 0.8
    behav = torch.where(mask > 0, behav, torch.full_like(behav, -1e4))  # garbage in padding
    adv = torch.randn(b, generator=g)
    return lp, prox, behav, adv, mask


@pytest.mark.parametrize("clip_low, clip_high, tis_cap, correction, per_token_adv", [
    (0.2, 0.2, 2.0, True, False),
    (0.1, 0.28, 1.5, True, True),
    (0.2, 0.2, None, True, False),
    (0.2, 0.2, 2.0, False, True),
])
def test_decoupled_loss_matches_loop_reference(clip_low, clip_high, tis_cap, correction, per_token_adv):
    lp, prox, behav, adv, mask = make_inputs()
    if per_token_adv:
        adv = adv[:, None] * torch.linspace(-1, 1, lp.shape[1])
    loss, stats = decoupled_policy_loss(lp, prox, behav, adv, mask, clip_low=clip_low, clip_high=clip_high,
                                        tis_cap=tis_cap, correction=correction)
    (grad,) = torch.autograd.grad(loss, lp)
    lp_ref = lp.detach().clone().requires_grad_(True)
    expected = reference_loss(lp_ref, prox, behav, adv, mask, clip_low, clip_high, tis_cap, correction)
    (grad_ref,) = torch.autograd.grad(expected, lp_ref)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, grad_ref)
    assert 0 < stats["clip_frac"] < 1
    if correction:
        assert stats["iw_max"] > 2.0
        assert (stats["iw_trunc_frac"] > 0) == (tis_cap is not None)
    else:
        assert stats["iw_mean"] == 1.0 and stats["iw_max"] == 1.0


def test_decoupled_loss_clip_both_sides_hand_numbers():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    lp = torch.log(ratio).requires_grad_(True)
    zeros = torch.zeros(1, 4)
    mask = torch.ones(1, 4)
    loss, stats = decoupled_policy_loss(lp, zeros, zeros, adv, mask)
    # per token: −min(1.5, 1.2) = −1.2; −min(−0.5, −0.8) = 0.8; −min(0.5, 0.8) = −0.5; −min(−1.5, −1.2) = 1.5
    assert loss.item() == pytest.approx((-1.2 + 0.8 - 0.5 + 1.5) / 4)
    assert stats["clip_frac"] == pytest.approx(0.5)
    assert stats["ratio_mean"] == pytest.approx(1.0)
    (grad,) = torch.autograd.grad(loss, lp)
    # clipped tokens get no gradient; unclipped get −A·ratio/4
    torch.testing.assert_close(grad, torch.tensor([[0.0, 0.0, -0.5 / 4, 1.5 / 4]]))
    loss_high, _ = decoupled_policy_loss(lp, zeros, zeros, adv, mask, clip_high=0.28)
    assert loss_high.item() == pytest.approx((-1.28 + 0.8 - 0.5 + 1.5) / 4)


def test_decoupled_loss_importance_weight_truncation_hand_numbers():
    lp = torch.zeros(1, 2, requires_grad=True)
    prox = torch.zeros(1, 2)
    behav = torch.log(torch.tensor([[0.25, 2.0]]))  # w = 4 (→ capped at 2) and 0.5
    adv = torch.tensor([1.0])
    loss, stats = decoupled_policy_loss(lp, prox, behav, adv, torch.ones(1, 2), tis_cap=2.0)
    assert loss.item() == pytest.approx(-(2.0 + 0.5) / 2)
    assert stats["iw_mean"] == pytest.approx(2.25)
    assert stats["iw_max"] == pytest.approx(4.0)
    assert stats["iw_trunc_frac"] == pytest.approx(0.5)
    loss_off, _ = decoupled_policy_loss(lp, prox, behav, adv, torch.ones(1, 2), correction=False)
    assert loss_off.item() == pytest.approx(-1.0)
    # proximal=None: plain PPO against the behaviour policy, ratio = π/μ and no weight
    loss_none, stats_none = decoupled_policy_loss(lp, None, behav, adv, torch.ones(1, 2))
    assert loss_none.item() == pytest.approx(-(min(4.0, 1.2) + 0.5) / 2)
    assert stats_none["iw_mean"] == 1.0


def test_decoupled_loss_approx_kl_is_k3_against_proximal():
    lp, prox, behav, adv, mask = make_inputs(seed=3)
    _, stats = decoupled_policy_loss(lp, prox, behav, adv, mask)
    r = (prox - lp.detach())[mask > 0]
    assert stats["approx_kl"] == pytest.approx((torch.exp(r) - r - 1).mean().item(), rel=1e-5)


# ---- GRPO loss --------------------------------------------------------------------------------------
def test_grpo_loss_adds_k3_kl_only_with_reference_and_coef():
    lp, prox, behav, adv, mask = make_inputs(seed=1)
    ref = lp.detach() - 0.3
    pg, _ = decoupled_policy_loss(lp, prox, behav, adv, mask)
    kl = aggregate(k3_kl(lp, ref), mask, "token-mean")
    loss0, stats0 = grpo_loss(lp, prox, behav, adv, mask)
    assert loss0.item() == pytest.approx(pg.item()) and "kl" not in stats0
    loss1, stats1 = grpo_loss(lp, prox, behav, adv, mask, ref, kl_coef=0.0)
    assert loss1.item() == pytest.approx(pg.item()) and stats1["kl"] == pytest.approx(kl.item())
    loss2, stats2 = grpo_loss(lp, prox, behav, adv, mask, ref, kl_coef=0.1)
    assert loss2.item() == pytest.approx(pg.item() + 0.1 * kl.item())
    assert stats2["loss"] == pytest.approx(loss2.item()) and stats2["pg_loss"] == pytest.approx(pg.item())


# ---- registry ---------------------------------------------------------------------------------------
def test_registry_grpo_defaults_and_param_split():
    algo = get_algorithm("grpo")
    assert "grpo" in list_algorithms()
    assert algo.advantages is grpo_advantages and algo.loss is grpo_loss
    assert algo.defaults["clip_low"] == 0.2 and algo.defaults["kl_coef"] == 0.0
    assert algo.defaults["agg"] == "token-mean" and algo.defaults["tis_cap"] == 2.0
    assert algo.advantage_kwargs({"scale_std": False}) == {"eps": 1e-6, "scale_std": False}
    assert "scale_std" not in algo.loss_kwargs()
    assert algo.loss_kwargs({"clip_high": 0.28})["clip_high"] == 0.28
    assert not algo.needs_reference and not algo.wants_reference()
    assert algo.wants_reference({"kl_coef": 0.01})
    with pytest.raises(ValueError, match="clip_hgih"):
        algo.params({"clip_hgih": 0.3})


def test_hyper_parameters_are_typed_by_their_defaults():
    algo = get_algorithm("grpo")
    assert algo.params({"clip_low": 1})["clip_low"] == 1.0 and isinstance(algo.params({"clip_low": 1})["clip_low"], float)
    assert algo.params({"tis_cap": None})["tis_cap"] is None           # a None-able one takes None
    for key, bad in [("clip_low", "0.3"), ("correction", 1), ("agg", 3), ("clip_high", True)]:
        with pytest.raises(ValueError, match=f"algo.{key}: grpo expects"):
            algo.params({key: bad})


def test_an_algorithm_declares_its_inputs_and_its_reference():
    def token_adv(rewards, mask, *, gamma: float = 1.0):
        return rewards[:, None] * mask

    def loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None, *,
             beta: float = 0.0):
        return (logprobs * mask).sum(), {}

    with pytest.raises(ValueError, match="declare inputs='token'"):          # never inferred from names
        register_algorithm("t_undeclared", advantages=token_adv, loss=loss)
    algo = register_algorithm("t_declared", advantages=token_adv, loss=loss, inputs="token", reference="beta")
    assert algo.token_level and algo.reference == ("beta",)
    assert not algo.wants_reference() and algo.wants_reference({"beta": 0.1})
    with pytest.raises(ValueError, match="names no hyper-parameter"):
        register_algorithm("t_badref", advantages=token_adv, loss=loss, inputs="token", reference="kl_coef")
    # a kl-like name alone loads no reference model: only a declaration does, and a KL coefficient that
    # would be ignored for want of one is an error, not a silent no-op
    plain = register_algorithm("t_plain", advantages=grpo_advantages, loss=grpo_loss)
    assert not plain.wants_reference()
    with pytest.raises(ValueError, match="algo.kl_coef > 0, but algorithm 't_plain' keeps no reference model"):
        plain.params({"kl_coef": 0.5})


def test_registry_unknown_name_lists_known():
    for bad in ("gpro", "flux.algorithms.grpo:nope", "no_such_module_xyz:algo"):
        with pytest.raises(KeyError) as err:
            get_algorithm(bad)
        assert isinstance(err.value, ValueError) and "grpo" in str(err.value)


def test_registry_dotted_paths():
    from flux.algorithms.grpo import GRPO
    assert get_algorithm("flux.algorithms.grpo:GRPO") is GRPO
    assert get_algorithm("flux.algorithms.grpo.GRPO") is GRPO
    assert get_algorithm("flux.algorithms.grpo:grpo") is GRPO  # name registered by importing the module
    assert get_algorithm(GRPO) is GRPO


def test_register_decorator_and_call_forms(clean_registry):
    @register_algorithm("toy", advantages=lambda rewards, *, scale=2.0: rewards * scale)
    def toy_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None, *,
                 beta=0.5):
        return -(beta * logprobs * advantages[:, None] * mask).sum(), {"beta": beta}

    algo = get_algorithm("toy")
    assert isinstance(algo, Algorithm) and algo.loss is toy_loss
    assert algo.defaults == {"scale": 2.0, "beta": 0.5}
    adv = algo.advantages(torch.ones(2), **algo.advantage_kwargs())
    torch.testing.assert_close(adv, torch.full((2,), 2.0))
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm("toy", advantages=None, loss=grpo_loss)
    register_algorithm("toy", loss=grpo_loss, replace=True)
    assert get_algorithm("toy").loss is grpo_loss
    with pytest.raises(ValueError):
        register_algorithm("typo", loss=grpo_loss, defaults={"kl_coeff": 0.1})


def test_bind_reads_the_batch():
    lp, prox, behav, adv, mask = make_inputs(seed=2)
    batch = SimpleNamespace(proximal_logprobs=prox, behaviour_logprobs=behav, advantages=adv,
                            ref_logprobs=None)
    loss_fn = get_algorithm("grpo").bind({"clip_high": 0.3, "tis_cap": 1.5})
    loss, _ = loss_fn(logprobs=lp, mask=mask, batch=batch)
    expected, _ = decoupled_policy_loss(lp, prox, behav, adv, mask, clip_high=0.3, tis_cap=1.5)
    assert loss.item() == pytest.approx(expected.item())
