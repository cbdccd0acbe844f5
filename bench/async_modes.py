"""Sync vs async vs adaptive on the built-in workload, and the controller's answer to a step change.

    python bench/async_modes.py [--max-steps 300] [--seed 0] [--step-change] [--set KEY=VALUE ...]
                                [--json bench/results/async_modes.json] [--plot bench/results/async_modes.png]

Runs `flux train` once per `adaptive_async.mode` (`sync`, `async`, `adaptive`), back to back and never
in parallel (they would compete for the cores), with the same seed and number of steps, so every mode
trains on the same number of samples. Prints a table, writes JSON and a PNG (matplotlib, the `bench`
extra), and says whether the adaptive controller meets the targets of its issue:

    throughput  adaptive samples/s ≥ 1.6 × sync
    staleness   adaptive mean staleness within ±0.05 of the target, and < 0.2
    quality     adaptive final held-out eval ≥ sync's − 0.05

`--step-change` adds one more adaptive run whose generation becomes `--step-factor` times slower from
policy version max_steps/2 on (`rollout.slowdown_schedule`), and a second PNG of the async ratio and
staleness around the change. The extra seconds per token are derived from the plain adaptive run's own
generator time per token (`--step-slowdown` sets them directly).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flux, installed or not
from flux.integrations.tools.plot import pyplot, save, smooth, window_rate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import have_matplotlib, run_train, write_json

MODES = ("sync", "async", "adaptive")
STEP_RUN = "adaptive+step"
SPEEDUP_MIN = 1.6       # adaptive samples/s over sync
STALENESS_BAND = 0.05   # |mean staleness − target|
STALENESS_MAX = 0.2     # the stability promise (DESIGN.md section 2)
EVAL_SLACK = 0.05       # adaptive eval may trail sync by this much


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


def summarize(rows: list[dict], group_size: int) -> dict:
    """One run's metrics.jsonl rows → the table/JSON fields.

    Throughputs and busy fractions are the run's cumulative values (the last row); staleness and lag are
    taken over every step; the final reward is the mean over the last 10% of steps.
    """
    last, k = rows[-1], max(1, len(rows) // 10)
    stale = [r["staleness_mean"] for r in rows]
    dropped_groups = int(last.get("dropped_stale", 0))
    return {
        "steps": len(rows),
        "samples": sum(int(r.get("samples", 0)) for r in rows),
        "wall_s": last["wall_s"],
        "samples_per_s": last["samples_per_s"],
        "tokens_per_s": last["tokens_per_s"],
        "learner_busy_frac": last.get("learner_busy_frac", float("nan")),
        "generator_busy_frac": last.get("generator_busy_frac", float("nan")),
        "staleness_mean": mean(stale),
        "staleness_p95": percentile(stale, 95),
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
    }


def speedups(summaries: dict[str, dict], base: str = "sync") -> dict[str, float]:
    """samples/s of every run over the base mode's."""
    if base not in summaries:
        return {}
    ref = summaries[base]["samples_per_s"]
    return {name: s["samples_per_s"] / ref for name, s in summaries.items()}


def check_targets(summaries: dict[str, dict], target: float) -> list[dict]:
    """The issue's three targets for the adaptive mode against sync: [{name, ok, detail}]."""
    ad, sy = summaries.get("adaptive"), summaries.get("sync")
    if ad is None or sy is None:
        return []
    ratio = ad["samples_per_s"] / sy["samples_per_s"]
    s = ad["staleness_mean"]
    out = [
        {"name": "throughput", "ok": ratio >= SPEEDUP_MIN,
         "detail": f"adaptive/sync samples/s = {ratio:.2f} (need ≥ {SPEEDUP_MIN})"},
        {"name": "staleness", "ok": abs(s - target) <= STALENESS_BAND and s < STALENESS_MAX,
         "detail": f"adaptive mean staleness {s:.3f} "
                   f"(need {target:.2f} ± {STALENESS_BAND} and < {STALENESS_MAX})"},
    ]
    if ad["eval_final"] is not None and sy["eval_final"] is not None:
        out.append({"name": "quality", "ok": ad["eval_final"] >= sy["eval_final"] - EVAL_SLACK,
                    "detail": f"adaptive eval {ad['eval_final']:.3f} vs sync {sy['eval_final']:.3f} "
                              f"(need ≥ sync − {EVAL_SLACK})"})
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
    ("mode", None, ""), ("steps", "steps", "d"), ("wall s", "wall_s", ".0f"),
    ("samples/s", "samples_per_s", ".1f"), ("tokens/s", "tokens_per_s", ".0f"),
    ("×sync", "speedup", ".2f"), ("learn busy", "learner_busy_frac", ".2f"),
    ("gen busy", "generator_busy_frac", ".2f"), ("stale mean", "staleness_mean", ".3f"),
    ("stale p95", "staleness_p95", ".3f"), ("lag mean", "lag_mean", ".2f"), ("lag max", "lag_max", ".0f"),
    ("async", "async_ratio_mean", ".2f"), ("dropped", "dropped_samples", "d"),
    ("reward", "reward_final", ".3f"), ("eval", "eval_final", ".3f"),
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
            cells.append(cell("-" if value is None else format(value, fmt), key, w))
        lines.append(" ".join(cells))
    for name, err in (errors or {}).items():
        lines.append(f"{name.ljust(widths[0])} failed: {err}")
    return "\n".join(lines)


# ---- running ----------------------------------------------------------------------------------------

