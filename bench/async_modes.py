"""Sync vs fixed async (η_max 1, 2, 4) vs adaptive, on three workloads, over seeds.

    python bench/async_modes.py [--workloads sort longtail sensitive] [--seeds 0 1] [--steps-scale 1.0]
                                [--step-change] [--set KEY=VALUE ...]
                                [--json bench/results/async_modes.json] [--plot bench/results/async_modes.png]

Workloads (`WORKLOADS`): the built-in sort task at its defaults; `longtail`, the built-in repeat task
(completions of 2 to 49 tokens, a sync step mostly generating); `sensitive`, the sort task at
learner.lr=2e-3, where stale samples hurt; and, not run by default, `sensitive_b`, a second sensitive
configuration the default target was not chosen on (the repeat task at lr 3e-3, 8 samples per prompt),
and `sensitive_c`, a third (the sort task at lr 1.5e-3, 16 prompts × 8 samples).
Every mode of a workload runs the same steps with the same batch, so all train on the same number of
samples; runs go back to back, never in parallel (they would compete for the cores), seed by seed with
the modes interleaved, so that a drift of the machine's speed falls on every mode alike. `adaptive` runs
the **default** controller config; nothing is tuned per workload.

Per workload and mode (mean over seeds; eval also min–max): samples/s, time to the target eval (95 % of
sync's final held-out eval on that workload), final eval, staleness, lag, dropped samples, learner and
generator busy fractions. Prints a table and the issue's targets, writes JSON and a PNG (held-out eval
against wall time, one line per mode and seed; matplotlib from the `bench` extra).

`--step-change` adds one more adaptive run on the first workload whose generation becomes
`--step-factor` times slower from policy version steps/2 on (`rollout.slowdown_schedule`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flux, installed or not
from flux.integrations.tools.plot import pyplot, save, smooth, window_rate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import have_matplotlib, run_train, write_json

# name -> (config overrides, steps, evaluations per run)
WORKLOADS = {
    "sort": ([], 200),
    "longtail": (["prompts=builtin:repeat", "eval.prompts=builtin:repeat", "rollout.max_new_tokens=64",
                  "learner.micro_batch_tokens=1024", "eval.temperature=1.0", "eval.num_prompts=400"], 100),
    "sensitive": (["learner.lr=2e-3"], 200),
    "sensitive_b": (["prompts=builtin:repeat", "eval.prompts=builtin:repeat", "rollout.max_new_tokens=64",
                     "learner.micro_batch_tokens=1024", "eval.temperature=1.0", "eval.num_prompts=400", "learner.lr=3e-3",
                     "rollout.group_size=8", "learner.groups_per_step=16"], 100),
}
# a third sensitive candidate, fixed before it was first run (2026-12-06): the sort task with another batch
# shape (16 groups of 8) at 1.5× the default rate
WORKLOADS["sensitive_c"] = (["learner.lr=1.5e-3", "rollout.group_size=8", "learner.groups_per_step=16"], 200)
DEFAULT_WORKLOADS = ("sort", "longtail", "sensitive")
MODES = {
    "sync": ["adaptive_async.mode=sync"],
    "async_eta1": ["adaptive_async.mode=async", "adaptive_async.eta_max=1"],
    "async_eta2": ["adaptive_async.mode=async", "adaptive_async.eta_max=2"],
    "async_eta4": ["adaptive_async.mode=async", "adaptive_async.eta_max=4"],
    "adaptive": ["adaptive_async.mode=adaptive"],
}
FIXED_ASYNC = ("async_eta1", "async_eta2", "async_eta4")
EVALS_PER_RUN = 10
TARGET_FRACTION = 0.95   # time to target: 95 % of sync's final eval
STEP_RUN = "adaptive+step"
LONGTAIL_SPEEDUP = 1.5   # adaptive over sync on the long-tail workload
LONGTAIL_OF_FASTEST = 0.9  # adaptive over the fastest fixed async there
EVAL_SLACK = 0.02        # adaptive's final eval may trail sync's by this much
TIME_SLACK = 1.05        # adaptive's time to target over the best mode's
STALENESS_BAND = 0.03    # |mean staleness − target|
SENSITIVE_LOSS = 0.05    # the fastest fixed async must lose this much eval on the sensitive workload
GENERATION_HEAVY = 0.6   # the long-tail workload's sync step: share of its wall time spent generating


# ---- pure parts: rows of metrics.jsonl → summary, targets, table ------------------------------------

def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    pos = (len(s) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def summarize(rows: list[dict], group_size: int, gen_busy_s: float | None = None) -> dict:
    """One run's metrics.jsonl rows → the table/JSON fields.

    Throughputs and busy fractions are the run's cumulative values (the last row; the busy fractions are
    over each actor's whole life, evaluations and start-up included); staleness and lag are taken over
    every step; the final reward (of the trained samples, on the training prompts) is the mean over the
    last 10% of steps.

    The steps' own time is Σ (batch_wait_s + step_s), evaluations left out. `waiting_frac` is the share
    of it the learner waited for its batch; `generating_frac` the share the generators' engines decoded
    (`gen_busy_s`: their busy seconds at exit, per generator): in sync mode, the share of a step spent
    generating. (Outside sync mode the engines also decode during evaluations, so it can pass 1.)
    """
    last, k = rows[-1], max(1, len(rows) // 10)
    stale = [r["staleness_mean"] for r in rows]
    dropped_groups = int(last.get("dropped_stale", 0))
    wait = sum(r.get("batch_wait_s", 0.0) for r in rows)
    step_time = wait + sum(r.get("step_s", 0.0) for r in rows)
    return {
        "waiting_frac": wait / step_time if step_time > 0 else float("nan"),
        "generating_frac": gen_busy_s / step_time if gen_busy_s is not None and step_time > 0 else float("nan"),
        "steps": len(rows),
        "samples": sum(int(r.get("samples", 0)) for r in rows),
        "wall_s": last["wall_s"],
        "samples_per_s": last["samples_per_s"],
        "tokens_per_s": last["tokens_per_s"],
        "learner_busy_frac": last.get("learner_busy_frac", float("nan")),
        "generator_busy_frac": last.get("generator_busy_frac", float("nan")),
        "staleness_mean": mean(stale),
        "staleness_p95": percentile(stale, 95),
        "staleness_rms": math.sqrt(mean([x * x for x in stale])),  # what the adaptive controller holds
        "lag_mean": mean([r.get("lag_mean", 0.0) for r in rows]),
        "lag_max": max(r.get("lag_max", 0.0) for r in rows),
        "async_ratio_mean": mean([r["async_ratio"] for r in rows]),
        "dropped_groups": dropped_groups,
        "dropped_samples": dropped_groups * group_size,
        "reward_final": mean([r["reward_mean"] for r in rows[-k:]]),
        "eval_initial": rows[0].get("eval_score"),
        "eval_final": last.get("eval_score"),
        "step_s_mean": mean([r.get("step_s", float("nan")) for r in rows]),
        "batch_wait_s_mean": mean([r.get("batch_wait_s", float("nan")) for r in rows]),
        "response_len_p50": mean([r["response_len_p50"] for r in rows if "response_len_p50" in r]),
        "response_len_p99": mean([r["response_len_p99"] for r in rows if "response_len_p99" in r]),
        "trained_lengths": last.get("trained_lengths", {}),
        "dropped_lengths": last.get("dropped_lengths", {}),
        "dropped_len_mean": hist_mean(last.get("dropped_lengths", {})),
        "trained_len_mean": hist_mean(last.get("trained_lengths", {})),
        **{f"{k}_mean": mean([r[k] for r in rows if k in r]) for k in SIGNAL_KEYS},
    }


SIGNAL_KEYS = ("sig_k3", "sig_ess_loss", "sig_is_cap", "clip_frac", "lag_mean")  # candidates for S


def rank(xs: list[float]) -> list[float]:
    """Ranks 0..n-1 (ties share their mean rank)."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation; None when either side is constant or there are < 3 points."""
    if len(xs) < 3:
        return None
    rx, ry = rank(xs), rank(ys)
    mx, my = mean(rx), mean(ry)
    sx = sum((a - mx) ** 2 for a in rx) ** 0.5
    sy = sum((b - my) ** 2 for b in ry) ** 0.5
    if sx == 0 or sy == 0:
        return None
    return sum((a - mx) * (b - my) for a, b in zip(rx, ry)) / (sx * sy)


