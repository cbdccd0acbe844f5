"""bench/algorithms.py: its pure parts (summary, table) on synthetic metrics rows."""

import importlib.util
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "algorithms.py"


def load():
    spec = importlib.util.spec_from_file_location("bench_algorithms", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def rows(n, pref=False):
    out = []
    for i in range(n):
        r = {"reward_mean": i / n, "samples": 128, "eval_score": 0.5 if i < n - 1 else 0.9,
             "samples_per_s": 500.0, "wall_s": float(i), "staleness_mean": 0.1}
        if pref:
            r["pref_acc"] = 0.5 + 0.5 * i / n
        out.append(r)
    return out


def test_summary_uses_first_five_and_last_tenth():
    bench = load()
    s = bench.summarize(rows(20))
    assert s["steps"] == 20 and s["samples"] == 2560
    assert s["reward_first"] == sum(i / 20 for i in range(5)) / 5
    assert s["reward_last"] == (18 / 20 + 19 / 20) / 2
    assert (s["eval_before"], s["eval_after"]) == (0.5, 0.9)
    assert "pref_acc_last" not in s
    assert bench.summarize(rows(20, pref=True))["pref_acc_last"] == (0.5 + 0.5 * 18 / 20 + 0.5 + 0.5 * 19 / 20) / 2


def test_every_algorithm_gets_the_same_samples_and_the_table_lists_failures():
    bench = load()
    # same samples: steps × samples-per-step is the budget for every run
    assert {per_step for _, per_step in bench.RUNS.values()} == {128, 16}
    assert set(bench.RUNS) >= {"grpo", "ppo", "dpo", "reinforce", "reinforce_pp", "dapo", "rloo"}
    table = bench.format_table({"grpo": bench.summarize(rows(10)), "ppo": {"error": "boom"}})
    assert "grpo" in table and "ppo" in table and "failed: boom" in table