def plot_modes(runs: dict[str, list[dict]], target: float, path: str) -> None:
    """Reward vs wall time; staleness (target dashed) and async ratio vs step, one line per mode."""
    plt = pyplot()
    fig, (ax_r, ax_s, ax_a) = plt.subplots(1, 3, figsize=(16, 4.5))
    for name, rows in runs.items():
        w = max(1, len(rows) // 50)
        steps = [r["step"] for r in rows]
        ax_r.plot([r["wall_s"] for r in rows], smooth([r["reward_mean"] for r in rows], w), label=name)
        ax_s.plot(steps, smooth([r["staleness_mean"] for r in rows], w), label=name)
        ax_a.plot(steps, [r["async_ratio"] for r in rows], label=name)
    ax_s.axhline(target, ls="--", c="k", lw=1, label=f"target {target:g}")
    ax_r.set(xlabel="wall time (s)", ylabel="reward (moving mean)", title="reward vs wall time")
    ax_s.set(xlabel="step", ylabel="staleness S (moving mean)", title="staleness")
    ax_a.set(xlabel="step", ylabel="async ratio a", title="async ratio", ylim=(-0.05, 1.05))
    for ax in (ax_r, ax_s, ax_a):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, path)


def plot_step_change(rows: list[dict], change_step: int, target: float, factor: float, path: str) -> None:
    """Async ratio, staleness (raw, and the controller's EMA) and samples/s around the step change."""
    plt = pyplot()
    steps = [r["step"] for r in rows]
    w = max(2, len(rows) // 30)
    rate = [window_rate(rows[max(0, i - w):i + 1]) for i in range(len(rows))]
    fig, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    axes[0].plot(steps, [r["async_ratio"] for r in rows], c="C2")
    axes[0].set(ylabel="async ratio a", ylim=(-0.05, 1.05),
                title=f"adaptive: generation {factor:g}× slower from step {change_step}")
    axes[1].plot(steps, [r["staleness_mean"] for r in rows], c="C0", alpha=0.35, lw=0.8, label="S per step")
    axes[1].plot(steps, [r.get("staleness_ema") or 0.0 for r in rows], c="C0", label="S EMA (controller)")
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
    ap.add_argument("--max-steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
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
    args = ap.parse_args()

    tmp = None if args.runs_dir else tempfile.TemporaryDirectory()
    root = Path(args.runs_dir or tmp.name)
    common = [f"seed={args.seed}", *args.overrides]
    runs: dict[str, list[dict]] = {}
    summaries: dict[str, dict] = {}
    errors: dict[str, str] = {}
    configs: dict[str, dict] = {}
    try:
        for mode in args.modes:
            sets = common + [f"adaptive_async.mode={mode}"]
            rows, cfg, err = run_train(mode, sets, args.max_steps, root / mode)
            if err:
                errors[mode] = err
                continue
            runs[mode], configs[mode] = rows, cfg
            summaries[mode] = summarize(rows, cfg["rollout"]["group_size"])
        step = None
        if args.step_change:
            step = run_step_change(args, common, root, summaries, configs, errors)
            if step is not None:
                summaries[STEP_RUN] = summarize(step["rows"], step["group_size"])
    finally:
        if tmp is not None:
            tmp.cleanup()

    cfg = next(iter(configs.values()), {"adaptive_async": {"target_staleness": 0.1}})
    target = float(cfg["adaptive_async"]["target_staleness"])
    print(format_table(summaries, errors))
    targets = check_targets(summaries, target)
    for t in targets:
        print(f"target {t['name']:<10} {'MET ' if t['ok'] else 'MISS'}  {t['detail']}")
    if step is not None:
        sr = step["response"]
        print(f"step change at step {sr['change_step']} (+{step['slowdown']:.2e} s/token): async ratio "
              f"{sr['async_ratio_before']:.2f} → {sr['async_ratio_after']:.2f}, staleness "
              f"{sr['staleness_before']:.3f} → {sr['staleness_after']:.3f}, samples/s "
              f"{sr['samples_per_s_before']:.1f} → {sr['samples_per_s_after']:.1f}")

    result = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "args": vars(args), "target_staleness": target, "runs": summaries, "errors": errors,
        "speedup_vs_sync": speedups(summaries), "targets": targets,
        "step_change": None if step is None else {k: v for k, v in step.items() if k != "rows"},
    }
    write_json(args.json, result)
    if not have_matplotlib():
        return 1 if errors else 0
    if runs:
        plot_modes(runs, target, args.plot)
        print(f"wrote {args.plot}")
    if step is not None:
        change = step["response"]["change_step"]
        plot_step_change(step["rows"], change, target, args.step_factor, args.step_plot)
        print(f"wrote {args.step_plot}")
    return 1 if errors else 0


def run_step_change(args, common: list[str], root: Path, summaries: dict, configs: dict,
                    errors: dict) -> dict | None:
    """The adaptive mode with generation slowed down from version max_steps/2 on."""
    change = args.max_steps // 2
    slowdown = args.step_slowdown
    if slowdown is None:
        if "adaptive" not in summaries:
            errors[STEP_RUN] = "needs the adaptive run (or --step-slowdown) to size the slowdown"
            return None
        gens = configs["adaptive"]["rollout"]["num_generators"]
        slowdown = step_slowdown(summaries["adaptive"], args.step_factor, gens)
    sets = common + ["adaptive_async.mode=adaptive", f"rollout.slowdown_schedule=[[{change}, {slowdown!r}]]"]
    rows, cfg, err = run_train(STEP_RUN, sets, args.max_steps, root / "adaptive_step")
    if err:
        errors[STEP_RUN] = err
        return None
    return {"rows": rows, "group_size": cfg["rollout"]["group_size"], "slowdown": slowdown,
            "factor": args.step_factor, "response": step_response(rows, change)}


if __name__ == "__main__":
    sys.exit(main())
