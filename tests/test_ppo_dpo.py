"""PPO (GAE, whitening, clipped value loss, the critic) and DPO (pairs, sigmoid/IPO/smoothing/RPO losses,
pair-preserving micro-batches, offline preference data) against hand numbers and direct references."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from actors.learner import micro_batches, preference_rows
from flux.algorithms import get_algorithm
from flux.algorithms.dpo import DPO, dpo_loss, dpo_pairs, sequence_logprob
from flux.algorithms.ppo import PPO, gae, ppo_advantages, value_loss, whiten
from flux.data import DataError, load_prompts
from flux.learner.torch_learner import TrainBatch
from flux.integrations.builtin.tasks import sort_pairs

torch.set_num_threads(1)


# ---- PPO ---------------------------------------------------------------------------------------------
def test_gae_matches_hand_recursion_with_prompt_and_padding_masked():
    # row 0: prompt at 0, response at 1..3, padding at 4; row 1: response at 2..4
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    r = torch.tensor([[9.0, 0.0, 0.5, 1.0, 9.0], [9.0, 9.0, 0.0, 0.0, 2.0]])
    v = torch.tensor([[7.0, 0.2, 0.4, 0.6, 7.0], [7.0, 7.0, 1.0, 1.0, 1.0]])
    g, lam = 0.9, 0.8
    adv, ret = gae(r, v, mask, gamma=g, lam=lam)
    # row 0 by hand: δ3 = 1 − 0.6; δ2 = 0.5 + g·0.6 − 0.4; δ1 = 0 + g·0.4 − 0.2
    d3, d2, d1 = 1 - 0.6, 0.5 + g * 0.6 - 0.4, g * 0.4 - 0.2
    a3 = d3
    a2 = d2 + g * lam * a3
    a1 = d1 + g * lam * a2
    torch.testing.assert_close(adv[0], torch.tensor([0.0, a1, a2, a3, 0.0]))
    torch.testing.assert_close(ret[0], torch.tensor([0.0, a1 + 0.2, a2 + 0.4, a3 + 0.6, 0.0]))
    e4, e3, e2 = 2 - 1.0, g * 1.0 - 1.0, g * 1.0 - 1.0
    b4 = e4
    b3 = e3 + g * lam * b4
    b2 = e2 + g * lam * b3
    torch.testing.assert_close(adv[1], torch.tensor([0.0, 0.0, b2, b3, b4]))


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    mask = torch.tensor([[1.0, 1.0, 1.0]])
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.3, 0.5, 0.9]])
    adv, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, 1.0 - v)
    torch.testing.assert_close(ret, torch.ones(1, 3))


def test_ppo_advantages_put_reward_on_last_token_and_kl_on_every_token():
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.float32)
    values = torch.zeros(2, 4)
    blp = torch.tensor([[0.0, -1.0, -1.0, 0.0], [0.0, -0.5, -0.5, -0.5]])
    ref = torch.tensor([[0.0, -1.5, -1.0, 0.0], [0.0, -0.5, -1.0, -0.5]])
    adv, ret = ppo_advantages(torch.tensor([1.0, 0.0]), values, mask, blp, ref, gamma=1.0, lam=1.0,
                              kl_coef=0.1, whiten_advantages=False)
    # token rewards: row 0 = [−0.1·0.5, 1 − 0], row 1 = [0, −0.1·0.5, 0]; λ = γ = 1 → returns-to-go
    torch.testing.assert_close(adv[0], torch.tensor([0.0, 0.95, 1.0, 0.0]))
    torch.testing.assert_close(adv[1], torch.tensor([0.0, -0.05, -0.05, 0.0]))
    torch.testing.assert_close(ret, adv)  # zero values
    white, _ = ppo_advantages(torch.tensor([1.0, 0.0]), values, mask, blp, ref, gamma=1.0, lam=1.0, kl_coef=0.1)
    on = mask > 0
    assert abs(float(white[on].mean())) < 1e-6 and float(white[on].std()) == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(white[~on], torch.zeros(int((~on).sum())))
    with pytest.raises(ValueError, match="response token"):
        ppo_advantages(torch.tensor([1.0]), torch.zeros(1, 2), torch.zeros(1, 2), torch.zeros(1, 2))


def test_whiten_masked_positions_do_not_count():
    x = torch.tensor([[1.0, 100.0, 3.0]])
    m = torch.tensor([[1.0, 0.0, 1.0]])
    torch.testing.assert_close(whiten(x, m), torch.tensor([[-1 / math.sqrt(2), 0.0, 1 / math.sqrt(2)]]),
                               atol=1e-6, rtol=0)


def test_value_loss_clipped_by_hand():
    values = torch.tensor([[0.0, 1.0, 0.5]], requires_grad=True)
    old = torch.tensor([[0.0, 0.5, 0.5]])
    ret = torch.tensor([[0.0, 0.0, 1.0]])
    mask = torch.tensor([[0.0, 1.0, 1.0]])
    loss, stats = value_loss(values, old, ret, mask, value_clip=0.2)
    # token 1: unclipped (1 − 0)² = 1, clipped V = 0.7 → 0.49; max = 1. token 2: 0.25 both. ½·mean
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25) / 2)
    assert stats["vf_clip_frac"] == 0.0
    loss.backward()
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.5, -0.25]]))
    # the clipped branch wins when the update overshoots past the target
    v2 = torch.tensor([[0.0, -1.0, 0.5]])
    loss2, stats2 = value_loss(v2, old, torch.tensor([[0.0, -0.6, 1.0]]), mask, value_clip=0.2)
    # token 1: (−1 + 0.6)² = 0.16 unclipped; clipped V = 0.3 → 0.81 → max 0.81
    assert loss2.item() == pytest.approx(0.5 * (0.81 + 0.25) / 2)
    assert stats2["vf_clip_frac"] == 0.5
    plain, _ = value_loss(v2, old, torch.tensor([[0.0, -0.6, 1.0]]), mask, value_clip=None)
    assert plain.item() == pytest.approx(0.5 * (0.16 + 0.25) / 2)


def test_ppo_registration_has_a_critic_and_kl_switches_reference():
    assert get_algorithm("ppo") is PPO and PPO.value_loss is value_loss and PPO.token_level
    assert not PPO.wants_reference()
    assert PPO.wants_reference({"kl_coef": 0.05}) and PPO.wants_reference({"kl_loss_coef": 0.05})
    assert PPO.params()["lam"] == 0.95 and PPO.params()["value_clip"] == 0.2


def test_ppo_compute_advantages_through_the_registry_uses_batch_tensors():
    tb = TrainBatch.from_samples([([1, 2], [3, 4], [-1.0, -1.0], [0, 0], 0.0),
                                  ([1], [3, 4, 5], [-1.0, -1.0, -1.0], [0, 0, 0], 0.0)], pad_id=0)
    tb.values = torch.zeros(tb.input_ids.shape)
    adv, ret = PPO.compute_advantages([torch.tensor([1.0, 0.0])], tb, {"whiten_advantages": False, "lam": 1.0})
    torch.testing.assert_close(adv, tb.response_mask * torch.tensor([[1.0], [0.0]]))
    torch.testing.assert_close(ret, adv)
    tb.values = None
    with pytest.raises(ValueError, match="values"):
        PPO.compute_advantages([torch.tensor([1.0, 0.0])], tb)


def test_critic_values_train_save_and_load(default_model, tmp_path):
    from flux.learner.torch_learner import TorchCritic

    critic = TorchCritic(str(default_model), lr=3e-3, seed=0)
    tb = TrainBatch.from_samples([([5, 6, 7], [8, 9], [-1.0, -1.0], [0, 0], 0.0),
                                  ([5, 6], [8, 9, 10], [-1.0] * 3, [0] * 3, 0.0)], pad_id=0)
    v0 = critic.values(tb)
    assert torch.equal(v0, torch.zeros_like(v0))  # zero-initialised head
    tb.values = v0
    tb.returns = tb.response_mask * torch.tensor([[1.0], [-1.0]])
    loss_fn = PPO.bind_value({"value_clip": None})
    losses = [critic.step(loss_fn, tb)["vf_loss"] for _ in range(15)]
    assert losses[-1] < 0.5 * losses[0]
    v1 = critic.values(tb)
    assert float(v1[0][tb.response_mask[0] > 0].mean()) > float(v1[1][tb.response_mask[1] > 0].mean())
    assert torch.equal(v1[tb.response_mask == 0], torch.zeros(int((tb.response_mask == 0).sum())))
    critic.save(tmp_path / "critic")
    again = TorchCritic(str(tmp_path / "critic"))
    torch.testing.assert_close(again.logprobs(tb), v1)


# ---- DPO ---------------------------------------------------------------------------------------------
def test_dpo_pairs_marks_best_and_worst_and_skips_flat_groups():
    r = torch.tensor([[0.2, 0.9, 0.1, 0.9], [0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.5, 0.0]])
    expected = torch.tensor([[0.0, 1.0, -1.0, 0.0], [0.0, 0.0, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]])
    assert torch.equal(dpo_pairs(r), expected)
    order = preference_rows(dpo_pairs(r).reshape(-1))
    assert order.tolist() == [1, 2, 8, 9]  # chosen, rejected of group 0, then of group 2


def _dpo_reference(pol_c, pol_r, ref_c, ref_r, beta, eps):
    logits = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    return (-(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)).mean()


def test_dpo_sigmoid_loss_matches_the_formula_on_padded_rows():
    torch.manual_seed(0)
    lp = -torch.rand(4, 5)
    ref = -torch.rand(4, 5)
    mask = torch.tensor([[0, 1, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 1]], dtype=torch.float32)
    lp_padded = torch.where(mask > 0, lp, torch.full_like(lp, float("nan")))  # padding must not leak
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    seq = (lp * mask).sum(-1)
    seq_ref = (ref * mask).sum(-1)
    for eps in (0.0, 0.1):
        loss, stats = dpo_loss(lp_padded, None, lp, adv, mask, ref, beta=0.5, label_smoothing=eps)
        expected = _dpo_reference(seq[[0, 2]], seq[[1, 3]], seq_ref[[0, 2]], seq_ref[[1, 3]], 0.5, eps)
        assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["pairs"] == 2.0
    h = (seq[[0, 2]] - seq_ref[[0, 2]]) - (seq[[1, 3]] - seq_ref[[1, 3]])
    assert stats["pref_acc"] == pytest.approx(float((h > 0).float().mean()))
    assert stats["margin"] == pytest.approx(float(0.5 * h.mean()), rel=1e-5)


def test_dpo_at_the_reference_is_log2_with_ties_counted_half():
    lp = -torch.rand(2, 3)
    loss, stats = dpo_loss(lp, None, lp, torch.tensor([1.0, -1.0]), torch.ones(2, 3), lp.clone())
    assert loss.item() == pytest.approx(math.log(2))
    assert stats["pref_acc"] == 0.5 and stats["margin"] == 0.0


def test_ipo_uses_length_averaged_logprobs_and_a_fixed_margin_target():
    lp = torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]])
    ref = torch.tensor([[-2.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    loss, _ = dpo_loss(lp, None, lp, torch.tensor([1.0, -1.0]), mask, ref, beta=0.25, loss_type="ipo")
    h = (-1.0 - -2.0) - (-2.0 - -1.0)  # averaged: chosen +1, rejected −1
    assert loss.item() == pytest.approx((h - 1 / (2 * 0.25)) ** 2)
    torch.testing.assert_close(sequence_logprob(lp, mask, average=True), torch.tensor([-1.0, -2.0]))
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(lp, None, lp, torch.tensor([1.0, -1.0]), mask, ref, loss_type="hinge2")


def test_dpo_sft_term_is_the_chosen_token_nll():
    lp = torch.tensor([[-1.0, -3.0], [-2.0, -2.0]])
    mask = torch.ones(2, 2)
    base, _ = dpo_loss(lp, None, lp, torch.tensor([1.0, -1.0]), mask, lp.clone())
    with_sft, stats = dpo_loss(lp, None, lp, torch.tensor([1.0, -1.0]), mask, lp.clone(), sft_coef=0.5)
    assert stats["sft_nll"] == pytest.approx(2.0)
    assert with_sft.item() == pytest.approx(base.item() + 0.5 * 2.0)


def test_dpo_rejects_unpaired_rows_and_needs_a_reference():
    lp = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="as many chosen"):
        dpo_loss(lp, None, lp, torch.tensor([1.0, 1.0, -1.0]), torch.ones(3, 2), lp)
    with pytest.raises(ValueError, match="reference"):
        dpo_loss(lp, None, lp, torch.tensor([1.0, -1.0, 0.0]), torch.ones(3, 2), None)
    assert DPO.needs_reference and DPO.preference and DPO.wants_reference()


def test_dpo_loss_gradient_raises_chosen_and_lowers_rejected():
    logits = torch.zeros(2, 3, 4, requires_grad=True)
    tokens = torch.tensor([[1, 2, 3], [3, 2, 1]])
    lp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss, _ = DPO.bind({"beta": 1.0})(logprobs=lp, mask=torch.ones(2, 3), batch=SimpleNamespace(
        proximal_logprobs=None, behaviour_logprobs=lp.detach(), advantages=torch.tensor([1.0, -1.0]),
        ref_logprobs=lp.detach()))
    loss.backward()
    with torch.no_grad():
        stepped = torch.log_softmax(logits - logits.grad, -1).gather(-1, tokens[..., None])[..., 0]
    assert stepped[0].sum() > lp[0].sum() and stepped[1].sum() < lp[1].sum()


def test_pair_micro_batches_never_split_a_pair():
    rows = [([1] * (2 + i % 3), [2] * (1 + i % 4), [0.0] * (1 + i % 4), [0] * (1 + i % 4), 1.0 - 2 * (i % 2))
            for i in range(12)]
    tb = TrainBatch.from_samples(rows, pad_id=0)
    parts = micro_batches(tb, 4, pairs=True)
    assert sorted(int(r) for p in parts for r in p) == list(range(12))
    for p in parts:
        rows_ = sorted(int(r) for r in p)
        assert all(r % 2 == 0 and r + 1 in rows_ for r in rows_[::2])


# ---- preference data -----------------------------------------------------------------------------------
def test_builtin_sort_pairs_are_right_vs_wrong_answers():
    pairs = sort_pairs()
    assert len(pairs) == 558
    for rec in pairs:
        assert rec["chosen"] == rec["answer"] and rec["rejected"] != rec["answer"]
        assert len(rec["rejected"]) == 3 and rec["rejected"].isdigit()
    assert load_prompts("builtin:sort_pairs") == pairs


def test_preference_file_validation(tmp_path):
    good = tmp_path / "p.jsonl"
    good.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n')
    assert load_prompts(str(good))[0]["chosen"] == "x"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "chosen": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: .*`rejected`"):
        load_prompts(str(bad))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text('{"prompt": "a", "chosen": "x", "rejected": "y"}\n{"prompt": "b"}\n')
    with pytest.raises(DataError, match="record 2"):
        load_prompts(str(mixed))


def test_engine_scores_given_responses_like_sampling(default_model):
    from flux.engine.base import SamplingParams
    from flux.engine.torch_engine import TorchEngine

    engine = TorchEngine.from_pretrained(str(default_model), seed=0, version=3)
    prompts = [[5, 6, 7], [8, 9]]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.7))
    scored = engine.score(prompts, [list(c.token_ids) for c in outs], temperature=0.7)
    for c, s in zip(outs, scored):
        assert list(s.token_ids) == list(c.token_ids) and (s.versions == 3).all()
        assert abs(s.logprobs - c.logprobs).max() < 1e-4
    with pytest.raises(ValueError):
        engine.score(prompts, [[1]])
