"""The SGLang rollout backend (flux/integrations/sglang/engine.py, weights.py) against the mock server.

tests/sglang_mock.py follows SGLang 0.5.23's HTTP contract with a deterministic fake model, so every
token, log-prob and version a test sees can be predicted: `next_token(context, digest)`, where the
digest is that of the weights the server holds (0 before any update).
"""

from __future__ import annotations

import base64
import io
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flux.config import ConfigError, FluxConfig
from flux.engine.base import SamplingParams
from flux.integrations.sglang.engine import (
    SGLangClient,
    SGLangEngine,
    SGLangError,
    SGLangServer,
    SGLangServerGone,
    check_setup,
)
from flux.integrations.sglang.weights import (
    buckets,
    distributed_request,
    flatten,
    serialize,
    tensor_requests,
    unflatten,
)
from flux.run.runtime import free_port
from tests.sglang_mock import (
    ALLOWED_GLOBALS,
    SAMPLING_KEYS,
    MockSGLang,
    decode_named_tensors,
    next_token,
    token_logprob,
    weights_digest,
)

VOCAB = 64
PROMPTS = [[3, 7, 11], [5, 9, 2, 14], [30], [12, 12, 40, 41, 6]]
ROOT = Path(__file__).resolve().parent.parent


def state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Weights of several dtypes and shapes (bucketing is per dtype)."""
    g = torch.Generator().manual_seed(seed)
    return {"model.embed_tokens.weight": torch.randn(VOCAB, 8, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
            "model.layers.0.input_layernorm.weight": torch.randn(8, generator=g),
            "model.norm.weight": torch.randn(8, generator=g).to(torch.bfloat16),
            "model.rotary.steps": torch.arange(5, dtype=torch.int64),
            "model.scalar": torch.tensor(2.5)}


def predicted(prompt: list[int], tokens, versions, digests: dict[int, int]) -> list[int]:
    """What the fake model samples at each position, given the version that sampled it."""
    return [next_token(prompt + [int(t) for t in tokens[:i]], digests[int(v)], VOCAB) for i, v in enumerate(versions)]


@pytest.fixture
def mock():
    server = MockSGLang(vocab_size=VOCAB)
    url = server.start()
    yield server, url
    server.stop()


def engine_for(url: str, **kw) -> SGLangEngine:
    return SGLangEngine(url, bucket_bytes=kw.pop("bucket_bytes", 1 << 20), max_concurrency=16, **kw)


def paths(server: MockSGLang) -> list[str]:
    return [p for p, _ in server.calls]


# ---- generation ---------------------------------------------------------------------------------

def test_generate_returns_the_servers_tokens_logprobs_and_versions(mock):
    server, url = mock
    engine = engine_for(url)
    assert server.version == "0"  # the engine labels the server's weights with its own version number
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6, temperature=0.7, top_k=0))
    for prompt, c in zip(PROMPTS, out):
        assert c.token_ids.dtype == np.int32 and c.logprobs.dtype == np.float32 and c.versions.dtype == np.int32
        assert c.token_ids.tolist() == predicted(prompt, c.token_ids, [0] * 6, {0: 0}) and not c.finished
        lps = [token_logprob(prompt + c.token_ids[:i].tolist(), 0) for i in range(6)]
        np.testing.assert_allclose(c.logprobs, lps, rtol=1e-6)
        assert (c.versions == 0).all()
    assert engine.tokens_generated == 6 * len(PROMPTS) and engine.busy_seconds > 0
    bodies = [b for p, b in server.calls if p == "/generate"]
    assert len(bodies) == len(PROMPTS)
    for body in bodies:  # only keys SGLang's SamplingParams takes; top_k "off" is -1 there, not 0
        assert set(body["sampling_params"]) <= SAMPLING_KEYS and body["return_logprob"] is True
        assert body["sampling_params"]["top_k"] == -1 and body["sampling_params"]["temperature"] == 0.7
    engine.close()


def test_a_stop_token_ends_a_completion_and_is_kept(mock):
    _, url = mock
    engine = engine_for(url)
    free = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8))[0]
    stop = int(free.token_ids[2])
    first = free.token_ids.tolist().index(stop)
    c = engine.generate([PROMPTS[1]], SamplingParams(max_new_tokens=8, stop_token_ids=(stop,)))[0]
    assert c.finished and c.token_ids.tolist() == free.token_ids[:first + 1].tolist()
    engine.close()


def test_the_mock_refuses_what_sglang_refuses(mock):
    """The contract the engine is held to: unknown sampling keys and bad values are 400s."""
    _, url = mock
    client = SGLangClient(url)
    status, out = client.request("/generate", {"input_ids": [1, 2], "sampling_params": {"max_tokens": 3}})
    assert status == 400 and "unexpected keyword argument 'max_tokens'" in out["error"]["message"]
    status, _ = client.request("/generate", {"input_ids": [1, 2], "sampling_params": {"top_k": 0}})
    assert status == 400
    status, out = client.request("/pause_generation", {"mode": "later"})
    assert status == 400 and out["code"] == 400
    status, out = client.request("/update_weights_from_tensor", {"load_format": "flattened_bucket"})
    assert status == 400 and "serialized_named_tensors" in out["message"]
    with pytest.raises(SGLangError, match=r"/generate failed \(HTTP 400\): .*max_tokens"):
        client.call("/generate", {"input_ids": [1], "sampling_params": {"max_tokens": 3}})


# ---- weights ------------------------------------------------------------------------------------

def test_new_weights_reach_the_server_exactly_and_change_generations(mock):
    server, url = mock
    engine = engine_for(url, bucket_bytes=512)  # several buckets
    state = state_dict()
    engine.load_weights(1, lambda: state)
    assert engine.apply_pending() and engine.version == 1 and server.version == "1"
    assert server.weights.keys() == state.keys()
    for name, t in state.items():
        assert server.weights[name].dtype == t.dtype and torch.equal(server.weights[name], t), name
    updates = [b for p, b in server.calls if p == "/update_weights_from_tensor"]
    assert len(updates) > 2 and all(b["load_format"] == "flattened_bucket" and not b["flush_cache"] for b in updates)
    assert [b.get("weight_version") for b in updates] == [None] * (len(updates) - 1) + ["1"]
    assert paths(server)[-len(updates) - 5:] == (["/pause_generation", "/flush_cache", "/begin_weight_update"]
                                                 + ["/update_weights_from_tensor"] * len(updates)
                                                 + ["/end_weight_update", "/continue_generation"])
    assert not server.session
    c = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=5))[0]
    assert (c.versions == 1).all()
    assert c.token_ids.tolist() == predicted(PROMPTS[0], c.token_ids, c.versions, {1: weights_digest(state)})
    assert not engine.apply_pending()  # nothing queued
    engine.load_weights(1, lambda: state_dict(1))
    assert not engine.apply_pending() and engine.version == 1  # never the same version twice, never back
    engine.close()


def test_a_source_that_gives_up_leaves_the_server_alone(mock):
    server, url = mock
    engine = engine_for(url)
    engine.load_weights(3, lambda: None)  # e.g. the shared-memory slot was overwritten
    assert not engine.apply_pending() and engine.version == 0 and "/pause_generation" not in paths(server)
    engine.close()


def run_in_thread(fn, *args):
    box = {}

    def target():
        try:
            box["out"] = fn(*args)
        except Exception as e:  # noqa: BLE001 (handed back to the test)
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def update_while_generating(server: MockSGLang, engine: SGLangEngine, state, n: int = 40):
    """Start a generate call, queue weights v1 once every request has a few tokens; return the completions."""
    server.token_delay_s = 0.01
    thread, box = run_in_thread(engine.generate, PROMPTS, SamplingParams(max_new_tokens=n))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with server._cond:
            running = list(server.running.values())
        if len(running) == len(PROMPTS) and all(len(r.out_ids) >= 3 for r in running):
            break
        time.sleep(0.005)
    engine.load_weights(1, state)
    thread.join(30)
    assert "error" not in box, box.get("error")
    return box["out"]


@pytest.mark.parametrize("mode", ["abort", "retract", "in_place"])
def test_inflight_update_switches_versions_mid_sequence(mock, mode):
    server, url = mock
    engine = engine_for(url, pause_mode=mode)
    state = state_dict()
    outs = update_while_generating(server, engine, state)
    digests = {0: 0, 1: weights_digest(state)}
    for prompt, c in zip(PROMPTS, outs):
        assert len(c.token_ids) == 40 and not c.finished
        assert (np.diff(c.versions) >= 0).all() and c.versions[0] == 0 and c.versions[-1] == 1, c.versions
        # every token is what the weights of its recorded version sample after its context
        assert c.token_ids.tolist() == predicted(prompt, c.token_ids, c.versions, digests)
    generates = [b for p, b in server.calls if p == "/generate"]
    pause = next(b for p, b in server.calls if p == "/pause_generation")
    assert pause == {"mode": mode}
    if mode == "abort":  # every aborted request was resubmitted with its tokens so far
        assert len(generates) == 2 * len(PROMPTS)
        for body in generates[len(PROMPTS):]:
            prompt = next(p for p in PROMPTS if body["input_ids"][:len(p)] == p)
            assert body["sampling_params"]["max_new_tokens"] == 40 - (len(body["input_ids"]) - len(prompt))
        assert not engine._cache_dirty
    elif mode == "retract":  # requests waited in the queue, and the old KV was flushed during the pause
        assert len(generates) == len(PROMPTS) and not engine._cache_dirty
        assert {"paused": True, "mode": "retract", "held": len(PROMPTS)} in server.flushes
    else:  # requests waited in place; the stale radix cache is flushed before the next call
        assert len(generates) == len(PROMPTS) and engine._cache_dirty
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=2))
        assert not engine._cache_dirty and paths(server).count("/flush_cache") == 1
    engine.close()


def test_between_sequences_keeps_a_call_on_one_version(mock):
    server, url = mock
    engine = engine_for(url, update_mode="between_sequences")
    outs = update_while_generating(server, engine, state_dict(), n=20)
    assert all((c.versions == 0).all() for c in outs) and engine.version == 0
    c = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0]
    assert (c.versions == 1).all()
    engine.close()


def test_pause_and_resume_reach_the_server(mock):
    server, url = mock
    engine = engine_for(url, pause_mode="retract")
    engine.pause()
    assert server.paused and server.pause_mode == "retract"
    thread, box = run_in_thread(engine.generate, [PROMPTS[0]], SamplingParams(max_new_tokens=3))
    time.sleep(0.2)
    assert thread.is_alive() and "/generate" not in paths(server)  # held back while paused
    engine.resume()
    thread.join(10)
    assert not server.paused and len(box["out"][0].token_ids) == 3
    engine.close()


def test_score_returns_teacher_forced_logprobs(mock):
    server, url = mock
    engine = engine_for(url)
    outs = engine.score([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]])
    for prompt, response, c in zip([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], outs):
        assert c.token_ids.tolist() == response and c.finished and (c.versions == 0).all()
        want = [token_logprob(prompt + response[:i], 0) for i in range(len(response))]
        np.testing.assert_allclose(c.logprobs, want, rtol=1e-6)
    body = next(b for p, b in server.calls if p == "/generate" and b["input_ids"] == [1, 2, 3, 5, 6])
    # from the prompt's last token: SGLang's first scored entry is None (nothing before it is scored)
    assert body["sampling_params"] == {"max_new_tokens": 0} and body["logprob_start_len"] == 2
    with pytest.raises(ValueError, match="temperature 1"):  # SGLang scores given tokens at T = 1 only
        engine.score([[1]], [[2]], temperature=0.7)
    engine.close()


# ---- failures -----------------------------------------------------------------------------------

def test_an_abort_that_is_not_ours_fails_the_call(mock):
    server, url = mock
    engine = engine_for(url)
    server.token_delay_s = 0.02
    thread, box = run_in_thread(engine.generate, PROMPTS, SamplingParams(max_new_tokens=50))
    time.sleep(0.2)
    SGLangClient(url).call("/abort_request", {"abort_all": True, "abort_message": "out of memory"})
    thread.join(10)
    assert isinstance(box.get("error"), SGLangError) and "out of memory" in str(box["error"])
    engine.close()


def test_a_refused_update_is_an_error_and_generation_continues(mock):
    server, url = mock
    engine = engine_for(url)
    server.fail["/update_weights_from_tensor"] = (400, {"success": False, "message": "shape mismatch"})
    engine.load_weights(1, state_dict())
    with pytest.raises(SGLangError, match="update_weights_from_tensor failed .*shape mismatch"):
        engine.apply_pending()
    assert engine.version == 0 and not server.paused and not server.session  # never left paused or open
    engine.load_weights(2, state_dict())
    assert engine.apply_pending() and server.version == "2"  # the next update opens a new session
    engine.close()


def test_weight_updates_run_only_inside_a_session(mock):
    server, url = mock
    client = SGLangClient(url)
    (body, _), = tensor_requests({"w": torch.ones(2)}, 1, max_bytes=1 << 20, tp_size=1)
    status, out = client.request("/update_weights_from_tensor", body)
    assert status == 400 and "must run between begin_weight_update() and end_weight_update()" in out["message"]
    assert client.request("/end_weight_update", {})[0] == 400  # none open
    assert client.request("/begin_weight_update", {})[0] == 200
    assert client.request("/begin_weight_update", {})[0] == 400  # one at a time
    assert client.request("/update_weights_from_tensor", body)[0] == 200
    assert client.request("/end_weight_update", {})[0] == 200 and server.version == "1"


def test_a_payload_the_model_cannot_load_kills_the_server_and_the_engine_says_so():
    """SGLang's scheduler raises on an unknown name or a wrong shape, and the server dies with it."""
    server = MockSGLang(vocab_size=VOCAB, expected={"model.norm.weight": (8,)})
    url = server.start()
    engine = engine_for(url)
    engine.load_weights(1, {"model.norm.weight": torch.ones(9)})  # the wrong shape
    with pytest.raises(SGLangServerGone, match=r"cannot reach the SGLang server .*during the update to version 1"):
        engine.apply_pending()
    assert "param size (8,) != loaded weight size (9,)" in server.crashed
    with pytest.raises(SGLangServerGone):  # nothing listens any more
        SGLangClient(url).call("/health")
    assert not engine.recover()  # not its server: it cannot start it again
    engine.close()


