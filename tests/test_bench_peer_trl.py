"""bench/peer_trl.py: the reward adapter, the config mapping, summaries and tables; no TRL needed.

The one test that builds a real `trl.GRPOConfig` is skipped where TRL is not installed (it is an
optional dependency of the bench only).
"""

import importlib.util
from pathlib import Path

import pytest

from flux.config import load_config
from flux.rewards import char_match

BENCH = Path(__file__).resolve().parent.parent / "bench" / "peer_trl.py"
_spec = importlib.util.spec_from_file_location("bench_peer_trl", BENCH)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def rows_of(n: int, rate: float, **extra) -> list[dict]:
    """n per-step rows: reward i/n, 128 samples a step at `rate` samples/s; a cumulative rate 0.9 × that
    (start-up and the last step's evaluation)."""
    return [{"step": i, "reward_mean": i / n, "samples": 128, "wall_s": 3.0 + 128 / rate * i,
             "samples_per_s": 0.9 * rate, **extra} for i in range(n)]


def test_trl_reward_adapts_the_signature_and_rebuilds_the_record():
    seen = []

    def fn(completion, record):
        seen.append(record)
        return char_match(completion, record)

    reward = bench.trl_reward(fn, "char_match")
    assert reward.__name__ == "char_match"
    out = reward(prompts=["sort 381=", "sort 381=", "sort 920="], completions=["138", "183", "029"],
                 completion_ids=[[1], [2], [3]], answer=["138", "138", "029"], task=["sort"] * 3,
                 trainer_state=object(), log_metric=lambda *a: None, log_extra=lambda *a: None)
    assert out == [1.0, pytest.approx(1 / 3), 1.0]
    # the record is the dataset row: prompt + columns, none of TRL's extras
    assert seen[1] == {"prompt": "sort 381=", "answer": "138", "task": "sort"}
    # a conversational completion is scored on its last message
    chat = [[{"role": "assistant", "content": "012"}]]
    assert reward(prompts=["p"], completions=chat, answer=["012"]) == [1.0]
    assert bench.trl_reward(char_match).__name__ == "char_match"


def test_trl_config_follows_the_flux_config():
    kw = bench.trl_config_kwargs(load_config(None, []), steps=60, seed=3, out_dir="x")
    assert (kw["num_generations"], kw["max_completion_length"], kw["temperature"]) == (16, 8, 1.0)
    assert kw["per_device_train_batch_size"] == 128 and kw["gradient_accumulation_steps"] == 1
    assert (kw["steps_per_generation"], kw["num_iterations"], kw["max_steps"], kw["seed"]) == (1, 1, 60, 3)
    assert (kw["learning_rate"], kw["max_grad_norm"], kw["weight_decay"]) == (1e-3, 1.0, 0.0)
    assert kw["adam_beta2"] == 0.99 and kw["lr_scheduler_type"] == "cosine_with_min_lr"
    assert kw["lr_scheduler_kwargs"] == {"min_lr_rate": 0.1}
    assert (kw["beta"], kw["epsilon"], kw["epsilon_high"], kw["loss_type"]) == (0.0, 0.2, 0.2, "dapo")
    assert kw["scale_rewards"] == "group"
    assert kw["use_cpu"] and not kw["bf16"] and not kw["gradient_checkpointing"] and kw["report_to"] == "none"

    sets = ["rollout.group_size=8", "learner.lr_schedule=constant", "algo={kl_coef: 0.01, scale_std: false}"]
    kw = bench.trl_config_kwargs(load_config(None, sets), steps=5, seed=0, out_dir="x")
    assert (kw["num_generations"], kw["per_device_train_batch_size"]) == (8, 64)
    assert (kw["lr_scheduler_type"], kw["beta"], kw["scale_rewards"]) == ("constant", 0.01, "none")
    with pytest.raises(ValueError, match="GRPO only"):
        bench.trl_config_kwargs(load_config(None, ["algorithm=rloo"]), steps=5, seed=0, out_dir="x")


