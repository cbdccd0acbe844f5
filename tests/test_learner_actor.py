"""Pure helpers of the learner actor: balanced micro-batches and the learning-rate schedule."""

import math

import numpy as np
import pytest
import torch

from actors.learner import lr_at, micro_batches
from flux.learner.torch_learner import TrainBatch


def batch_of(lengths):
    samples = [([1, 2], list(range(3, 3 + n)), [0.0] * n, [0] * n, 1.0) for n in lengths]
    return TrainBatch.from_samples(samples, pad_id=0)


def test_micro_batches_partition_the_batch_with_near_equal_tokens():
    lengths = [9, 1, 1, 1, 8, 2, 2, 7]
    tb = batch_of(lengths)
    parts = micro_batches(tb, 4)
    assert len(parts) == 2
    assert sorted(torch.cat(parts).tolist()) == list(range(len(lengths)))     # every sample exactly once
    tokens = [int(tb.attention_mask[p].sum()) for p in parts]
    assert max(tokens) - min(tokens) <= 2 + 9                                  # within one sample of equal
    assert micro_batches(tb, 0) is None and micro_batches(tb, 8) is None       # whole batch at once


def test_cosine_schedule_runs_from_lr_to_min_ratio():
    assert lr_at(0, 100, 1e-3, "cosine", 0.1) == pytest.approx(1e-3)
    assert lr_at(99, 100, 1e-3, "cosine", 0.1) == pytest.approx(1e-4)
    assert lr_at(49, 99, 1e-3, "cosine", 0.1) == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi / 2)))
    values = [lr_at(s, 50, 1e-3, "cosine", 0.0) for s in range(50)]
    assert np.all(np.diff(values) <= 0)
    assert lr_at(30, 50, 1e-3, "constant", 0.1) == 1e-3


def test_schedules_are_transformers_own_curves_after_warmup():
    from transformers import get_scheduler

    def theirs(name, warmup, total, **kw):  # what a TRL/HF user's scheduler gives at each step
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total,
                              scheduler_specific_kwargs=kw)
        out = []
        for _ in range(total):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert [lr_at(s, 20, 1.0, "linear", 0.1, warmup=4) for s in range(20)] == pytest.approx(theirs("linear", 4, 20))
    assert [lr_at(s, 20, 1.0, "constant", 0.1, warmup=4) for s in range(20)] == pytest.approx(
        theirs("constant_with_warmup", 4, 20))
    warm = [lr_at(s, 20, 2e-3, "cosine", 0.1, warmup=5) for s in range(20)]
    assert warm[:6] == pytest.approx([0, 4e-4, 8e-4, 1.2e-3, 1.6e-3, 2e-3]) and warm[-1] == pytest.approx(2e-4)
    assert np.all(np.diff(warm[5:]) <= 0)


def test_norms_and_biases_get_no_weight_decay():
    from flux.learner.base import decay_groups

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Embedding(5, 4))
    decayed, plain = decay_groups(model, 0.1, ())
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3]), torch.Size([5, 4])]  # matrices only
    assert len(plain["params"]) == 3  # the bias, the LayerNorm's weight and bias
    decayed, plain = decay_groups(model, 0.1, ("2.",))  # by name: the embedding too
    assert [p.shape for p in decayed["params"]] == [torch.Size([4, 3])] and len(plain["params"]) == 4


def test_token_budget_micro_batches_pack_similar_lengths_and_keep_pairs():
    lengths = [40, 2, 3, 38, 2, 4, 2, 3]                       # a long tail: two rows ~10× the rest
    tb = batch_of(lengths)
    parts = micro_batches(tb, tokens=100)
    assert sorted(torch.cat(parts).tolist()) == list(range(len(lengths)))
    width = tb.attention_mask.sum(-1)
    for p in parts:                                           # rows × longest row within the budget
        assert len(p) * int(width[p].max()) <= 100
    assert sorted(parts[0].tolist()) == [0, 3]                # the two long rows share one micro-batch
    padded = sum(len(p) * int(width[p].max()) for p in parts)
    assert padded < len(lengths) * int(width.max()) / 2       # less than half the padding of one batch
    pairs = micro_batches(tb, tokens=100, pairs=True)
    assert all((r ^ 1) in p.tolist() for p in pairs for r in p.tolist())   # 2i and 2i+1 together
    # one row longer than the budget still gets a micro-batch of its own
    assert [len(p) for p in micro_batches(tb, tokens=10)].count(1) >= 2


def test_tokens_older_than_eta_max_are_masked_out_of_the_batch():
    """The lag bound per token: a completion that spans versions keeps its fresh tokens; its group, rewards
    and lengths stay whole (advantages are per group)."""
    from actors.learner import to_train_batch
    from flux.run import protocol as P

    g = P.TrajectoryGroup(
        group_id=1, prompt_index=0, generator="gen0", sample_count=2, prompt_ids=np.array([5, 6], np.int32),
        response_ids=np.array([7, 8, 9, 7, 8], np.int32), response_lens=np.array([3, 2], np.int32),
        logprobs=np.full(5, -1.0, np.float32), versions=np.array([2, 4, 5, 5, 5], np.int32),
        rewards=np.array([0.0, 1.0], np.float32), finish=np.ones(2, np.uint8), gen_seconds=0.1, meta={})
    batch = P.Batch.from_groups(0, [g])
    tb, rewards, lengths = to_train_batch(batch, 0, version=6, eta_max=2)
    assert tb.response_mask.sum(-1).tolist() == [2.0, 2.0]            # the version-2 token (lag 4) is out
    assert ((6 - tb.versions)[tb.response_mask > 0] <= 2).all()
    assert lengths[0].tolist() == [3, 2] and rewards[0].tolist() == [0.0, 1.0]
    whole, _, _ = to_train_batch(batch, 0)
    assert whole.response_mask.sum().item() == 5