def test_requests_have_their_own_rid_and_seed_and_close_aborts_them(mock):
    server, url = mock
    engine = engine_for(url)
    engine.generate(PROMPTS, SamplingParams(max_new_tokens=2, seed=5))
    bodies = [b for p, b in server.calls if p == "/generate"]
    assert len({b["rid"] for b in bodies}) == len(PROMPTS)
    # SGLang aborts by rid prefix: no rid of ours is a prefix of another
    assert not any(a != b and b.startswith(a) for a in (x["rid"] for x in bodies) for b in (x["rid"] for x in bodies))
    assert all(b["rid"].endswith(".") for b in bodies)
    seeds = [b["sampling_params"]["sampling_seed"] for b in bodies]
    assert len(set(seeds)) == len(PROMPTS)  # one per prompt: a group's samples are not copies
    engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=2))
    assert "sampling_seed" not in server.calls[-1][1]["sampling_params"]
    assert "/server_info" in paths(server) and "/get_server_info" not in paths(server)
    server.token_delay_s = 0.05
    thread, box = run_in_thread(engine.generate, PROMPTS, SamplingParams(max_new_tokens=200))
    deadline = time.monotonic() + 10
    while len(server.running) < len(PROMPTS) and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.close()  # a server it does not own: what it still runs there is aborted
    thread.join(10)
    aborts = [b["rid"] for p, b in server.calls if p == "/abort_request"]
    assert sorted(aborts) == sorted(b["rid"] for p, b in server.calls if p == "/generate")[-len(PROMPTS):] \
        or sorted(aborts) == sorted(b["rid"] for p, b in server.calls if p == "/generate"
                                    and b["sampling_params"]["max_new_tokens"] == 200)
    deadline = time.monotonic() + 10
    while server.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.running