def test_summary_table_and_ratio_against_trl():
    trl = bench.summarize(rows_of(20, 100.0, step_s=0.8, generate_s=0.3), process_s=30.0,
                          evals={"eval_before": 0.54, "eval_after": 0.7})
    assert trl["steps"] == 20 and trl["samples"] == 2560 and trl["wall_s"] == pytest.approx(3.0 + 1.28 * 19)
    assert trl["samples_per_s"] == pytest.approx(100.0)
    assert trl["cumulative_samples_per_s"] == pytest.approx(90.0)
    assert trl["reward_first"] == pytest.approx(sum(i / 20 for i in range(5)) / 5)
    assert trl["reward_last"] == pytest.approx((18 / 20 + 19 / 20) / 2)
    assert (trl["eval_before"], trl["eval_after"]) == (0.54, 0.7)
    assert trl["step_s_mean"] == pytest.approx(0.8) and trl["generate_s_mean"] == pytest.approx(0.3)

    flux_rows = rows_of(20, 250.0, step_s=0.2, batch_wait_s=0.1)
    flux_rows[0]["eval_score"], flux_rows[-1]["eval_score"] = 0.54, 0.9
    flux = bench.summarize(flux_rows)
    assert (flux["eval_before"], flux["eval_after"], flux["process_s"]) == (0.54, 0.9, None)
    assert "generate_s_mean" not in flux

    summaries = {"trl": trl, "flux-sync": flux}
    assert bench.ratios(summaries) == {"trl": 1.0, "flux-sync": pytest.approx(2.5)}
    assert bench.ratios({"flux-sync": flux}) == {}
    table = bench.format_table(summaries, {"flux-adaptive": "boom"})
    lines = table.splitlines()
    assert len(lines) == 4 and "× TRL" in lines[0] and "range" in lines[0]
    assert lines[1].startswith("trl") and "1.00" in lines[1] and "0.540 → 0.700" in lines[1]
    assert lines[2].startswith("flux-sync") and "2.50" in lines[2] and "250.0" in lines[2]
    assert "225.0" in lines[2]                                        # the cumulative rate
    assert lines[3] == f"{'flux-adaptive':<14} failed: boom"
    md = bench.markdown_table(summaries).splitlines()
    assert md[0].startswith("| system |") and len(md) == 4 and "| 2.50 | 225.0 |" in md[3]
    # several TRL runs (one per thread count): the ratio is over the fastest, the peer at its best
    slow = {**trl, "samples_per_s": 50.0}
    assert bench.ratios({"trl-1t": slow, "trl-2t": trl, "flux-sync": flux})["flux-sync"] == pytest.approx(2.5)
    # no eval, no TRL: dashes, not crashes
    bare = bench.summarize(rows_of(3, 10.0))
    assert "- → -" in bench.format_table({"flux-sync": bare})


def test_repeats_combine_to_medians_with_the_spread_shown():
    reps = []
    for rate, wall, reward in ((300.0, 60.0, 0.7), (600.0, 30.0, 0.8), (500.0, 40.0, 0.9)):
        s = bench.summarize(rows_of(10, rate, step_s=wall / 100))
        s.update(wall_s=wall, reward_last=reward, cpu_s=20.0, load_1m_before=rate / 100)
        reps.append(s)
    c = bench.combine(reps)
    assert (c["samples_per_s"], c["wall_s"]) == (pytest.approx(500.0), 40.0)
    assert c["step_s_mean"] == pytest.approx(0.4) and c["reward_last"] == pytest.approx(0.8)
    assert c["samples_per_s_all"] == pytest.approx([300.0, 600.0, 500.0])
    assert (c["steps"], c["samples"], c["eval_before"], c["process_s"]) == (10, 1280, None, None)
    assert "300–600" in bench.format_table({"trl": c})
    assert "| 300–600 |" in bench.markdown_table({"trl": c})
    assert bench.combine(reps[:1])["samples_per_s_all"] == [pytest.approx(300.0)]
    assert "300–" not in bench.format_table({"trl": bench.combine(reps[:1])})


def test_runs_in_order_one_trl_run_per_thread_count():
    assert bench.plan(["trl", "flux-sync", "flux-adaptive"], [2]) == [
        ("trl", 2), ("flux-sync", 0), ("flux-adaptive", 0)]
    assert bench.plan(["flux-sync", "trl"], [1, 2]) == [("flux-sync", 0), ("trl-1t", 1), ("trl-2t", 2)]


def test_trl_accepts_the_config():
    pytest.importorskip("trl")
    kw = bench.trl_config_kwargs(load_config(None, []), steps=2, seed=0, out_dir="unused")
    args = bench.grpo_config(kw)
    assert args.generation_batch_size == 128 and args.num_generations == 16
    assert args.steps_per_generation == 1 and args.beta == 0.0 and args.loss_type == "dapo"
    assert not args.gradient_checkpointing and args.report_to in ([], "none", ["none"])


def test_the_long_tail_workload_is_async_modes_own_and_maps_to_trl():
    sets, _ = bench.WORKLOADS["longtail"]
    cfg = load_config(None, sets)
    assert cfg.prompts == "builtin:repeat"
    kw = bench.trl_config_kwargs(cfg, steps=10, seed=0, out_dir="x")
    assert kw["max_completion_length"] == 64 and kw["per_device_train_batch_size"] == cfg.batch_samples
