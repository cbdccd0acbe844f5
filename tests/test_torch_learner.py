"""The plain-PyTorch learner on a tiny random Qwen2 saved to a temporary directory."""

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

transformers = pytest.importorskip("transformers")

from flux.algorithms import get_algorithm  # noqa: E402
from flux.learner.torch_learner import TorchLearner, TrainBatch, token_logprobs  # noqa: E402

PAD = 0


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    (path / "tokenizer_config.json").write_text(json.dumps({"marker": "copied"}))
    return str(path)


def samples(advantages=(1.0, -1.0, 0.5, -0.5)):
    g = torch.Generator().manual_seed(1)
    shapes = [(3, 5), (2, 2), (4, 6), (1, 3)]   # (prompt, response) lengths: padding everywhere
    out = []
    for (n_p, n_r), a in zip(shapes, advantages):
        ids = torch.randint(1, 48, (n_p + n_r,), generator=g)
        out.append((ids[:n_p], ids[n_p:], -torch.rand(n_r, generator=g), torch.full((n_r,), 3), a))
    return out


def test_from_samples_layout():
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    assert batch.input_ids.shape == (4, 10) and batch.advantages.shape == (4,)
    assert batch.attention_mask[1].tolist() == [1] * 4 + [0] * 6
    assert batch.response_mask[1].tolist() == [0, 0, 1, 1] + [0] * 6
    assert batch.input_ids[1, 4:].eq(PAD).all() and batch.num_tokens == 16
    assert batch.versions[1].tolist() == [-1, -1, 3, 3] + [-1] * 6
    assert batch.behaviour_logprobs[1, :2].eq(0).all() and batch.behaviour_logprobs[1, 2:4].lt(0).all()
    per_tok = TrainBatch.from_samples([(*s[:4], torch.ones(len(s[1]))) for s in samples()], PAD)
    assert per_tok.advantages.shape == (4, 10) and per_tok.advantages.sum() == 16
    with pytest.raises(ValueError):
        TrainBatch.from_samples([([1, 2], [3, 4], [-0.1], [0, 0], 1.0)], PAD)


@pytest.mark.parametrize("kwargs", [{}, {"micro_batch_size": 3},
                                    {"micro_batch_tokens": 20, "temperature": 0.7}])
def test_logprobs_equal_manual_forward(model_dir, kwargs):
    learner = TorchLearner(model_dir, **kwargs)
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    got = learner.logprobs(batch)
    temp = kwargs.get("temperature", 1.0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    for i, (p, r, *_) in enumerate(samples()):
        ids = torch.cat([p, r])[None]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1] / temp, -1)
        expected = logp.gather(-1, ids[0, 1:, None]).squeeze(-1)[len(p) - 1:]
        torch.testing.assert_close(got[i, len(p):len(p) + len(r)], expected, atol=1e-5, rtol=1e-5)
    assert got[batch.response_mask == 0].eq(0).all()