def test_an_unreachable_server_is_a_one_line_error():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SGLangError, match=f"cannot reach the SGLang server at {url}"):
        SGLangEngine(url)


def test_a_generator_picks_its_url_and_waits_for_a_starting_server(mock):
    from flux.engine import build_engine

    server, url = mock
    other = MockSGLang(vocab_size=VOCAB)
    other_url = other.start()
    other.broken = "starting"  # /health answers 503 until the model is loaded
    threading.Timer(0.3, lambda: setattr(other, "broken", "")).start()
    cfg = FluxConfig(rollout={"engine": "sglang", "num_generators": 2, "sglang_url": f"{url},{other_url}",
                              "sglang_pause_mode": "retract"}).validate()
    try:
        engine = build_engine(cfg, "unused", name="gen1")
        assert engine.url == other_url and engine.pause_mode == "retract" and other.version == "0"
        engine.close()
    finally:
        other.stop()
    assert server.calls == []  # gen1 left gen0's server alone


def test_setup_checks_the_url_or_the_package():
    cfg = FluxConfig(rollout={"engine": "sglang", "sglang_url": f"http://127.0.0.1:{free_port()}"}).validate()
    with pytest.raises(SGLangError, match="cannot reach"):
        check_setup(cfg.rollout)
    cfg = FluxConfig(rollout={"engine": "sglang", "sglang_module": "no_such_sglang.launch_server"}).validate()
    with pytest.raises(SGLangError, match=r"`no_such_sglang` package is not installed \(pip install"):
        check_setup(cfg.rollout)


