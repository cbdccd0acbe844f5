"""bench/async_modes.py's pure parts (summary, targets, table, step response) and the slowdown schedule."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest

from actors.generator import slowdown_at
from flux.config import ConfigError, FluxConfig, load_config

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_async_modes", ROOT / "bench" / "async_modes.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def rows_of(n: int, **over) -> list[dict]:
    """n synthetic metrics.jsonl rows: staleness i/100, lag i%3, reward i/n, 8 samples per step, 0.5 s/step."""
    rows = []
    for i in range(n):
        row = {"step": i, "version": i + 1, "reward_mean": i / n, "staleness_mean": i / 100,
               "staleness_ema": i / 100, "lag_mean": float(i % 3), "lag_max": float(i % 3) + 1,
               "async_ratio": 0.25, "samples": 8, "tokens": 32, "wall_s": 5.0 + 0.5 * i,
               "samples_per_s": 16.0, "tokens_per_s": 64.0, "learner_busy_frac": 0.4 + i / 1000,
               "generator_busy_frac": 0.8, "dropped_stale": i // 10, "step_s": 0.2, "batch_wait_s": 0.3}
        if i in (0, n - 1):
            row["eval_score"] = 0.3 if i == 0 else 0.7
        row.update(over)
        rows.append(row)
    return rows


def test_summarize_fields():
    s = bench.summarize(rows_of(20), group_size=4)
    assert s["steps"] == 20 and s["samples"] == 160
    assert s["wall_s"] == pytest.approx(5.0 + 0.5 * 19)
    assert s["samples_per_s"] == 16.0 and s["tokens_per_s"] == 64.0
    assert s["learner_busy_frac"] == pytest.approx(0.419) and s["generator_busy_frac"] == 0.8
    stale = [i / 100 for i in range(20)]
    assert s["staleness_mean"] == pytest.approx(np.mean(stale))
    assert s["staleness_p95"] == pytest.approx(np.percentile(stale, 95))
    assert s["staleness_rms"] == pytest.approx(np.sqrt(np.mean(np.square(stale))))
    assert s["lag_mean"] == pytest.approx(np.mean([i % 3 for i in range(20)]))
    assert s["lag_max"] == 3.0
    assert s["dropped_groups"] == 1 and s["dropped_samples"] == 4
    # final reward: mean over the last 10% of steps (2 of 20)
    assert s["reward_final"] == pytest.approx((18 / 20 + 19 / 20) / 2)
    assert (s["eval_initial"], s["eval_final"]) == (0.3, 0.7)


def test_summarize_splits_the_steps_time_into_waiting_and_generating():
    s = bench.summarize(rows_of(20), group_size=4, gen_busy_s=7.0)   # 20 steps × (0.3 s wait + 0.2 s step)
    assert s["waiting_frac"] == pytest.approx(0.6) and s["generating_frac"] == pytest.approx(0.7)
    assert math.isnan(bench.summarize(rows_of(20), group_size=4)["generating_frac"])


def test_generator_busy_seconds_come_from_the_generators_timelines(tmp_path):
    assert bench.generator_busy_s(tmp_path) is None
    (tmp_path / "logs").mkdir()
    for name, busy in (("gen0", 4.0), ("gen1", 6.0)):
        (tmp_path / "logs" / f"{name}.timeline.json").write_text(f'{{"marks": {{}}, "totals": {{"busy_s": {busy}}}}}')
    (tmp_path / "logs" / "learner.timeline.json").write_text('{"marks": {}, "totals": {"busy_s": 100}}')
    assert bench.generator_busy_s(tmp_path) == pytest.approx(5.0)


def test_summarize_short_run_uses_at_least_one_step():
    s = bench.summarize(rows_of(3), group_size=4)
    assert s["reward_final"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("q", [0, 50, 95, 100])
def test_percentile_matches_numpy(q):
    xs = [0.3, 0.1, 0.9, 0.4, 0.25, 0.7, 0.05]
    assert bench.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert math.isnan(bench.percentile([], q))


def mode(sps: float, ev: float, t: float | None, stale: float = 0.1, ratio: float = 0.5) -> dict:
    return {"samples_per_s": sps, "eval_final": ev, "time_to_target_s": t, "staleness_mean": stale,
            "async_ratio_mean": ratio}


def workload(**modes) -> dict:
    return {"target_eval": 0.6, "modes": modes}


def verdicts(workloads, target=0.1) -> dict:
    return {(t["workload"], t["name"]): t["ok"] for t in bench.check_targets(workloads, target)}


def test_targets_all_met_on_each_workload():
    w = {"longtail": workload(sync=mode(100, 0.6, 50), async_eta4=mode(180, 0.6, 30), adaptive=mode(170, 0.61, 30)),
         "sensitive": workload(sync=mode(100, 0.7, 40), async_eta4=mode(150, 0.5, None), adaptive=mode(110, 0.69, 41))}
    v = verdicts(w)
    assert all(v.values()) and set(v) == {
        ("longtail", "speedup"), ("longtail", "vs_fastest_async"), ("longtail", "quality"),
        ("longtail", "time_to_target"), ("longtail", "staleness"), ("sensitive", "quality"),
        ("sensitive", "time_to_target"), ("sensitive", "staleness"), ("sensitive", "async_hurts")}


@pytest.mark.parametrize("adaptive, failing", [
    (mode(160, 0.6, 30, stale=0.1), ("longtail", "vs_fastest_async")),  # 160/180 < 0.9 (1.6× sync is fine)
    (mode(140, 0.6, 30), [("longtail", "speedup"), ("longtail", "vs_fastest_async")]),  # 1.4× sync
    (mode(170, 0.57, 30), ("longtail", "quality")),           # more than 0.02 below sync
    (mode(170, 0.6, 32), ("longtail", "time_to_target")),     # 32 s > 1.05 × 30 s
    (mode(170, 0.6, None), ("longtail", "time_to_target")),   # never reached
    (mode(170, 0.6, 30, stale=0.2), ("longtail", "staleness")),
])
def test_each_target_can_fail(adaptive, failing):
    w = {"longtail": workload(sync=mode(100, 0.6, 50), async_eta4=mode(180, 0.6, 30), adaptive=adaptive)}
    assert [k for k, ok in verdicts(w).items() if not ok] == (failing if isinstance(failing, list) else [failing])


def test_staleness_below_target_passes_only_at_the_maximum_ratio():
    sat = {"sort": workload(sync=mode(100, 0.6, 50), adaptive=mode(150, 0.6, 40, stale=0.02, ratio=1.0))}
    assert verdicts(sat)[("sort", "staleness")] is True
    low = {"sort": workload(sync=mode(100, 0.6, 50), adaptive=mode(150, 0.6, 40, stale=0.02, ratio=0.6))}
    assert verdicts(low)[("sort", "staleness")] is False


def test_the_rms_staleness_the_controller_holds_is_an_extra_check_when_measured():
    def adaptive(rms, ratio=0.4):
        return {**mode(150, 0.6, 40, stale=0.04, ratio=ratio), "staleness_rms": rms}

    v = verdicts({"sort": workload(sync=mode(100, 0.6, 50), adaptive=adaptive(0.11))})
    assert v[("sort", "staleness_rms")] is True and v[("sort", "staleness")] is False  # mean 0.04: the misses
    assert verdicts({"sort": workload(sync=mode(100, 0.6, 50), adaptive=adaptive(0.2))})[("sort", "staleness_rms")] is False
    assert verdicts({"sort": workload(sync=mode(100, 0.6, 50), adaptive=adaptive(0.02, 1.0))})[("sort", "staleness_rms")]


def test_generation_share_and_training_reward_are_checked_when_measured():
    sync = {**mode(100, 0.6, 50), "generating_frac": 0.55, "waiting_frac": 0.62, "reward_final": 0.5}
    w = {"longtail": workload(sync=sync, async_eta4=mode(180, 0.6, 30),
                              adaptive={**mode(170, 0.6, 30), "reward_final": 0.47})}
    v = verdicts(w)
    assert v[("longtail", "generation_heavy")] is False and v[("longtail", "reward")] is False
    w["longtail"]["modes"]["sync"]["generating_frac"] = 0.6
    w["longtail"]["modes"]["adaptive"]["reward_final"] = 0.49
    v = verdicts(w)
    assert v[("longtail", "generation_heavy")] is True and v[("longtail", "reward")] is True


def test_a_sensitive_workload_needs_async_to_hurt():
    w = {"sensitive": workload(sync=mode(100, 0.7, 40), async_eta4=mode(150, 0.68, 30), adaptive=mode(140, 0.7, 31))}
    assert verdicts(w)[("sensitive", "async_hurts")] is False
    assert bench.check_targets({"sort": workload(adaptive=mode(1, 0.5, 1))}, 0.1) == []


def test_time_to_target_and_aggregate_over_seeds():
    rows = rows_of(20)                                    # eval 0.3 at step 0 (5 s), 0.7 at step 19 (14.5 s)
    assert bench.time_to_target(rows, 0.5) == pytest.approx(14.5)
    assert bench.time_to_target(rows, 0.2) == pytest.approx(5.0) and bench.time_to_target(rows, 0.9) is None
    # with an evaluation every 10 steps, the one before the first step does not count
    assert bench.time_to_target(rows, 0.2, every=10) == pytest.approx(14.5)
    per_seed = {0: bench.summarize(rows, 4), 1: {**bench.summarize(rows, 4), "eval_final": 0.5, "samples_per_s": 20.0}}
    agg = bench.aggregate(per_seed, {0: rows, 1: rows}, 0.5)
    assert agg["samples_per_s"] == pytest.approx(18.0) and agg["eval_final"] == pytest.approx(0.6)
    assert (agg["eval_min"], agg["eval_max"]) == (0.5, 0.7) and agg["time_to_target_s"] == pytest.approx(14.5)
    assert agg["reward_final"] == pytest.approx(0.925) == agg["reward_min"] == agg["reward_max"]
    assert agg["seeds"]["1"]["time_to_target_s"] == pytest.approx(14.5)
    late = [dict(r) for r in rows]
    late[-1]["eval_score"] = 0.4                          # seed 1 never reaches 0.5: no mean time
    assert bench.aggregate(per_seed, {0: rows, 1: late}, 0.5)["time_to_target_s"] is None


def test_signal_evidence_ranks_signals_by_how_well_they_predict_the_eval_loss():
    assert bench.spearman([1, 2, 3, 4], [10, 20, 30, 45]) == pytest.approx(1.0)
    assert bench.spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert bench.spearman([1, 1, 1], [1, 2, 3]) is None and bench.spearman([1, 2], [1, 2]) is None
    seeds = lambda *pairs: {str(i): {"eval_final": e, "sig_k3_mean": k, "lag_mean_mean": 1.0}
                            for i, (e, k) in enumerate(pairs)}
    res = {"modes": {"sync": {"eval_final": 0.8, "seeds": seeds((0.8, 0.0), (0.8, 0.0))},
                     "async_eta1": {"seeds": seeds((0.75, 0.02), (0.7, 0.03))},
                     "async_eta4": {"seeds": seeds((0.3, 0.2), (0.5, 0.1))},
                     "adaptive": {"seeds": seeds((0.9, 0.5), (0.9, 0.5))}}}      # not a point: it is controlled
    ev = bench.signal_evidence(res)
    assert ev["sig_k3"]["spearman_vs_eval_loss"] == pytest.approx(1.0)
    assert ev["lag_mean"]["spearman_vs_eval_loss"] is None                   # constant: predicts nothing
    assert ev["sig_k3"]["by_mode"] == pytest.approx({"sync": 0.0, "async_eta1": 0.025, "async_eta4": 0.15})


def test_length_histograms():
    from flux.control.composer import add_lengths, length_bucket

    assert [length_bucket(n) for n in (0, 1, 2, 3, 4, 7, 8, 48)] == ["1", "1", "2-3", "2-3", "4-7", "4-7", "8-15",
                                                                      "32-63"]
    hist = add_lengths({}, [1, 2, 3, 40])
    assert hist == {"1": 1, "2-3": 2, "32-63": 1}
    assert bench.hist_mean(hist) == pytest.approx((1 + 2.5 * 2 + 47.5) / 4) and bench.hist_mean({}) is None


def test_speedups_and_table():
    summaries = {m: bench.summarize(rows_of(10, samples_per_s=sps), 4) for m, sps in
                 [("sync", 10.0), ("async", 25.0), ("adaptive", 18.0)]}
    assert bench.speedups(summaries) == pytest.approx({"sync": 1.0, "async": 2.5, "adaptive": 1.8})
    table = bench.format_table(summaries, {"adaptive+step": "boom"})   # summaries lack some columns: "-"
    lines = table.splitlines()
    assert lines[0].split()[0] == "mode" and "×sync" in lines[0]
    assert lines[3].split()[0] == "adaptive" and "1.80" in lines[3].split()
    assert lines[-1].split()[:2] == ["adaptive+step", "failed:"]


def test_window_rate_and_step_response():
    rows = rows_of(40)
    assert bench.window_rate(rows[:5]) == pytest.approx(4 * 8 / 2.0)  # 4 steps of 8 samples in 2 s
    for i, r in enumerate(rows):
        r["async_ratio"] = 0.2 if i < 20 else 0.9
        r["wall_s"] = 0.5 * i if i < 20 else 10.0 + 2.0 * (i - 20)  # 4× slower after the change
    sr = bench.step_response(rows, 20)
    assert sr["async_ratio_before"] == pytest.approx(0.2) and sr["async_ratio_after"] == pytest.approx(0.9)
    assert sr["staleness_before"] == pytest.approx(np.mean([i / 100 for i in range(10, 20)]))
    assert sr["samples_per_s_before"] == pytest.approx(16.0)
    assert sr["samples_per_s_after"] == pytest.approx(4.0)


def test_step_slowdown_from_generator_time_per_token():
    # busy 0.8 at 400 tokens/s → 2 ms of generator time per token; 3× slower adds 2 × 2 ms
    assert bench.step_slowdown({"generator_busy_frac": 0.8, "tokens_per_s": 400.0}, 3.0) == pytest.approx(4e-3)
    # two generators each deliver half the tokens: twice the time per token each
    assert bench.step_slowdown({"generator_busy_frac": 0.8, "tokens_per_s": 400.0}, 3.0, 2) == pytest.approx(8e-3)
    assert bench.step_slowdown({"generator_busy_frac": 0.8, "tokens_per_s": 400.0}, 0.5) == 0.0


def test_smooth_is_a_trailing_mean():
    assert bench.smooth([1, 2, 3, 4, 5], 2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert bench.smooth([1, 2, 3], 1) == [1, 2, 3]


# ---- slowdown schedule ------------------------------------------------------------------------------

@pytest.mark.parametrize("version, expected", [(0, 0.5), (9, 0.5), (10, 0.002), (19, 0.002), (20, 0.0),
                                               (1000, 0.0)])
def test_slowdown_at_takes_the_last_pair_reached(version, expected):
    assert slowdown_at(version, [[10, 0.002], [20, 0.0]], 0.5) == expected


def test_slowdown_at_without_schedule_is_the_constant():
    assert slowdown_at(7, [], 0.25) == 0.25
    assert slowdown_at(0, [[0, 1]], 0.25) == 1.0


def test_schedule_from_set_is_validated_and_typed():
    cfg = load_config(None, ["rollout.slowdown_schedule=[[0, 0], [150, 0.002]]"])
    assert cfg.rollout.slowdown_schedule == [[0, 0], [150, 0.002]]
    assert FluxConfig().rollout.slowdown_schedule == []
    FluxConfig(rollout={"slowdown_schedule": [(3, 1e-3)]}).validate()


@pytest.mark.parametrize("schedule", [
    "[[150, 0.002], [100, 0.001]]",   # not sorted
    "[[100, 0.002], [100, 0.001]]",   # duplicate version
    "[[-1, 0.002]]",                  # negative version
    "[[1.5, 0.002]]",                 # fractional version
    "[[true, 0.002]]",                # bool is not an int here
    "[[10, -0.1]]",                   # negative seconds
    "[[10, .nan]]",
    "[[10, .inf]]",
    "[[10, fast]]",
    "[[10]]",                         # not a pair
    "[10, 0.002]",                    # pairs must be nested
    "{10: 0.002}",                    # not a list at all
])
def test_bad_schedules_are_rejected_naming_the_field(schedule):
    with pytest.raises(ConfigError, match="rollout.slowdown_schedule"):
        load_config(None, [f"rollout.slowdown_schedule={schedule}"])


def test_benchmark_json_is_strict_nan_becomes_null(tmp_path):
    import json

    common = importlib.util.module_from_spec(importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "common.py"))
    common.__spec__.loader.exec_module(common)
    common.write_json(tmp_path / "r.json", {"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": 2}})
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": None, "b": [1.0, None], "c": {"d": 2}}
