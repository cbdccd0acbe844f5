"""FSDP2 learner ranks (`learner.sharding: fsdp`, flux/integrations/distributed/fsdp.py) against one process.

Two real processes in a gloo group on 127.0.0.1 (this file run as a script) drive the learner actor's own
`Trainer.train` for GRPO with a KL term (the reference model is sharded too), PPO (a sharded critic) and
DPO, on batches whose rows differ in length, so the ranks' token shares and numbers of micro-batches
differ (the lockstep padding is exercised: the worker records when they did). Each run then saves a
checkpoint (HF layout + full AdamW state, written by rank 0), a fresh learner loads it and takes one more
step: it must be the one-process run's next step, so the optimizer state survived the round trip.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.test_data_parallel import assert_same_steps, make_work, model_dir, wait_all  # noqa: E402, F401

ALGORITHMS = {"grpo": {"kl_coef": 0.05}, "ppo": {}, "dpo": {}}
STEPS = 3


def worker(rank: int, world: int, port: int, model_dir: str, out: str, device: str = "cpu") -> None:
    import actors.learner as actor
    from flux.config import FluxConfig
    from flux.integrations.distributed.data_parallel import RankGroup
    from flux.run.runtime import RunSpec, set_threads

    set_threads(1)
    ranks = RankGroup.join(rank, world, "127.0.0.1", port, timeout_s=60,
                           device="cpu" if device == "cpu" else f"cuda:{rank}")  # (NCCL on GPUs)
    two_ranks_parts = actor.micro_batches
    counts = []
    if world == 2:  # record how many micro-batches each rank was handed (before the lockstep padding)
        def counted(tb, size, pairs=False, rank=0, ranks=1, tokens=0):
            parts = two_ranks_parts(tb, size, pairs, rank, ranks, tokens)
            counts.append(len(parts))
            return parts
        actor.micro_batches = counted
    variants = [(name, algo) for name, algo in ALGORITHMS.items()]
    if world == 2:  # FSDP's mixed precision: bf16 all-gathers and compute, fp32 reduction and master weights
        variants.append(("grpo/bf16", ALGORITHMS["grpo"]))
    if world == 1:
        variants += [(f"{name}/split", algo) for name, algo in ALGORITHMS.items()]
    report = {}
    for name, algo in variants:
        if name.endswith("/split"):  # the very micro-batches two ranks take, in one process
            actor.micro_batches = lambda tb, size, pairs=False, rank=0, ranks=1, tokens=0: [
                p for r in range(2) for p in two_ranks_parts(tb, size, pairs, r, 2, tokens)]
        sharding = "fsdp" if world == 2 else "replicate"
        cfg = FluxConfig(algorithm=name.split("/")[0], algo=algo, max_steps=STEPS + 1, seed=0,
                         learner={"lr": 3e-3, "micro_batch_tokens": 48, "ranks": world, "sharding": sharding,
                                  "device": device,
                                  "dtype": "bf16" if name.endswith("/bf16") else "fp32"})
        spec = RunSpec("fsdp", out, model_dir, "", "", "", "", 0, cfg)
        trainer = actor.Trainer(spec, ranks)
        rows = []
        for step in range(STEPS):
            work = ranks.broadcast(make_work(step) if rank == 0 else None)
            tb, stats = trainer.train(step, *work)
            rows.append({**{k: v for k, v in stats.items() if not k.startswith("time_")},
                         "proximal_sum": float(tb.proximal_logprobs.sum())})
        weights = trainer.learner.export_weights()  # collective: every rank calls it
        if rank == 0:
            torch.save(weights, f"{out}/{name.replace('/', '-')}-{world}.pt")
        ckpt = f"{out}/ckpt-{name.replace('/', '-')}-{world}"
        trainer.save(ckpt)
        del trainer
        again = actor.Trainer(spec, ranks)
        again.load(ckpt)
        work = ranks.broadcast(make_work(STEPS) if rank == 0 else None)
        tb, stats = again.train(STEPS, *work)
        rows.append({**{k: v for k, v in stats.items() if not k.startswith("time_")},
                     "proximal_sum": float(tb.proximal_logprobs.sum())})
        report[name] = rows
    if rank == 0:
        ranks.broadcast(None)
    else:
        assert ranks.broadcast(None) is None
    ranks.close()
    Path(f"{out}/stats-{world}-{rank}.json").write_text(json.dumps({"steps": report, "counts": counts}))


# ---- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs (NCCL cannot pair two ranks on one)")])])
def runs(model_dir, tmp_path_factory, request):
    """Both worlds' reports; on two GPUs (`cuda`) the same with NCCL (written for a GPU session: never run yet)."""
    import subprocess

    from flux.run.runtime import free_port

    model = model_dir
    out = tmp_path_factory.mktemp(f"fsdp-{request.param}")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    procs = []
    for world in (1, 2):
        port = free_port()
        procs += [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), str(model), str(out),
                                    request.param],
                                   env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
                  for r in range(world)]
    for code, err in wait_all(procs, 400):
        assert code == 0, err[-3000:]
    return out, model