def test_config_checks_the_sglang_keys():
    ok = FluxConfig(rollout={"engine": "sglang", "num_generators": 2,
                             "sglang_url": "http://a:1, http://b:2", "sglang_pause_mode": "in_place"})
    ok.validate()
    for bad in ({"sglang_url": "http://a:1,http://b:2"}, {"sglang_url": "a:1"}, {"sglang_pause_mode": "later"},
                {"sglang_weight_sync": "disk"}, {"sglang_bucket_mb": 0}, {"sglang_port": 70000},
                {"sglang_group_backend": "mpi"}):
        with pytest.raises(ConfigError, match=f"rollout.{next(iter(bad))}"):
            FluxConfig(rollout={"engine": "sglang", **bad}).validate()


# ---- weight buckets -----------------------------------------------------------------------------

def test_buckets_hold_one_dtype_under_the_cap_in_order():
    state = state_dict()
    groups = buckets(state, max_bytes=300)
    assert sorted(n for g in groups for n, _ in g) == sorted(state)
    for g in groups:
        assert len({t.dtype for _, t in g}) == 1
        assert len(g) == 1 or sum(t.numel() * t.element_size() for _, t in g) <= 300
    order = [n for g in groups for n, _ in g if state[n].dtype == torch.float32]
    assert order == [n for n, t in state.items() if t.dtype == torch.float32]
    assert len(buckets(state, max_bytes=1 << 30)) == 3  # float32, bfloat16, int64


