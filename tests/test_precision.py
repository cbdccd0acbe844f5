"""Device and precision of the default backends: `learner.device/dtype`, `rollout.device/dtype`.

bf16 is autocast (bf16 matmuls, fp32 master weights, gradients and AdamW state); on CPU it runs through
torch's CPU autocast, so the same code path is checked here that runs on a GPU. Tolerances: bf16 keeps
8 bits of mantissa, about 2-3 significant digits, so per-token log-probs of this tiny model agree with
fp32 to within 0.05 nats and one step's loss and gradient norm to within 2 %.
"""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from flux.algorithms import get_algorithm  # noqa: E402
from flux.config import ConfigError, FluxConfig  # noqa: E402
from flux.engine.base import SamplingParams  # noqa: E402
from flux.engine.torch_engine import TorchEngine  # noqa: E402
from flux.hf import device_and_dtype  # noqa: E402
from flux.learner.torch_learner import TorchLearner, TrainBatch  # noqa: E402
from tests.test_torch_learner import PAD, model_dir, samples  # noqa: E402,F401  (the tiny model fixture)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


def grpo_loss():
    algo = get_algorithm("grpo")
    return algo.bind(algo.params({}))


def one_step(model_dir, device, compute_dtype, **kw):
    learner = TorchLearner(model_dir, lr=1e-2, device=device, compute_dtype=compute_dtype, seed=0, **kw)
    batch = TrainBatch.from_samples(samples(), pad_id=PAD)
    lp = learner.logprobs(batch)
    stats = learner.step(grpo_loss(), batch, fill_proximal=True)
    return learner, lp, stats


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_bf16_autocast_agrees_with_fp32_and_keeps_fp32_master_weights(model_dir, device):
    ref, lp32, s32 = one_step(model_dir, device, torch.float32)
    mixed, lp16, s16 = one_step(model_dir, device, torch.bfloat16)
    mask = TrainBatch.from_samples(samples(), pad_id=PAD).response_mask > 0
    assert lp16.dtype == torch.float32 and (lp16 - lp32)[mask].abs().max() < 0.05
    assert (lp16 != lp32)[mask].any()  # bf16 did run: it is not bit-identical
    assert s16["loss"] == pytest.approx(s32["loss"], abs=2e-2)
    assert s16["grad_norm"] == pytest.approx(s32["grad_norm"], rel=0.02)
    start = TorchLearner(model_dir, device=device).model.state_dict()
    moved = differ = 0.0
    for (name, p), q in zip(mixed.model.named_parameters(), ref.model.parameters()):
        assert p.dtype == torch.float32, name  # master weights
        moved += float((q.detach() - start[name]).pow(2).sum())
        differ += float((p.detach() - q.detach()).pow(2).sum())
    # AdamW's first step moves each weight by about lr * sign(grad): where a tiny gradient's sign differs
    # in bf16 that weight moves the other way, so the two steps are compared as a whole
    print(f"bf16 vs fp32 step: |difference| / |update| = {(differ / moved) ** 0.5:.3f}")
    assert (differ / moved) ** 0.5 < 0.25
    state = next(iter(mixed.optimizer.state.values()))
    assert state["exp_avg"].dtype == torch.float32


def test_gradient_checkpointing_gives_the_same_step(model_dir):
    _, _, plain = one_step(model_dir, "cpu", torch.float32)
    _, _, ckpt = one_step(model_dir, "cpu", torch.float32, gradient_checkpointing=True)
    assert ckpt["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    assert ckpt["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
def test_the_engine_samples_in_bf16(model_dir, device):
    engine = TorchEngine.from_pretrained(model_dir, device=device, dtype=torch.bfloat16, seed=0)
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    outs = engine.generate([[1, 2, 3], [4, 5]], SamplingParams(max_new_tokens=4, temperature=1.0))
    assert all(len(o.token_ids) >= 1 and o.logprobs.dtype.name == "float32" and (o.logprobs <= 0).all()
               for o in outs)


def test_auto_is_cuda_when_present_else_cpu_and_names_resolve():
    cuda = torch.cuda.is_available()
    assert device_and_dtype("auto", "auto") == (("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32))
    assert device_and_dtype("cpu", "bf16") == ("cpu", torch.bfloat16)
    assert device_and_dtype("cuda:1", "auto") == ("cuda:1", torch.bfloat16)
    assert device_and_dtype("cpu", "fp16") == ("cpu", torch.float16)


@pytest.mark.parametrize("key, value, why", [
    ("learner.device", "gpu", "must be auto, cpu, cuda or cuda:N"),
    ("rollout.device", "cuda:x", "must be auto, cpu, cuda or cuda:N"),
    ("learner.dtype", "fp16", "must be auto, bf16 or fp32"),  # no loss scaling: fp16 training is refused
    ("rollout.dtype", "int8", "must be auto, bf16, fp16 or fp32"),
])
def test_bad_devices_and_dtypes_are_config_errors(key, value, why):
    section, field = key.split(".")
    with pytest.raises(ConfigError, match=f"{key}: {why}"):
        FluxConfig(**{section: {field: value}}).validate()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_asking_for_cuda_without_one_is_one_line_before_any_actor(default_model, tmp_path):
    from tests.test_e2e import flux_train

    proc = flux_train("--set", "learner.device=cuda", "--out", str(tmp_path / "run"), timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "flux: error: learner.device=cuda: no CUDA device is visible here (torch.cuda.is_available() is False)"]


@pytest.mark.slow
def test_a_run_trains_in_bf16_on_both_sides(default_model, tmp_path):
    from tests.test_e2e import SMALL, assert_nothing_left, flux_train, metrics

    out = tmp_path / "run"
    proc = flux_train("--max-steps", "3", *SMALL, "--set", "learner.dtype=bf16", "--set", "rollout.dtype=bf16",
                      "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(out)
    assert len(rows) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # the engine's bf16 log-probs against the learner's bf16-autocast ones: a floor above zero at lag 0
    assert rows[-1]["staleness_floor"] >= 0
    assert_nothing_left(out)