def pooled_evidence(results: dict[str, dict]) -> dict:
    """Spearman's ρ of each candidate's run mean against the run's eval loss (vs its own workload's
    sync), over the fixed-mode runs of every workload together: where a lag of 2 is harmless on one
    workload and harmful on another, a signal that measures harm ranks the runs and the lag does not."""
    xs: dict[str, list[float]] = {k: [] for k in SIGNAL_KEYS}
    loss: list[float] = []
    for res in results.values():
        sync = res["modes"].get("sync")
        if sync is None:
            continue
        for m, r in res["modes"].items():
            for s in r["seeds"].values():
                if m != "adaptive" and s.get("eval_final") is not None:
                    loss.append(sync["eval_final"] - s["eval_final"])
                    for k in SIGNAL_KEYS:
                        xs[k].append(s.get(f"{k}_mean", float("nan")))
    return {k: spearman(v, loss) for k, v in xs.items()} | {"points": len(loss)}


def signal_evidence(result: dict) -> dict:
    """How well each candidate signal's run mean predicts the run's loss of held-out eval against sync's
    mean, and its loss of final training reward (one point per fixed-mode run and seed): Spearman's ρ,
    and the signal's mean per mode."""
    sync = result["modes"].get("sync")
    if sync is None:
        return {}
    points = [(m, s) for m, res in result["modes"].items() if m != "adaptive"
              for s in res["seeds"].values() if s.get("eval_final") is not None]
    loss = [sync["eval_final"] - s["eval_final"] for _, s in points]
    lost = [sync.get("reward_final", float("nan")) - s.get("reward_final", float("nan")) for _, s in points]
    out = {}
    for k in SIGNAL_KEYS:
        xs = [s.get(f"{k}_mean", float("nan")) for _, s in points]
        out[k] = {"spearman_vs_eval_loss": spearman(xs, loss), "spearman_vs_reward_loss": spearman(xs, lost),
                  "by_mode": {m: mean([x for (mm, _), x in zip(points, xs) if mm == m])
                              for m in dict.fromkeys(m for m, _ in points)}}
    return out


