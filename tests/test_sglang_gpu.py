"""The SGLang backend against a real SGLang server on a GPU (marked `gpu`; skipped without CUDA or sglang).

The embedded tiny model is served by `python -m sglang.launch_server`; generation before and after new
weights is compared with the built-in engine on the same weights (greedy, float32), so the test shows
that the weights reached the server (CUDA IPC buckets, or an NCCL broadcast with two GPUs) and that the
next generation reflects them, with the new version on every token.
"""

import importlib.util
import threading

import numpy as np
import pytest
import torch

from flux.engine.base import SamplingParams
from flux.integrations.sglang.engine import SGLangEngine, SGLangServer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang (pip install flux-rlhf[sglang])"),
]
# float32 and a plain attention backend, so the server and the built-in engine agree token for token;
# no tokenizer in the server (Flux sends and reads token ids only).
SERVER_ARGS = ["--dtype", "float32", "--attention-backend", "torch_native", "--disable-cuda-graph",
               "--skip-tokenizer-init", "--mem-fraction-static", "0.2", "--skip-server-warmup"]
GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0)


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    srv = SGLangServer(default_model, args=SERVER_ARGS, log_path=tmp_path_factory.mktemp("sglang") / "server.log")
    srv.start(timeout_s=600)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def reference(default_model):
    from flux.engine.torch_engine import TorchEngine

    return TorchEngine.from_pretrained(default_model, device="cuda", dtype=torch.float32, seed=0)


def prompts(default_model) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(default_model)
    return [tok(text).input_ids for text in ("sort 381=", "sort 92=", "sort 4071=")]


def perturbed(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """New weights on the GPU; named_parameters lists a tied lm_head once, as the learner exports it."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    return {n: (p.detach() + 0.3 * torch.randn(p.shape, generator=g, device=p.device, dtype=p.dtype)).contiguous()
            for n, p in model.named_parameters()}


def same_greedy(outs, refs) -> None:
    for o, r in zip(outs, refs):
        assert o.token_ids.tolist() == r.token_ids.tolist()
        np.testing.assert_allclose(o.logprobs, r.logprobs, atol=2e-3)


def test_generation_reflects_weights_sent_by_cuda_ipc(server, reference, default_model):
    engine = SGLangEngine(server.url, weight_sync="tensor", bucket_bytes=1 << 20)  # several buckets
    ps = prompts(default_model)
    before = engine.generate(ps, GREEDY)
    same_greedy(before, reference.generate(ps, GREEDY))
    assert all((c.versions == 0).all() for c in before)

    state = perturbed(reference.model, seed=1)
    engine.load_weights(1, state)
    assert engine.apply_pending() and engine.version == 1
    reference.load_weights(1, state)
    reference.apply_pending()
    after = engine.generate(ps, GREEDY)
    assert all((c.versions == 1).all() for c in after)
    assert any(a.token_ids.tolist() != b.token_ids.tolist() for a, b in zip(after, before))
    same_greedy(after, reference.generate(ps, GREEDY))
    engine.close()


@pytest.mark.parametrize("mode", ["abort", "retract", "in_place"])
def test_an_update_during_generation_keeps_every_token_labelled(server, reference, default_model, mode):
    """Weights queued while requests run are applied through /pause_generation (each mode) and
    /continue_generation; tokens carry the old version, then the new one, never going back."""
    engine = SGLangEngine(server.url, pause_mode=mode)
    old, new = engine.version, engine.version + 1
    state = perturbed(reference.model, seed=10 + len(mode))
    timer = threading.Timer(0.02, engine.load_weights, args=(new, state))
    timer.start()
    outs = engine.generate(prompts(default_model) * 16, SamplingParams(max_new_tokens=48, temperature=1.0))
    timer.join()
    engine.apply_pending()  # in case the call ended before the update landed
    assert engine.version == new
    for c in outs:
        assert set(c.versions.tolist()) <= {old, new} and (np.diff(c.versions) >= 0).all()
    engine.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL needs the sender and the server on two GPUs")
def test_generation_reflects_weights_sent_by_nccl_broadcast(default_model, reference, tmp_path):
    torch.cuda.set_device(1)  # this process is rank 0 of the weight-update group, the server uses GPU 0
    srv = SGLangServer(default_model, args=[*SERVER_ARGS, "--base-gpu-id", "0"], log_path=tmp_path / "server.log")
    engine = SGLangEngine(srv.start(timeout_s=600), weight_sync="distributed", group_backend="nccl", server=srv)
    state = {n: t.to("cuda:1") for n, t in perturbed(reference.model, seed=2).items()}
    engine.load_weights(1, state)
    assert engine.apply_pending()
    reference.load_weights(reference.version + 1, state)
    reference.apply_pending()
    ps = prompts(default_model)
    same_greedy(engine.generate(ps, GREEDY), reference.generate(ps, GREEDY))
    engine.close()