def test_token_logprobs_left_padding_matches_right_padding(model_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    right = token_logprobs(model, batch.input_ids, batch.attention_mask, batch.response_mask)
    shift = batch.attention_mask.shape[1] - batch.attention_mask.sum(-1)
    idx = (torch.arange(batch.input_ids.shape[1])[None] - shift[:, None]) % batch.input_ids.shape[1]
    left = [torch.gather(x, 1, idx) for x in (batch.input_ids, batch.attention_mask, batch.response_mask)]
    lp_left = token_logprobs(model, *left)
    torch.testing.assert_close(torch.gather(lp_left, 1, (idx + 2 * shift[:, None]) % idx.shape[1]), right,
                               atol=1e-5, rtol=1e-5)


def grpo_batch(learner, noise=0.3):
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    g = torch.Generator().manual_seed(2)
    proximal = learner.logprobs(batch)
    # behaviour differs from the current policy: exercises the importance weights
    noisy = proximal + noise * torch.randn(proximal.shape, generator=g)
    batch.behaviour_logprobs = noisy * batch.response_mask
    batch.proximal_logprobs = proximal
    return batch


def grads(learner):
    return {n: p.grad.clone() for n, p in learner.model.named_parameters() if p.grad is not None}


def test_micro_batches_accumulate_to_full_batch_gradient(model_dir):
    loss_fn = get_algorithm("grpo").bind({"clip_high": 0.28})
    results = []
    for kwargs, parts in [({}, None), ({}, [torch.tensor([0]), torch.tensor([1, 2]), slice(3, 4)]),
                          ({"micro_batch_tokens": 16}, None)]:
        learner = TorchLearner(model_dir, max_grad_norm=1e9, **kwargs)
        batch = grpo_batch(learner)
        if "micro_batch_tokens" in kwargs:
            assert len(learner.micro_batches(batch)) >= 3
        stats = learner.step(loss_fn, batch, micro_batches=parts)
        results.append((stats, grads(learner)))
    (full_stats, full_grads), *others = results
    assert full_stats["grad_norm"] > 0 and full_stats["step_skipped"] == 0.0
    for stats, g in others:
        assert stats["loss"] == pytest.approx(full_stats["loss"], rel=1e-5, abs=1e-7)
        assert stats["iw_max"] == pytest.approx(full_stats["iw_max"])
        assert stats["grad_norm"] == pytest.approx(full_stats["grad_norm"], rel=1e-4)
        assert g.keys() == full_grads.keys()
        for name in g:
            torch.testing.assert_close(g[name], full_grads[name], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("parts", [None, [torch.tensor([2, 0]), slice(1, 2), torch.tensor([3])]])
def test_the_step_fills_the_proximal_logprobs_of_a_separate_pass(model_dir, parts):
    """fill_proximal: one forward pass per micro-batch instead of logprobs() then step(), same update."""
    loss_fn = get_algorithm("grpo").bind({"clip_high": 0.28})
    separate, fused = TorchLearner(model_dir, max_grad_norm=1e9), TorchLearner(model_dir, max_grad_norm=1e9)
    a = grpo_batch(separate)                                   # proximal from logprobs()
    b = grpo_batch(fused)
    b.proximal_logprobs = None
    calls = []
    forward = fused._forward
    fused._forward = lambda model, mb: calls.append(len(mb)) or forward(model, mb)
    stats_a = separate.step(loss_fn, a, micro_batches=parts)
    stats_b = fused.step(loss_fn, b, micro_batches=parts, fill_proximal=True)
    assert sum(calls) == len(b)                                 # each row went forward once
    torch.testing.assert_close(b.proximal_logprobs, a.proximal_logprobs, atol=1e-5, rtol=1e-5)
    assert b.proximal_logprobs[b.response_mask == 0].eq(0).all()
    assert stats_b["loss"] == pytest.approx(stats_a["loss"], rel=1e-5, abs=1e-7)
    assert stats_b["grad_norm"] == pytest.approx(stats_a["grad_norm"], rel=1e-4)
    for (name, p), q in zip(separate.model.named_parameters(), fused.model.parameters()):
        torch.testing.assert_close(q, p, atol=1e-6, rtol=1e-5, msg=name)


def test_grpo_steps_raise_positive_advantage_logprobs(model_dir):
    learner = TorchLearner(model_dir, lr=3e-3, micro_batch_size=2)
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    batch.behaviour_logprobs = learner.logprobs(batch)
    before = learner.logprobs(batch).sum(-1)
    loss_fn = get_algorithm("grpo").bind()
    for _ in range(4):
        batch.proximal_logprobs = learner.logprobs(batch)
        stats = learner.step(loss_fn, batch)
    after = learner.logprobs(batch).sum(-1)
    delta = after - before
    assert (delta[batch.advantages > 0] > 0).all() and (delta[batch.advantages < 0] < 0).all()
    assert learner.step_count == 4 and stats["lr"] == 3e-3 and 0 <= stats["clip_frac"] <= 1


def test_adamw_is_fused_where_torch_has_the_kernel_and_falls_back_cleanly(model_dir, monkeypatch):
    learner = TorchLearner(model_dir, lr=1e-3)
    assert all(g["fused"] for g in learner.optimizer.param_groups)          # CPU has it from torch 2.4

    class NoFusedKernel(torch.optim.AdamW):  # as on a device without one: the constructor fails late
        def __init__(self, params, fused=None, **kw):
            super().__init__(params, fused=fused, **kw)                    # (writes `fused` into each group)
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices")

    monkeypatch.setattr(torch.optim, "AdamW", NoFusedKernel)
    learner = TorchLearner(model_dir, lr=1e-3)
    assert not any(g["fused"] for g in learner.optimizer.param_groups)
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    batch.behaviour_logprobs = learner.logprobs(batch)
    assert learner.step(get_algorithm("grpo").bind(), batch, fill_proximal=True)["step_skipped"] == 0.0


def test_reference_model_stays_frozen(model_dir):
    learner = TorchLearner(model_dir, lr=1e-2, reference=True)
    batch = grpo_batch(learner)
    ref0 = learner.ref_logprobs(batch)
    torch.testing.assert_close(ref0, batch.proximal_logprobs)
    batch.ref_logprobs = ref0
    stats = learner.step(get_algorithm("grpo").bind({"kl_coef": 0.1}), batch)
    assert stats["kl"] == pytest.approx(0.0, abs=1e-6)   # first step: policy == reference
    torch.testing.assert_close(learner.ref_logprobs(batch), ref0)
    assert not torch.allclose(learner.logprobs(batch), ref0)
    with pytest.raises(RuntimeError):
        TorchLearner(model_dir).ref_logprobs(batch)


def test_non_finite_gradient_skips_the_update(model_dir):
    learner = TorchLearner(model_dir)
    before = {k: v.clone() for k, v in learner.export_weights().items()}
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    stats = learner.step(lambda logprobs, mask, batch: ((logprobs * float("nan")).sum(), {}), batch)
    assert stats["step_skipped"] == 1.0 and learner.step_count == 0
    for k, v in learner.export_weights().items():
        assert torch.equal(v, before[k])


def test_export_weights_match_saved_checkpoint(model_dir, tmp_path):
    learner = TorchLearner(model_dir)
    weights = learner.export_weights()
    from safetensors.torch import load_file
    learner.model.save_pretrained(tmp_path, safe_serialization=True)
    saved = load_file(str(tmp_path / "model.safetensors"))
    assert weights.keys() == saved.keys() and "lm_head.weight" not in weights
    for k, v in weights.items():
        assert v.is_contiguous() and not v.requires_grad
        assert torch.equal(v, saved[k])


def test_save_from_pretrained_and_load_round_trip(model_dir, tmp_path):
    learner = TorchLearner(model_dir, lr=1e-2)
    loss_fn = get_algorithm("grpo").bind()
    learner.step(loss_fn, grpo_batch(learner))
    ckpt = learner.save(tmp_path / "ckpt")
    assert json.loads((ckpt / "tokenizer_config.json").read_text()) == {"marker": "copied"}
    assert json.loads((ckpt / "trainer_state.json").read_text())["step"] == 1
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ckpt)
    for k, v in learner.model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k

    resumed = TorchLearner(model_dir, lr=1e-2)
    assert resumed.load(ckpt)["step"] == 1 and resumed.step_count == 1
    batch = grpo_batch(learner)
    learner.step(loss_fn, batch)
    resumed.step(loss_fn, batch)
    # equal after a further step only if the AdamW moments were restored too
    for (k, a), b in zip(learner.export_weights().items(), resumed.export_weights().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=k)
