"""Data-parallel learner ranks (flux/integrations/distributed/data_parallel.py) against one process, on the same batches.

The ranks are real processes (this file run as a script) in a gloo group on 127.0.0.1, driven through the
learner actor's own `Trainer.train` — advantages, proximal/reference log-probs, critic values, the policy
and critic steps — for GRPO with a KL term (reference model), PPO (critic, GAE, whitening) and DPO
(preference pairs). Rows have very different lengths, so the ranks' token shares are uneven.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ALGORITHMS = {"grpo": {"kl_coef": 0.05}, "ppo": {}, "dpo": {}}
STEPS = 3


# ---- the worker: one rank ------------------------------------------------------------------------
def make_work(step: int, groups: int = 3, n: int = 4):
    """A fixed batch: `groups` groups of `n` samples, lengths from 1 to 19 response tokens."""
    from flux.learner.torch_learner import TrainBatch

    g = torch.Generator().manual_seed(100 + step)
    samples, rewards, lengths = [], [], []
    for _ in range(groups):
        n_resp = torch.randint(1, 20, (n,), generator=g).tolist()
        prompt = torch.randint(1, 48, (int(torch.randint(2, 6, (1,), generator=g)),), generator=g)
        for k in n_resp:
            samples.append((prompt, torch.randint(1, 48, (k,), generator=g), -2 * torch.rand(k, generator=g),
                            torch.zeros(k, dtype=torch.long), 0.0))
        rewards.append(torch.randperm(n, generator=g).float() / n)  # distinct: every group makes a DPO pair
        lengths.append(torch.tensor(n_resp))
    return TrainBatch.from_samples(samples, pad_id=0), rewards, lengths


def worker(rank: int, world: int, port: int, model_dir: str, out: str, mode: str) -> None:
    """Train every algorithm for STEPS steps; write per-step stats and the final weights.

    One process runs each algorithm twice: on the whole batch at once (`name`), and accumulating over
    the very micro-batches that two ranks would take (`name/split`): for a loss that is not a token mean
    (DPO's is a mean over pairs) only the latter is the exact single-process twin of two ranks.
    """
    import actors.learner as actor
    from flux.config import FluxConfig
    from flux.integrations.distributed.data_parallel import RankGroup
    from flux.run.runtime import RunSpec, set_threads

    set_threads(1)
    ranks = RankGroup.join(rank, world, "127.0.0.1", port, timeout_s=4 if mode == "hang" else 60)
    listening = [c.laddr.ip for c in psutil.Process().net_connections() if c.status == psutil.CONN_LISTEN]
    two_ranks_parts = actor.micro_batches
    variants = [(name, algo, 2) for name, algo in ALGORITHMS.items()]
    if world == 1:
        variants = [(name, algo, 0) for name, algo in ALGORITHMS.items()] + [
            (f"{name}/split", algo, 2) for name, algo in ALGORITHMS.items()]
    report = {}
    for name, algo, micro_batch_size in variants:
        if name.endswith("/split"):
            actor.micro_batches = lambda tb, size, pairs=False, rank=0, ranks=1, tokens=0: [
                p for r in range(2) for p in two_ranks_parts(tb, size, pairs, r, 2)]
        cfg = FluxConfig(algorithm=name.split("/")[0], algo=algo, max_steps=STEPS, seed=0,
                         learner={"lr": 3e-3, "micro_batch_size": micro_batch_size, "ranks": world})
        trainer = actor.Trainer(RunSpec("dp", out, model_dir, "", "", "", "", 0, cfg), ranks)
        rows = []
        for step in range(STEPS):
            if mode == "die" and rank == 1 and step == 1:
                os._exit(3)
            if mode == "hang" and rank == 1 and step == 1:
                time.sleep(600)
            work = ranks.broadcast(make_work(step) if rank == 0 else None)
            tb, stats = trainer.train(step, *work)
            # (the step's timings differ from rank to rank: they are not what the ranks must agree on)
            rows.append({**{k: v for k, v in stats.items() if not k.startswith("time_")},
                         "proximal_sum": float(tb.proximal_logprobs.sum())})
        report[name] = rows
        weights = {f"policy.{k}": v for k, v in trainer.learner.model.state_dict().items()}
        if trainer.critic is not None:
            weights.update({f"critic.{k}": v for k, v in trainer.critic.model.state_dict().items()})
        torch.save(weights, f"{out}/{name.replace('/', '-')}-{world}-{rank}.pt")
    if rank == 0:
        ranks.broadcast(None)  # stop: the other ranks' next broadcast returns None
    else:
        assert ranks.broadcast(None) is None
    ranks.close()
    Path(f"{out}/stats-{world}-{rank}.json").write_text(json.dumps(report))
    Path(f"{out}/listening-{world}-{rank}.json").write_text(json.dumps(listening))


# ---- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=48, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny")
    transformers.Qwen2ForCausalLM(cfg).save_pretrained(path, safe_serialization=True)
    return str(path)


def spawn(world: int, model_dir: str, out: Path, mode: str = "train") -> list[subprocess.Popen]:
    from flux.run.runtime import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return [subprocess.Popen([sys.executable, __file__, str(r), str(world), str(port), model_dir, str(out), mode],
                             env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
            for r in range(world)]


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[tuple[int | None, str]]:
    """Exit codes (None: still running at the deadline, then killed) and stderr; no process outlives this."""
    end = time.monotonic() + timeout
    results = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(0.1, end - time.monotonic()))
            results.append((p.returncode, err))
        except subprocess.TimeoutExpired:
            results.append((None, ""))
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return results


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("dp")
    procs = spawn(1, model_dir, out) + spawn(2, model_dir, out)  # concurrently: three processes
    results = wait_all(procs, 300)
    for code, err in results:
        assert code == 0, err[-3000:]
    return out


# Losses within 1e-5; gradient norms within 1e-4 (relative): the sum over ranks adds the micro-batch
# gradients in another order, and AdamW turns the rounding of a nearly cancelling gradient element into
# a visible (up to ~lr/10) change of that one weight, which the next step's gradients then carry.
TOLERANCE = {"loss": (1e-5, 0), "critic_loss": (1e-5, 0), "proximal_sum": (0, 1e-5),
             "grad_norm": (0, 1e-4), "critic_grad_norm": (0, 1e-4)}


def assert_same_steps(one: list[dict], two: list[dict], what: str, keys=tuple(TOLERANCE)) -> None:
    for step, (a, b) in enumerate(zip(one, two, strict=True)):
        assert a["step_skipped"] == b["step_skipped"] == 0.0
        for key in keys:
            if key in a:
                abs_tol, rel_tol = TOLERANCE[key]
                assert b[key] == pytest.approx(a[key], abs=abs_tol, rel=rel_tol), (what, step, key, a[key], b[key])


def test_two_ranks_take_the_one_process_steps(runs):
    one = json.loads((runs / "stats-1-0.json").read_text())
    two = json.loads((runs / "stats-2-0.json").read_text())
    assert two == json.loads((runs / "stats-2-1.json").read_text())     # every rank reports the same numbers
    for name in ALGORITHMS:
        assert_same_steps(one[f"{name}/split"], two[name], f"{name}: same micro-batches in one process")
    for name in ("grpo", "ppo"):  # token-mean losses: any split of the batch is the whole-batch step
        assert_same_steps(one[name], two[name], f"{name}: whole batch in one process")
    # DPO averages over pairs, and micro-batches are weighted by tokens, in one process as on two ranks;
    # at the first step (policy = reference) every pair's loss is log 2 whatever the weights.
    assert_same_steps(one["dpo"][:1], two["dpo"][:1], "dpo step 0", keys=("loss", "proximal_sum"))


def test_the_group_listens_on_loopback_only(runs):
    listening = [json.loads((runs / f"listening-2-{r}.json").read_text()) for r in range(2)]
    assert listening[0] and set(listening[0] + listening[1]) == {"127.0.0.1"}   # store (rank 0) and gloo


def test_replicas_stay_identical_and_equal_the_one_process_weights(runs, model_dir):
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    for name, reference in [("grpo", "grpo"), ("ppo", "ppo"), ("dpo", "dpo-split")]:
        one = torch.load(runs / f"{reference}-1-0.pt")
        r0, r1 = torch.load(runs / f"{name}-2-0.pt"), torch.load(runs / f"{name}-2-1.pt")
        assert one.keys() == r0.keys() == r1.keys()
        for k in one:
            assert torch.equal(r0[k], r1[k]), (name, k)                  # bit-identical replicas
            diff = (r0[k] - one[k]).abs()
            assert diff.max() < 3e-4 and diff.mean() < 1e-6, (name, k, diff.max(), diff.mean())  # lr = 3e-3
        assert not torch.equal(r0["policy.model.embed_tokens.weight"], initial["model.embed_tokens.weight"])


@pytest.mark.parametrize("mode", ["die", "hang"])
def test_a_dead_or_hung_rank_fails_the_others_instead_of_hanging(model_dir, tmp_path, mode):
    """Rank 1 exits (or stops answering) at step 1; rank 0 fails fast (dead peer) or at the timeout (4 s)."""
    procs = spawn(2, model_dir, tmp_path, mode)
    t0 = time.monotonic()
    [(code0, err0)] = wait_all(procs[:1], 120)
    took = time.monotonic() - t0
    wait_all(procs[1:], 0.1)
    assert code0 not in (0, None), err0[-2000:]
    assert ("by peer" if mode == "die" else "Timed out") in err0, err0[-2000:]   # closed or reset
    assert took < 60, took
    assert all(p.poll() is not None for p in procs)


def test_rank_rows_are_balanced_by_tokens_and_keep_pairs_together():
    from actors.learner import micro_batches
    from flux.integrations.distributed.data_parallel import RankGroup

    tb = make_work(0, groups=4, n=4)[0]
    lengths = tb.attention_mask.sum(-1)
    for pairs in (False, True):
        shards = [micro_batches(tb, 2, pairs=pairs, rank=r, ranks=3) for r in range(3)]
        rows = sorted(int(i) for parts in shards for p in parts for i in p)
        assert rows == list(range(len(tb)))                                  # every row exactly once
        tokens = [sum(int(lengths[p].sum()) for p in parts) for parts in shards]
        assert max(tokens) - min(tokens) <= 2 * int(lengths.max())
        if pairs:
            assert all(len(p) % 2 == 0 and all(int(p[i]) // 2 == int(p[i + 1]) // 2 for i in range(0, len(p), 2))
                       for parts in shards for p in parts)
    # more ranks than rows: the extra ranks get nothing, and say so
    assert micro_batches(tb.select(torch.arange(2)), 0, rank=2, ranks=3) == []
    assert RankGroup().rows([5, 1, 3]) == [0, 1, 2]


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    rank_, world_, port_, model_dir_, out_, mode_ = sys.argv[1:7]
    worker(int(rank_), int(world_), int(port_), model_dir_, out_, mode_)
