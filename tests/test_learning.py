"""Every algorithm learns through `flux train` on the built-in task; so does one registered outside Flux.

Short sync runs (80 steps × 64 samples, ~20 s each on 2 cores): the mean reward of the last 8 steps must
beat that of the first 5 by a clear margin. The margins seen when these tests were written: +0.15 to
+0.3; the bar is +0.08, far above the step-to-step noise of a 64-sample mean over 8 steps (~0.02).
DPO learns from the built-in preference pairs (right vs wrong sort answers): its preference accuracy on
the pairs of each new batch (not seen before in the run) must rise from 0.5 to ≥ 0.8.
"""

import shutil
from pathlib import Path

import pytest

from tests.test_e2e import assert_nothing_left, flux_train, metrics

SHORT = ["--set", "learner.groups_per_step=4", "--set", "adaptive_async.mode=sync",
         "--set", "eval.num_prompts=20"]
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def reward_rise(rows: list[dict]) -> tuple[float, float]:
    first = sum(r["reward_mean"] for r in rows[:5]) / 5
    last = sum(r["reward_mean"] for r in rows[-8:]) / 8
    return first, last


@pytest.mark.parametrize("algorithm", ["grpo", "ppo", "rloo", "reinforce", "reinforce_pp", "dapo"])
def test_algorithm_learns_the_builtin_task(algorithm, tmp_path, default_model):
    run = tmp_path / "run"
    out = flux_train("--set", f"algorithm={algorithm}", "--max-steps", "80", "--out", str(run), *SHORT,
                     timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = metrics(run)
    assert len(rows) == 80
    first, last = reward_rise(rows)
    assert last > first + 0.08, f"{algorithm}: reward {first:.3f} → {last:.3f}"
    assert_nothing_left(run)


@pytest.mark.parametrize("algorithm, mode", [("grpo", "async"), ("grpo", "adaptive"), ("ppo", "async"),
                                             ("ppo", "adaptive")])
def test_asynchronous_modes_learn_too(algorithm, mode, tmp_path, default_model):
    """The same bar in the modes Flux exists for: samples up to η_max steps old (async: at the full lead)."""
    run = tmp_path / "run"
    out = flux_train("--set", f"algorithm={algorithm}", "--max-steps", "80", "--out", str(run), *SHORT,
                     "--set", f"adaptive_async.mode={mode}", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = metrics(run)
    assert len(rows) == 80
    if mode == "async":
        assert sum(r["lag_mean"] for r in rows) / len(rows) > 0.5      # it really trained on stale samples
    first, last = reward_rise(rows)
    assert last > first + 0.08, f"{algorithm}/{mode}: reward {first:.3f} → {last:.3f}"
    assert_nothing_left(run)


def test_custom_algorithm_from_outside_the_package_learns(tmp_path, default_model, monkeypatch):
    """examples/custom_algorithm.py, copied to a directory that is not Flux's, given as a dotted path."""
    outside = tmp_path / "user_code"
    outside.mkdir()
    shutil.copy(EXAMPLES / "custom_algorithm.py", outside / "my_rank_algo.py")
    monkeypatch.setenv("PYTHONPATH", str(outside))
    run = tmp_path / "run"
    out = flux_train("--set", "algorithm=my_rank_algo:RANK", "--set", "algo.power=2", "--max-steps", "80",
                     "--out", str(run), *SHORT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = metrics(run)
    first, last = reward_rise(rows)
    assert last > first + 0.08, f"custom rank algorithm: reward {first:.3f} → {last:.3f}"
    assert "my_rank_algo:RANK" in (run / "config.yaml").read_text()
    assert_nothing_left(run)


def test_dpo_learns_the_builtin_preference_pairs(tmp_path, default_model):
    run = tmp_path / "run"
    out = flux_train("--set", "algorithm=dpo", "--set", "prompts=builtin:sort_pairs", "--max-steps", "40",
                     "--set", "learner.lr=3e-4", "--set", "learner.groups_per_step=16", "--out", str(run),
                     "--set", "adaptive_async.mode=sync", "--set", "eval.num_prompts=20", timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = metrics(run)
    assert len(rows) == 40
    assert rows[0]["pref_acc"] == 0.5 and rows[0]["pairs"] == 16  # the policy starts as the reference
    late = sum(r["pref_acc"] for r in rows[-8:]) / 8
    assert late >= 0.8, f"preference accuracy {late:.3f}"
    assert sum(r["margin"] for r in rows[-8:]) / 8 > 0.3
    assert_nothing_left(run)


def test_online_dpo_trains_on_sampled_pairs_and_accounts_for_flat_groups(tmp_path, default_model):
    run = tmp_path / "run"
    out = flux_train("--set", "algorithm=dpo", "--max-steps", "6", "--out", str(run), *SHORT, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = metrics(run)
    assert len(rows) == 6 and all(r["pairs"] == 4 for r in rows)  # one pair per group, every group
    assert "dynamic_sampling: true" in (run / "config.yaml").read_text()
    assert_nothing_left(run)
