"""Tests for the built-in PyTorch rollout engine (flux/engine/torch_engine.py)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from flux.engine.base import Completion, SamplingParams  # noqa: E402
from flux.engine.torch_engine import TorchEngine, filter_logits, sample_tokens  # noqa: E402

torch.set_num_threads(1)
VOCAB = 48
PROMPTS = [[3, 7, 11], [5, 9, 2, 14, 20, 8, 1], [30], [12, 12, 40, 41, 6]]  # lengths 3, 7, 1, 5


def tiny_model(seed: int = 0, tie: bool = True) -> torch.nn.Module:
    # initializer_range=0.3: the default 0.02 gives near-uniform logits whose greedy path just repeats
    # the input token; a wider init gives peaked, varied distributions (so stop tokens get hit).
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie, initializer_range=0.3,
    )
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return tiny_model(0)


def teacher_forced_logprobs(
    model, prompt: list[int], completion: np.ndarray, temperature: float
) -> np.ndarray:
    """log_softmax(logits / T) of each completion token, from one unpadded forward over prompt+completion."""
    ids = torch.tensor([prompt + completion.tolist()])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = (logits / (temperature or 1.0)).log_softmax(-1)
    return logp.gather(-1, torch.as_tensor(completion, dtype=torch.long)[:, None]).squeeze(-1).numpy()


def test_shapes_and_dtypes(model):
    engine = TorchEngine(model, seed=0)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert len(out) == len(PROMPTS)
    for c in out:
        assert isinstance(c, Completion) and not c.finished
        assert c.token_ids.dtype == np.int32 and c.token_ids.shape == (6,)
        assert c.logprobs.dtype == np.float32 and c.logprobs.shape == (6,)
        assert c.versions.dtype == np.int32 and (c.versions == 0).all()
        assert (c.token_ids >= 0).all() and (c.token_ids < VOCAB).all() and (c.logprobs <= 0).all()
    assert engine.tokens_generated == 6 * len(PROMPTS) and engine.busy_seconds > 0


def test_stop_tokens_every_token_stops_after_one(model):
    every_token = SamplingParams(max_new_tokens=5, stop_token_ids=tuple(range(VOCAB)))
    out = TorchEngine(model, seed=1).generate(PROMPTS, every_token)
    assert all(c.finished and len(c.token_ids) == 1 for c in out)


def test_stop_token_is_kept_and_ends_row():
    model = tiny_model(0, tie=False)
    head = torch.nn.Linear(64, VOCAB, bias=True)
    with torch.no_grad():  # logits = bias: token 17 overwhelmingly likely after anything
        head.weight.zero_()
        head.bias.zero_()
        head.bias[17] = 30.0
    model.lm_head = head
    out = TorchEngine(model, seed=0).generate(PROMPTS, SamplingParams(max_new_tokens=5, stop_token_ids=(17,)))
    for c in out:
        assert c.finished and c.token_ids.tolist() == [17] and c.logprobs[0] > -1e-3


def test_logprobs_match_teacher_forcing_with_left_padding(model):
    """The behaviour log-probs must be what the learner recomputes, row by row, without padding."""
    for sampling in (
        SamplingParams(max_new_tokens=10, temperature=0.7, top_k=20, top_p=0.9, stop_token_ids=(4, 19, 33)),
        SamplingParams(max_new_tokens=8, temperature=1.3),
        SamplingParams(max_new_tokens=8, temperature=0.0),
    ):
        out = TorchEngine(model, seed=3).generate(PROMPTS, sampling)
        for prompt, c in zip(PROMPTS, out):
            ref = teacher_forced_logprobs(model, prompt, c.token_ids, sampling.temperature)
            np.testing.assert_allclose(c.logprobs, ref, atol=1e-4)
    # The stop-token run above must really have mixed lengths, or it tested nothing about masking.
    out = TorchEngine(model, seed=3).generate(PROMPTS, SamplingParams(10, 0.7, 0.9, 20, (4, 19, 33)))
    assert len({len(c.token_ids) for c in out}) > 1


def test_greedy_batched_equals_one_by_one(model):
    sampling = SamplingParams(max_new_tokens=8, temperature=0.0)
    engine = TorchEngine(model)
    batched = engine.generate(PROMPTS, sampling)
    for prompt, c in zip(PROMPTS, batched):
        single = engine.generate([prompt], sampling)[0]
        assert c.token_ids.tolist() == single.token_ids.tolist()
        np.testing.assert_allclose(c.logprobs, single.logprobs, atol=1e-5)


def test_same_seed_same_samples(model):
    sampling = SamplingParams(max_new_tokens=8, temperature=1.0)
    a = [c.token_ids.tolist() for c in TorchEngine(model, seed=7).generate(PROMPTS, sampling)]
    b = [c.token_ids.tolist() for c in TorchEngine(model, seed=7).generate(PROMPTS, sampling)]
    c = [c.token_ids.tolist() for c in TorchEngine(model, seed=8).generate(PROMPTS, sampling)]
    assert a == b and a != c


def test_filter_logits_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isfinite(filter_logits(logits, top_k=2)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.1)).tolist() == [[True, False, False, False]]
    # top_k=1 is greedy, but the recorded log-prob stays that of the full tempered distribution.
    tokens, logp = sample_tokens(logits.repeat(50, 1), SamplingParams(temperature=1.0, top_k=1))
    assert (tokens == 0).all() and torch.allclose(logp, torch.log(torch.tensor(0.5)))


class StepHook:
    """Wrap model.forward; after the n-th decode step (prefill excluded), run `action` once."""

    def __init__(self, model: torch.nn.Module, after_decode_steps: int, action) -> None:
        self.calls, self.n, self.action, self.inner = 0, after_decode_steps, action, model.forward
        model.forward = self

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        self.calls += 1
        if self.calls == self.n + 1:
            self.action()
        return out


def test_inflight_update_switches_version_mid_sequence():
    model, new_state = tiny_model(0), tiny_model(1).state_dict()
    old_model = tiny_model(0)
    engine = TorchEngine(model, seed=0, update_mode="inflight")

    def announce_from_io_thread() -> None:
        io = threading.Thread(target=engine.load_weights, args=(1, lambda: new_state))
        io.start()
        io.join()

    hook = StepHook(model, 3, announce_from_io_thread)
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=8))
    for prompt, c in zip(PROMPTS, out):
        # Forward passes: prefill -> token 0, decode k -> token k. The update lands after decode 3.
        assert c.versions.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
        ref = teacher_forced_logprobs(old_model, prompt, c.token_ids, 1.0)
        np.testing.assert_allclose(c.logprobs[:4], ref[:4], atol=1e-4)  # old-weight tokens are exact
    assert engine.version == 1 and hook.calls == 8
    for name, value in model.state_dict().items():
        assert torch.equal(value, new_state[name]), name


def test_between_sequences_waits_for_the_next_call():
    model, new_state = tiny_model(0), tiny_model(1).state_dict()
    engine = TorchEngine(model, seed=0, update_mode="between_sequences")
    StepHook(model, 2, lambda: engine.load_weights(1, new_state))
    first = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert all((c.versions == 0).all() for c in first) and engine.version == 0
    second = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6))
    assert all((c.versions == 1).all() for c in second) and engine.version == 1


def test_only_newest_update_applies_and_never_goes_back():
    engine = TorchEngine(tiny_model(0), version=2)
    states = {v: tiny_model(v).state_dict() for v in (1, 3, 4)}
    engine.load_weights(3, states[3])
    engine.load_weights(4, lambda: states[4])
    engine.load_weights(3, states[3])  # older than the queued one: ignored
    assert engine.apply_pending() and engine.version == 4
    assert torch.equal(engine.model.lm_head.weight, states[4]["lm_head.weight"])
    engine.load_weights(1, states[1])
    assert not engine.apply_pending() and engine.version == 4
    assert not engine.apply_pending()


def test_pause_and_resume_from_another_thread(model):
    engine = TorchEngine(model, seed=0)
    engine.pause()
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(engine.generate(PROMPTS, SamplingParams(max_new_tokens=4)))
    )
    worker.start()
    time.sleep(0.3)
    assert worker.is_alive() and not result and engine.tokens_generated == 0
    engine.resume()
    worker.join(timeout=10)
    assert not worker.is_alive() and len(result[0]) == len(PROMPTS)
    assert engine.busy_seconds < 0.3  # time spent paused is not busy time


def test_pause_mid_generation_then_resume():
    model = tiny_model(0)
    engine = TorchEngine(model, seed=0)
    StepHook(model, 1, engine.pause)
    result: list = []
    worker = threading.Thread(
        target=lambda: result.append(engine.generate(PROMPTS, SamplingParams(max_new_tokens=5)))
    )
    worker.start()
    time.sleep(0.3)
    # Paused by the first decode forward: the next step waits before it samples the second token.
    assert worker.is_alive() and engine.tokens_generated == len(PROMPTS)  # stopped at a step boundary
    engine.resume()
    worker.join(timeout=10)
    assert all(len(c.token_ids) == 5 for c in result[0])


def test_close_releases_model_and_unblocks(model):
    engine = TorchEngine(model)
    engine.pause()
    errors: list = []

    def run() -> None:
        try:
            engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
        except RuntimeError as exc:
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    time.sleep(0.1)
    engine.close()
    worker.join(timeout=10)
    assert engine.model is None and len(errors) == 1
    with pytest.raises(RuntimeError):
        engine.generate(PROMPTS, SamplingParams())


def test_from_pretrained_and_validation(tmp_path, model):
    model.save_pretrained(tmp_path)
    engine = TorchEngine.from_pretrained(str(tmp_path), seed=0, version=5)
    assert engine.version == 5 and next(engine.model.parameters()).dtype == torch.float32
    greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
    assert [c.token_ids.tolist() for c in engine.generate(PROMPTS, greedy)] == [
        c.token_ids.tolist() for c in TorchEngine(model).generate(PROMPTS, greedy)
    ]
    for bad in (dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_k=-1)):
        with pytest.raises(ValueError):
            SamplingParams(**bad).validate()
    with pytest.raises(ValueError):
        engine.generate([[1], []], SamplingParams())
    with pytest.raises(ValueError):
        TorchEngine(model, update_mode="sometimes")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_logprobs_match_teacher_forcing():
    model = tiny_model(0).cuda()
    sampling = SamplingParams(max_new_tokens=8, stop_token_ids=(4, 19))
    out = TorchEngine(model, seed=0).generate(PROMPTS, sampling)
    for prompt, c in zip(PROMPTS, out):
        ids = torch.tensor([prompt + c.token_ids.tolist()], device="cuda")
        with torch.no_grad():
            logp = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().log_softmax(-1)
        ref = logp.gather(-1, ids[0, len(prompt):, None]).squeeze(-1).cpu().numpy()
        np.testing.assert_allclose(c.logprobs, ref, atol=1e-3)


# ---- continuous batching: add / step ----------------------------------------------------------------

def run_to_end(engine: TorchEngine, joins: dict[int, tuple]) -> dict:
    """Step until every request is done; `joins` maps a step number to the (key, prompts, sampling) added
    before it. Returns {key: completions} and checks each request comes back exactly once."""
    done, step = {}, 0
    while step in joins or engine.rows_in_flight or any(s > step for s in joins):
        if step in joins:
            engine.add(*joins[step])
        for key, outs in engine.step():
            assert key not in done
            done[key] = outs
        step += 1
    return done


def test_requests_joining_mid_flight_sample_as_if_alone(model):
    """Greedy: a request that joins a running batch (its prompts left-padded into the batch's cache) gets
    the tokens it gets alone, and so does the request it joined; log-probs match teacher forcing."""
    greedy = SamplingParams(max_new_tokens=9, temperature=0.0)
    engine = TorchEngine(model)
    alone = {k: engine.generate(ps, greedy) for k, ps in (("a", PROMPTS[:2]), ("b", PROMPTS[2:]), ("c", [[9] * 12]))}
    joined = run_to_end(engine, {0: ("a", PROMPTS[:2], greedy), 3: ("b", PROMPTS[2:], greedy),
                                 5: ("c", [[9] * 12], greedy)})
    for key, outs in alone.items():
        for ref, c in zip(outs, joined[key]):
            assert c.token_ids.tolist() == ref.token_ids.tolist(), key
            np.testing.assert_allclose(c.logprobs, ref.logprobs, atol=1e-4)
    for prompt, c in zip(PROMPTS, joined["a"] + joined["b"]):
        np.testing.assert_allclose(c.logprobs, teacher_forced_logprobs(model, prompt, c.token_ids, 1.0), atol=1e-4)


def test_rows_leave_when_done_and_the_cache_stays_narrow(model):
    """Sampled rows of mixed lengths leave as they finish; a batch that keeps taking new prompts for 60
    steps keeps a cache no wider than its longest live row; every log-prob is still the teacher-forced one."""
    sampling = SamplingParams(max_new_tokens=6, temperature=1.0, stop_token_ids=(4, 19, 33))
    engine = TorchEngine(model, seed=5)
    joins = {s: (s, [PROMPTS[s % 4]], sampling) for s in range(60)}
    widths, done, step = [], {}, 0
    while step < 60 or engine.rows_in_flight:
        if step in joins:
            engine.add(*joins[step])
        done.update(engine.step())
        if engine._mask is not None:
            widths.append(engine._mask.shape[1])
            assert engine.rows_in_flight <= 6 and engine._mask.shape[0] == engine.rows_in_flight
        step += 1
    assert sorted(done) == list(range(60)) and max(widths) <= 7 + 6
    lengths = {len(c.token_ids) for (c,) in done.values()}
    assert len(lengths) > 1 and engine.tokens_generated == sum(len(c.token_ids) for (c,) in done.values())
    for s, (c,) in done.items():
        np.testing.assert_allclose(c.logprobs, teacher_forced_logprobs(model, PROMPTS[s % 4], c.token_ids, 1.0),
                                   atol=1e-4)


def test_inflight_update_while_rows_join():
    """Weights that arrive between steps: running rows switch version mid-sequence; a row that joins later
    starts on the new weights."""
    model, new_state = tiny_model(0), tiny_model(1).state_dict()
    engine = TorchEngine(model, seed=0, update_mode="inflight")
    sampling = SamplingParams(max_new_tokens=6)
    engine.add("old", PROMPTS[:2], sampling)
    for _ in range(3):
        assert engine.step() == []
    engine.load_weights(1, new_state)
    engine.add("new", PROMPTS[2:], sampling)
    done = dict(run_to_end(engine, {}))
    # Three steps sampled tokens 0-2 and computed token 3's logits on version 0; the update lands before
    # step 4, so token 4 is the first of version 1.
    assert all(c.versions.tolist() == [0, 0, 0, 0, 1, 1] for c in done["old"])
    assert all((c.versions == 1).all() for c in done["new"])


def test_between_sequences_drains_before_anyone_joins():
    model, new_state = tiny_model(0), tiny_model(1).state_dict()
    engine = TorchEngine(model, seed=0, update_mode="between_sequences")
    sampling = SamplingParams(max_new_tokens=5)
    engine.add("old", PROMPTS[:2], sampling)
    engine.step()
    engine.load_weights(1, new_state)
    engine.add("new", PROMPTS[2:], sampling)
    order = []
    while engine.rows_in_flight:
        order += [key for key, _ in engine.step()]
        if "old" not in order:
            assert len(engine._rows) == 2  # "new" waits for the update, which waits for "old" to finish
    assert order == ["old", "new"] and engine.version == 1


def test_one_batch_shares_its_sampling_parameters(model):
    engine = TorchEngine(model)
    engine.add("a", PROMPTS, SamplingParams(max_new_tokens=4, seed=1))
    engine.add("b", PROMPTS, SamplingParams(max_new_tokens=4, seed=2))  # another seed is fine
    with pytest.raises(ValueError, match="share their sampling"):
        engine.add("c", PROMPTS, SamplingParams(max_new_tokens=5))
    with pytest.raises(RuntimeError, match="add/step"):
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=4))