def hist_mean(hist: dict[str, int]) -> float | None:
    """Mean of a power-of-two length histogram ("4-7": n), each bucket at its midpoint; None if empty."""
    total = sum(hist.values())
    if not total:
        return None
    mid = {b: (int(b.split("-")[0]) + int(b.split("-")[-1])) / 2 for b in hist}
    return sum(mid[b] * n for b, n in hist.items()) / total


def speedups(summaries: dict[str, dict], base: str = "sync") -> dict[str, float]:
    """samples/s of every run over the base mode's."""
    if base not in summaries:
        return {}
    ref = summaries[base]["samples_per_s"]
    return {name: s["samples_per_s"] / ref for name, s in summaries.items()}


def time_to_target(rows: list[dict], target: float, every: int = 1) -> float | None:
    """Wall seconds at the first evaluation after training began (steps every−1, 2·every−1, ..., and the
    last) reaching `target`; None if none does. (Every row repeats the last evaluation; the one before
    the first step is the same for every mode and does not count.)"""
    for r in rows:
        fresh = (r["step"] + 1) % max(1, every) == 0 or r is rows[-1]
        if fresh and r.get("eval_score") is not None and r["eval_score"] >= target:
            return float(r["wall_s"])
    return None


AGG_KEYS = ("samples_per_s", "staleness_mean", "staleness_rms", "lag_mean", "async_ratio_mean", "learner_busy_frac",
            "generator_busy_frac", "waiting_frac", "generating_frac", "dropped_samples", "wall_s",
            "response_len_p50", "response_len_p99", "dropped_len_mean", "trained_len_mean", "eval_initial")