def pickled_modules(payload: str) -> list[str]:
    seen = []

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            seen.append((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(base64.b64decode(payload))).load()
    assert all(g in ALLOWED_GLOBALS or g == ("torch.storage", "_load_from_bytes") for g in seen), seen
    return [m for m, _ in seen]


def test_a_serialized_bucket_decodes_like_sglang_decodes_it():
    for bucket in buckets(state_dict(), max_bytes=1 << 20):
        flat, metadata = flatten(bucket)
        payload = serialize(flat, metadata)
        # only modules SGLang's restricted unpickler admits: no sglang class, nothing of flux
        assert {m.split(".")[0] for m in pickled_modules(payload)} <= {"torch", "types", "collections", "builtins"}
        decoded = decode_named_tensors(payload, "flattened_bucket")
        assert [n for n, _ in decoded] == [n for n, _ in bucket]
        for (_, got), (_, want) in zip(decoded, bucket):
            assert got.dtype == want.dtype and torch.equal(got, want)
    with pytest.raises(ValueError, match="one dtype"):
        flatten([("a", torch.zeros(2)), ("b", torch.zeros(2, dtype=torch.int64))])


def test_a_bucket_is_uint8_bytes_at_byte_offsets_like_flattenedtensorbucket():
    bucket = [("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)), ("b", torch.tensor([7.0, 8.0]))]
    flat, metadata = flatten(bucket)
    assert flat.dtype == torch.uint8 and flat.numel() == 8 * 4
    assert [(m.start_idx, m.end_idx, m.numel) for m in metadata] == [(0, 24, 24), (24, 32, 8)]
    assert all(torch.equal(got, want) for (_, got), (_, want) in zip(unflatten(flat, metadata), bucket))


def test_every_tp_rank_gets_its_own_serialization(monkeypatch):
    import flux.integrations.sglang.weights as W

    made = []
    monkeypatch.setattr(W, "serialize", lambda flat, meta: made.append(1) or f"payload-{len(made)}")
    (body, _), = W.tensor_requests({"w": torch.ones(2)}, 1, max_bytes=1 << 20, tp_size=3)
    assert body["serialized_named_tensors"] == ["payload-1", "payload-2", "payload-3"]


def test_a_cpu_tensor_keeps_its_reduction_only_a_cuda_one_names_its_gpu_by_uuid(monkeypatch):
    from torch.multiprocessing import reductions

    from flux.integrations.sglang.weights import _CUDA_DEVICE_ARG, _reduce_cuda_tensor_by_uuid

    t = torch.ones(3)
    (rebuild, args), (want_rebuild, want_args) = _reduce_cuda_tensor_by_uuid(t), reductions.reduce_tensor(t)
    assert rebuild is want_rebuild and len(args) == len(want_args) == 3  # no device argument to touch

    class FakeCuda(torch.Tensor):
        is_cuda = True

    fake = torch.ones(2).as_subclass(FakeCuda)
    args = tuple(range(_CUDA_DEVICE_ARG)) + (1, "handle")
    monkeypatch.setattr(reductions, "reduce_tensor", lambda tensor: ("rebuild", args))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: type("P", (), {"uuid": f"GPU-uuid-of-{i}"})())
    rebuild, out = _reduce_cuda_tensor_by_uuid(fake)
    assert rebuild == "rebuild" and out[_CUDA_DEVICE_ARG] == "GPU-uuid-of-1" and out[-1] == "handle"


def test_requests_carry_the_version_once_and_a_payload_per_tp_rank():
    bodies = list(tensor_requests(state_dict(), 7, max_bytes=256, tp_size=2))
    assert [b.get("weight_version") for b, _ in bodies] == [None] * (len(bodies) - 1) + ["7"]
    assert all(len(b["serialized_named_tensors"]) == 2 and b["flush_cache"] is False for b, _ in bodies)
    body = distributed_request(buckets(state_dict(), 1 << 20)[1], group_name="g")
    assert body["dtypes"] == ["bfloat16", "bfloat16"] and body["shapes"] == [[16, 8], [8]]
    assert body["load_format"] == "flattened_bucket" and body["group_name"] == "g"


def test_versions_come_from_spans_then_the_label_then_the_engine(mock):
    _, url = mock
    engine = engine_for(url)
    spans = {"weight_versions": [{"version": "3", "start": 0, "end": 2}, ["4", 2, 5]], "weight_version": "4"}
    assert engine._token_versions(spans, 5, 0).tolist() == [3, 3, 4, 4, 4]
    assert engine._token_versions({"weight_version": "2"}, 3, 0).tolist() == [2, 2, 2]
    assert engine._token_versions({"weight_version": "default"}, 2, 9).tolist() == [0, 0]
    assert engine._token_versions({}, 2, 9).tolist() == [9, 9]
    with pytest.raises(SGLangError, match="do not cover"):
        engine._token_versions({"weight_versions": [{"version": "1", "start": 0, "end": 2}]}, 3, 0)
    engine.close()


# ---- a server in its own process: launch, stop, distributed weights -------------------------------

@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    log_path = tmp_path_factory.mktemp("sglang") / "server.log"
    server = SGLangServer("mock-model", port=free_port(), module="tests.sglang_mock",
                          args=["--vocab-size", VOCAB], log_path=log_path)
    url = server.start(timeout_s=60)
    yield server, url
    server.stop()


def test_a_started_server_serves_and_stops_with_its_engine(launched):
    server, url = launched
    engine = SGLangEngine(url, weight_sync="distributed", group_backend="gloo", server=None)
    c = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=4))[0]
    assert c.token_ids.tolist() == predicted(PROMPTS[0], c.token_ids, [0] * 4, {0: 0})
    # weights by broadcast over a gloo group the server joined: the tokens prove every byte arrived
    state = state_dict(2)
    engine.load_weights(1, state)
    assert engine.apply_pending()
    c = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=4))[0]
    assert (c.versions == 1).all()
    assert c.token_ids.tolist() == predicted(PROMPTS[2], c.token_ids, c.versions, {1: weights_digest(state)})
    engine.close()
    # the group was destroyed on both ends: a second engine (another run reusing the server) joins anew
    again = SGLangEngine(url, version=1, weight_sync="distributed", group_backend="gloo", server=None)
    again.load_weights(2, state_dict(3))
    assert again.apply_pending()
    again.close()
    assert server.proc.poll() is None  # an engine stops only a server it owns
    owned = SGLangEngine(url, server=server)
    owned.close()
    assert server.proc.wait(10) is not None
    with pytest.raises(SGLangError):
        SGLangClient(url).call("/health")