def test_fsdp_ranks_take_the_one_process_steps_and_resume_exactly(runs):
    out, _ = runs
    one = json.loads((out / "stats-1-0.json").read_text())["steps"]
    two = json.loads((out / "stats-2-0.json").read_text())["steps"]
    assert two == json.loads((out / "stats-2-1.json").read_text())["steps"]  # every rank: the same numbers
    for name in ALGORITHMS:  # the last row is the step after a save and a load on fresh learners
        assert_same_steps(one[f"{name}/split"], two[name], f"{name}: same micro-batches in one process")
    for name in ("grpo", "ppo"):  # token-mean losses: any split is the whole-batch step
        assert_same_steps(one[name], two[name], f"{name}: whole batch in one process")


def test_fsdp_in_bf16_stays_close_to_fp32(runs):
    """Tolerances of tests/test_precision.py (loss within 0.02, gradient norm within 2 %)."""
    out, _ = runs
    two = json.loads((out / "stats-2-0.json").read_text())["steps"]
    for fp32, bf16 in zip(two["grpo"], two["grpo/bf16"], strict=True):
        assert bf16["loss"] == pytest.approx(fp32["loss"], abs=0.02)
        assert bf16["grad_norm"] == pytest.approx(fp32["grad_norm"], rel=0.02)
        assert bf16["proximal_sum"] != fp32["proximal_sum"]  # computed in bf16 indeed


def test_the_ranks_ran_different_numbers_of_micro_batches(runs):
    """Otherwise the lockstep padding was not exercised."""
    out, _ = runs
    counts = [json.loads((out / f"stats-2-{r}.json").read_text())["counts"] for r in range(2)]
    assert len(counts[0]) == len(counts[1]) > 0
    assert any(a != b for a, b in zip(*counts)), counts


def test_gathered_weights_and_the_checkpoint_are_the_one_process_model(runs):
    from transformers import AutoModelForCausalLM

    out, model_dir = runs
    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, reference in [("grpo", "grpo"), ("ppo", "ppo"), ("dpo", "dpo-split")]:
        one = torch.load(out / f"{reference}-1.pt", map_location="cpu")
        two = torch.load(out / f"{name}-2.pt", map_location="cpu")
        assert one.keys() == two.keys()  # HF names, the tied lm_head once
        for k in one:
            diff = (two[k] - one[k]).abs()
            assert diff.max() < 3e-4 and diff.mean() < 1e-6, (name, k, diff.max(), diff.mean())
        assert not torch.equal(two["model.embed_tokens.weight"], initial["model.embed_tokens.weight"])
        saved = AutoModelForCausalLM.from_pretrained(out / f"ckpt-{name}-2").state_dict()
        for k in one:
            assert torch.equal(saved[k], two[k]), (name, k)
        optimizer = torch.load(out / f"ckpt-{name}-2" / "optimizer.pt", weights_only=False)
        assert "model.embed_tokens.weight" in optimizer["state"]  # full, keyed by parameter name
        assert optimizer["state"]["model.embed_tokens.weight"]["exp_avg"].shape == one["model.embed_tokens.weight"].shape
    assert (out / "ckpt-ppo-2" / "critic" / "value_head.pt").is_file()


def test_fsdp_is_a_config_choice_with_its_own_errors():
    from flux.config import ConfigError, FluxConfig

    FluxConfig(learner={"ranks": 2, "sharding": "fsdp"}).validate()
    with pytest.raises(ConfigError, match="learner.sharding"):
        FluxConfig(learner={"ranks": 1, "sharding": "fsdp"}).validate()
    with pytest.raises(ConfigError, match="learner.sharding"):
        FluxConfig(learner={"ranks": 2, "sharding": "zero3"}).validate()


if __name__ == "__main__":
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6])