def aggregate(per_seed: dict[int, dict], runs: dict[int, list[dict]], target_eval: float, every: int = 1) -> dict:
    """One mode's seeds → means (eval also min/max), time to target (mean over the seeds that reach it,
    None when one does not), and the per-seed summaries."""
    out = {k: mean([s[k] for s in per_seed.values() if s.get(k) is not None]) for k in AGG_KEYS}
    evals = [s["eval_final"] for s in per_seed.values() if s.get("eval_final") is not None]
    rewards = [s["reward_final"] for s in per_seed.values() if s.get("reward_final") is not None]
    times = {seed: time_to_target(rows, target_eval, every) for seed, rows in runs.items()}
    reached = [t for t in times.values() if t is not None]
    out.update(eval_final=mean(evals), eval_min=min(evals, default=None), eval_max=max(evals, default=None),
               reward_final=mean(rewards), reward_min=min(rewards, default=None),
               reward_max=max(rewards, default=None),
               time_to_target_s=mean(reached) if reached and len(reached) == len(times) else None,
               reached_target=f"{len(reached)}/{len(times)}",
               seeds={str(seed): {**s, "time_to_target_s": times[seed]} for seed, s in per_seed.items()})
    return out


def check_targets(workloads: dict[str, dict], target: float, max_ratio: float = 1.0) -> list[dict]:
    """The issue's targets, per workload: [{workload, name, ok, detail}]."""
    out = []

    def add(w, name, ok, detail):
        out.append({"workload": w, "name": name, "ok": bool(ok), "detail": detail})

    for w, res in workloads.items():
        modes = res["modes"]
        ad, sy = modes.get("adaptive"), modes.get("sync")
        if ad is None or sy is None:
            continue
        fixed = {m: modes[m] for m in FIXED_ASYNC if m in modes}
        if w == "longtail":
            g = sy.get("generating_frac")
            if g is not None and not math.isnan(g):
                add(w, "generation_heavy", g >= GENERATION_HEAVY,
                    f"sync step generating {g:.2f} of its time, waiting {sy.get('waiting_frac', float('nan')):.2f} "
                    f"(need ≥ {GENERATION_HEAVY})")
            ratio = ad["samples_per_s"] / sy["samples_per_s"]
            add(w, "speedup", ratio >= LONGTAIL_SPEEDUP, f"adaptive/sync samples/s {ratio:.2f} (need ≥ {LONGTAIL_SPEEDUP})")
            if fixed:
                best = max(fixed, key=lambda m: fixed[m]["samples_per_s"])
                r = ad["samples_per_s"] / fixed[best]["samples_per_s"]
                add(w, "vs_fastest_async", r >= LONGTAIL_OF_FASTEST,
                    f"adaptive/{best} samples/s {r:.2f} (need ≥ {LONGTAIL_OF_FASTEST})")
        add(w, "quality", ad["eval_final"] >= sy["eval_final"] - EVAL_SLACK,
            f"adaptive eval {ad['eval_final']:.3f} vs sync {sy['eval_final']:.3f} (need ≥ sync − {EVAL_SLACK})")
        if ad.get("reward_final") is not None and sy.get("reward_final") is not None:
            # not one of the targets: the training reward sees learning that a held-out eval
            # which barely moves (long-tail) cannot
            add(w, "reward", ad["reward_final"] >= sy["reward_final"] - EVAL_SLACK,
                f"adaptive training reward {ad['reward_final']:.3f} vs sync {sy['reward_final']:.3f} "
                f"(extra check: need ≥ sync − {EVAL_SLACK})")
        times = {m: v["time_to_target_s"] for m, v in modes.items() if v["time_to_target_s"] is not None}
        if times:
            best = min(times, key=times.get)
            t = ad["time_to_target_s"]
            add(w, "time_to_target", t is not None and t <= TIME_SLACK * times[best],
                f"adaptive {'never' if t is None else f'{t:.0f}s'} vs best {best} {times[best]:.0f}s "
                f"(need ≤ {TIME_SLACK}×; target eval {res['target_eval']:.3f})")
        s, a = ad["staleness_mean"], ad["async_ratio_mean"]
        saturated = s < target and a >= 0.95 * max_ratio
        add(w, "staleness", abs(s - target) <= STALENESS_BAND or saturated,
            f"adaptive mean staleness {s:.3f}, async ratio {a:.2f} (need {target:g} ± {STALENESS_BAND}, "
            f"or below it at the maximum ratio)")
        rms = ad.get("staleness_rms")
        if rms is not None:  # not the issue's: what the controller holds (it regulates the RMS, not the mean)
            add(w, "staleness_rms", abs(rms - target) <= STALENESS_BAND or (rms < target and saturated),
                f"adaptive RMS staleness {rms:.3f} (extra check: need {target:g} ± {STALENESS_BAND}, "
                f"or below it at the maximum ratio)")
        if w.startswith("sensitive") and fixed:
            fastest = max(fixed, key=lambda m: fixed[m]["samples_per_s"])
            loss = sy["eval_final"] - fixed[fastest]["eval_final"]
            add(w, "async_hurts", loss >= SENSITIVE_LOSS,
                f"{fastest} loses {loss:.3f} eval against sync (need ≥ {SENSITIVE_LOSS})")
    return out