def test_an_owned_server_that_dies_is_restarted_at_the_base_version(tmp_path):
    server = SGLangServer("mock-model", port=free_port(), module="tests.sglang_mock",
                          args=["--vocab-size", VOCAB], log_path=tmp_path / "server.log")
    engine = SGLangEngine(server.start(timeout_s=60), server=server, restarts=1, startup_timeout_s=60)
    engine.load_weights(1, state_dict())
    assert engine.apply_pending() and engine.version == 1
    os.killpg(server.proc.pid, signal.SIGKILL)  # the server dies (an OOM, a crashed scheduler)
    server.proc.wait(10)
    with pytest.raises(SGLangServerGone, match="cannot reach the SGLang server"):
        engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))
    assert engine.recover() and engine.version == 0 and engine.restarts == 1
    c = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=3))[0]
    assert (c.versions == 0).all() and c.token_ids.tolist() == predicted(PROMPTS[0], c.token_ids, [0] * 3, {0: 0})
    engine.load_weights(1, state_dict())  # the caller queues the newest weights again
    assert engine.apply_pending() and engine.version == 1
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    assert not engine.recover()  # no restart left
    engine.close()


def test_a_server_that_dies_while_starting_says_why(tmp_path):
    log_path = tmp_path / "server.log"
    # any module that exits at once stands in for a server that fails (json.tool rejects the flags)
    server = SGLangServer("m", module="json.tool", log_path=log_path)
    with pytest.raises(SGLangError, match=r"exited with code 2 while starting: .*json.tool: error"):
        server.start(timeout_s=60)
    server.stop()


def test_the_http_path_needs_neither_sglang_nor_torch_to_import():
    code = ("import sys, flux.integrations.sglang.engine; "
            "assert not {'sglang', 'torch', 'requests'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)