def step_response(rows: list[dict], change_step: int) -> dict:
    """Means of async ratio, staleness and samples/s just before and well after a step change.

    Before: steps [change/2, change); after: the last quarter of the run (past the controller's transient).
    """
    n = len(rows)
    windows = {"before": rows[change_step // 2:change_step], "after": rows[n - max(1, n // 4):]}
    out = {"change_step": change_step}
    for name, w in windows.items():
        out[f"async_ratio_{name}"] = mean([r["async_ratio"] for r in w])
        out[f"staleness_{name}"] = mean([r["staleness_mean"] for r in w])
        out[f"samples_per_s_{name}"] = window_rate(w)
    return out


def step_slowdown(summary: dict, factor: float, num_generators: int = 1) -> float:
    """Extra seconds per generated token that make generation `factor` times slower than in `summary`.

    A generator's seconds per token ≈ its busy fraction / the tokens per second it delivers
    (tokens_per_s / num_generators); the schedule adds (factor − 1) of that.
    """
    per_token = summary["generator_busy_frac"] * num_generators / summary["tokens_per_s"]
    return max(0.0, (factor - 1.0) * per_token)


COLUMNS = [  # (header, key, format)
    ("mode", None, ""), ("samples/s", "samples_per_s", ".1f"), ("×sync", "speedup", ".2f"),
    ("to target s", "time_to_target_s", ".0f"), ("reached", "reached_target", ""),
    ("eval", "eval_final", ".3f"), ("eval min", "eval_min", ".3f"), ("eval max", "eval_max", ".3f"),
    ("reward", "reward_final", ".3f"),
    ("stale", "staleness_mean", ".3f"), ("S rms", "staleness_rms", ".3f"), ("lag", "lag_mean", ".2f"), ("async", "async_ratio_mean", ".2f"),
    ("dropped", "dropped_samples", ".0f"), ("learn busy", "learner_busy_frac", ".2f"),
    ("gen busy", "generator_busy_frac", ".2f"), ("generating", "generating_frac", ".2f"),
]


def format_table(summaries: dict[str, dict], errors: dict[str, str] | None = None) -> str:
    """A fixed-width table, one row per run; `×sync` is samples/s over sync's."""
    ratio = speedups(summaries)
    widths = [max(len(h), 13 if key is None else 7) for h, key, _ in COLUMNS]
    def cell(text: str, key, w: int) -> str:
        return text.ljust(w) if key is None else text.rjust(w)

    lines = [" ".join(cell(h, key, w) for (h, key, _), w in zip(COLUMNS, widths))]
    for name, s in summaries.items():
        cells = []
        for (_, key, fmt), w in zip(COLUMNS, widths):
            value = name if key is None else ratio.get(name) if key == "speedup" else s.get(key)
            cells.append(cell("-" if value is None or value != value else format(value, fmt), key, w))
        lines.append(" ".join(cells))
    for name, err in (errors or {}).items():
        lines.append(f"{name.ljust(widths[0])} failed: {err}")
    return "\n".join(lines)


# ---- running ----------------------------------------------------------------------------------------

def plot_workloads(runs: dict[str, dict[str, dict[int, list[dict]]]], targets: dict[str, float], path: str) -> None:
    """Held-out eval against wall time: one panel per workload, one line per mode and seed."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4.2), squeeze=False)
    for ax, (w, modes) in zip(axes[0], runs.items()):
        for k, (mode, seeds) in enumerate(modes.items()):
            for n, rows in enumerate(seeds.values()):
                pts = [(r["wall_s"], r["eval_score"]) for r in rows if r.get("eval_score") is not None]
                ax.plot(*zip(*pts), c=f"C{k}", alpha=0.9 if n == 0 else 0.45, marker=".",
                        label=mode if n == 0 else None)
        ax.axhline(targets[w], ls="--", c="k", lw=1, label=f"target {targets[w]:.3f}")
        ax.set(xlabel="wall time (s)", ylabel="held-out eval", title=w)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def plot_step_change(rows: list[dict], change_step: int, target: float, factor: float, path: str) -> None:
    """Async ratio, staleness (raw, and the controller's smoothed RMS) and samples/s around the step change."""
    plt = pyplot()
    steps = [r["step"] for r in rows]
    w = max(2, len(rows) // 30)
    rate = [window_rate(rows[max(0, i - w):i + 1]) for i in range(len(rows))]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(steps, [r["async_ratio"] for r in rows], c="C2")
    axes[0].set(ylabel="async ratio a", ylim=(-0.05, 1.05),
                title=f"adaptive: generation {factor:g}× slower from step {change_step}")
    axes[1].plot(steps, [r["staleness_mean"] for r in rows], c="C0", alpha=0.35, lw=0.8, label="S per step")
    axes[1].plot(steps, [r.get("staleness_ema") or 0.0 for r in rows], c="C0", label="S RMS (controller)")
    axes[1].axhline(target, ls="--", c="k", lw=1, label=f"target {target:g}")
    axes[1].set(ylabel="staleness")
    axes[1].legend()
    axes[2].plot(steps[1:], rate[1:], c="C3")
    axes[2].set(ylabel=f"samples/s ({w}-step window)", xlabel="step")
    for ax in axes:
        ax.axvline(change_step, c="grey", ls=":", lw=1)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workloads", nargs="+", choices=list(WORKLOADS), default=list(DEFAULT_WORKLOADS))
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--steps-scale", type=float, default=1.0, help="multiply every workload's steps")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override passed to every run (repeatable)")
    ap.add_argument("--step-change", action="store_true", help="add an adaptive run with a mid-run slowdown")
    ap.add_argument("--step-factor", type=float, default=3.0,
                    help="how many times slower generation gets after the change")
    ap.add_argument("--step-slowdown", type=float, default=None,
                    help="extra seconds per token after the change (default: from --step-factor)")
    ap.add_argument("--json", default="bench/results/async_modes.json")
    ap.add_argument("--plot", default="bench/results/async_modes.png")
    ap.add_argument("--step-plot", default="bench/results/async_modes_step_change.png")
    ap.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--from-runs", default=None, metavar="DIR",
                    help="run nothing: rebuild the table and JSON from a --runs-dir of an earlier run")
    args = ap.parse_args()

    tmp = None if args.runs_dir else tempfile.TemporaryDirectory()
    root = Path(args.runs_dir or tmp.name)
    results: dict[str, dict] = {}
    all_runs: dict[str, dict[str, dict[int, list[dict]]]] = {}
    errors: dict[str, str] = {}
    configs: dict[str, dict] = {}
    step = None
    try:
        for w in args.workloads:
            sets, steps = WORKLOADS[w]
            steps = max(10, round(steps * args.steps_scale))
            per_mode: dict[str, dict[int, dict]] = {}
            runs: dict[str, dict[int, list[dict]]] = {}
            # Seed by seed, the modes interleaved: a drift of the machine's speed over the minutes the
            # workload takes then falls on every mode alike, not on the modes that happen to run late.
            for seed in args.seeds:
                for mode in args.modes:
                    name = f"{w}/{mode}/seed{seed}"
                    run_dir = (Path(args.from_runs) if args.from_runs else root) / w / mode / f"seed{seed}"
                    if args.from_runs:
                        rows, cfg, err = read_run(run_dir, steps)
                    else:
                        rows, cfg, err = run_train(name, [f"seed={seed}", f"eval.every={max(1, steps // EVALS_PER_RUN)}",
                                                          *sets, *args.overrides, *MODES[mode]], steps, run_dir)
                    if err:
                        errors[name] = err
                        continue
                    configs[w] = cfg
                    runs.setdefault(mode, {})[seed] = rows
                    per_mode.setdefault(mode, {})[seed] = summarize(rows, cfg["rollout"]["group_size"],
                                                                    generator_busy_s(run_dir))
            sync_eval = mean([s["eval_final"] for s in per_mode.get("sync", {}).values()
                              if s.get("eval_final") is not None])
            target_eval = TARGET_FRACTION * sync_eval
            results[w] = {"target_eval": target_eval, "steps": steps, "sets": sets,
                          "modes": {m: aggregate(per_mode[m], runs[m], target_eval, max(1, steps // EVALS_PER_RUN))
                                    for m in per_mode}}
            results[w]["signal_evidence"] = signal_evidence(results[w])
            all_runs[w] = runs
            print(f"\n{w} ({steps} steps; target eval {target_eval:.3f} = {TARGET_FRACTION:g} × sync's)")
            print(format_table(results[w]["modes"], {k: v for k, v in errors.items() if k.startswith(w + "/")}))
            for k, ev in results[w]["signal_evidence"].items():
                rho = ev["spearman_vs_eval_loss"]
                rr = ev["spearman_vs_reward_loss"]
                print(f"  {k:<13} Spearman ρ vs eval loss {'-' if rho is None else f'{rho:+.2f}'}, vs reward loss "
                      f"{'-' if rr is None else f'{rr:+.2f}'}   by mode: "
                      + "  ".join(f"{m} {v:.4f}" for m, v in ev["by_mode"].items()))
        if args.step_change and results:
            w = args.workloads[0]
            step = run_step_change(args, WORKLOADS[w][0], results[w], configs.get(w), root, errors)
    finally:
        if tmp is not None:
            tmp.cleanup()

    cfg = next(iter(configs.values()), {"adaptive_async": {"target_staleness": 0.1, "max_async_ratio": 1.0}})
    aa = cfg["adaptive_async"]
    target = float(aa["target_staleness"])
    targets = check_targets(results, target, float(aa["max_async_ratio"]))
    pooled = pooled_evidence(results)
    print(f"\nall workloads' fixed-mode runs ({pooled['points']}): Spearman ρ of each signal vs eval loss: "
          + "  ".join(f"{k} {'-' if v is None else f'{v:+.2f}'}" for k, v in pooled.items() if k != "points"))
    print()
    for t in targets:
        print(f"{t['workload']:<11} {t['name']:<16} {'MET ' if t['ok'] else 'MISS'}  {t['detail']}")
    if step is not None:
        sr = step["response"]
        print(f"step change at step {sr['change_step']} (+{step['slowdown']:.2e} s/token): async ratio "
              f"{sr['async_ratio_before']:.2f} → {sr['async_ratio_after']:.2f}, staleness "
              f"{sr['staleness_before']:.3f} → {sr['staleness_after']:.3f}, samples/s "
              f"{sr['samples_per_s_before']:.1f} → {sr['samples_per_s_after']:.1f}")
    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "args": vars(args), "target_staleness": target, "controller": aa, "staleness": cfg.get("staleness"),
        "workloads": results, "errors": errors, "targets": targets, "signal_evidence_pooled": pooled,
        "step_change": None if step is None else {k: v for k, v in step.items() if k != "rows"},
    }
    write_json(args.json, result)
    if not have_matplotlib():
        return 1 if errors else 0
    if all_runs:
        plot_workloads(all_runs, {w: r["target_eval"] for w, r in results.items()}, args.plot)
        print(f"wrote {args.plot}")
    if step is not None:
        change = step["response"]["change_step"]
        plot_step_change(step["rows"], change, target, args.step_factor, args.step_plot)
        print(f"wrote {args.step_plot}")
    return 1 if errors else 0


def generator_busy_s(run_dir: Path) -> float | None:
    """The seconds a run's generator engines spent decoding (their exit totals, mean per generator);
    None when no generator wrote one."""
    busy = [json.loads(p.read_text()).get("totals", {}).get("busy_s")
            for p in sorted((run_dir / "logs").glob("gen*.timeline.json"))]
    busy = [b for b in busy if b is not None]
    return mean(busy) if busy else None


def read_run(run_dir: Path, steps: int) -> tuple[list[dict], dict, str | None]:
    """An earlier run's metrics rows and config (`--from-runs`), as `run_train` returns them."""
    import yaml

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return [], {}, f"{run_dir}: no metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    return rows, cfg, None if len(rows) == steps else f"{run_dir}: {len(rows)} of {steps} steps"


def run_step_change(args, sets: list[str], result: dict, cfg: dict | None, root: Path, errors: dict) -> dict | None:
    """The adaptive mode with generation slowed down from version steps/2 on (first workload, first seed)."""
    steps = result["steps"]
    change = steps // 2
    slowdown = args.step_slowdown
    if slowdown is None:
        if "adaptive" not in result["modes"] or cfg is None:
            errors[STEP_RUN] = "needs the adaptive run (or --step-slowdown) to size the slowdown"
            return None
        first = next(iter(result["modes"]["adaptive"]["seeds"].values()))
        slowdown = step_slowdown(first, args.step_factor, cfg["rollout"]["num_generators"])
    seed = args.seeds[0]
    run_sets = [f"seed={seed}", *sets, *args.overrides, "adaptive_async.mode=adaptive",
                f"rollout.slowdown_schedule=[[{change}, {slowdown!r}]]"]
    rows, cfg, err = run_train(STEP_RUN, run_sets, steps, root / "adaptive_step")
    if err:
        errors[STEP_RUN] = err
        return None
    return {"rows": rows, "group_size": cfg["rollout"]["group_size"], "slowdown": slowdown,
            "factor": args.step_factor, "response": step_response(rows, change)}


if __name__ == "__main__":
    sys.exit(main())
