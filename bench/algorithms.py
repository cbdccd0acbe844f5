"""Every algorithm on the built-in task, for the same number of samples, back to back.

    python bench/algorithms.py [--samples 25600] [--seed 0] [--only grpo ppo ...] [--set KEY=VALUE ...]
                               [--json bench/results/algorithms.json]

One `flux train` per algorithm (default config: adaptive asynchrony, 128 samples per step), runs never
in parallel. Every run sees `--samples` samples: steps = samples / samples-per-step, so offline DPO (two
samples per pair, 16 per step) takes 8× as many steps as the others. Prints a table (reward over the
first 5 steps → last 10%, held-out greedy eval before → after, DPO preference accuracy, samples/s, wall
time) and writes JSON with the machine it ran on.

The DPO rows use `learner.lr=3e-4` (DPO's log-ratio objective has no clip; at the RL default of 1e-3
online DPO on small batches overshoots): `dpo` learns from the built-in preference pairs (right vs wrong
sort answers), `dpo-rpo` the same with the NLL of the chosen answers added (`algo.sft_coef=1`),
`dpo-online` from best-vs-worst pairs of its own samples, scored by the reward function.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flux, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mean, run_train

# name → (extra --set items, samples per step with the default groups_per_step of 8)
RUNS = {
    "grpo": ([], 128),
    "ppo": ([], 128),
    "rloo": ([], 128),
    "reinforce": ([], 128),
    "reinforce_pp": ([], 128),
    "dapo": (["dynamic_sampling=true", "algo.overlong_cache=4"], 128),
    "dpo": (["prompts=builtin:sort_pairs", "learner.lr=3e-4"], 16),
    "dpo-rpo": (["prompts=builtin:sort_pairs", "learner.lr=3e-4", "algo.sft_coef=1.0"], 16),
    "dpo-online": (["learner.lr=3e-4"], 128),
}


def summarize(rows: list[dict]) -> dict:
    k, j = max(1, len(rows) // 10), min(5, len(rows))
    out = {
        "steps": len(rows), "samples": sum(int(r.get("samples", 0)) for r in rows),
        "reward_first": mean(r["reward_mean"] for r in rows[:j]),
        "reward_last": mean(r["reward_mean"] for r in rows[-k:]),
        "eval_before": rows[0].get("eval_score"), "eval_after": rows[-1].get("eval_score"),
        "samples_per_s": rows[-1]["samples_per_s"], "wall_s": rows[-1]["wall_s"],
        "staleness_mean": mean(r["staleness_mean"] for r in rows),
    }
    if "pref_acc" in rows[-1]:
        out["pref_acc_last"] = mean(r["pref_acc"] for r in rows[-k:])
    return out


def format_table(results: dict[str, dict]) -> str:
    lines = [(f"{'algorithm':<13} {'steps':>5} {'samples':>7} {'reward first→last':>18} "
              f"{'eval before→after':>18} {'pref acc':>8} {'samples/s':>9} {'wall s':>6}")]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"{name:<13} failed: {r['error']}")
            continue
        pref = f"{r['pref_acc_last']:.2f}" if "pref_acc_last" in r else "-"
        lines.append(f"{name:<13} {r['steps']:>5} {r['samples']:>7} {r['reward_first']:>8.3f} → "
                     f"{r['reward_last']:<7.3f} {r['eval_before']:>8.3f} → {r['eval_after']:<7.3f} "
                     f"{pref:>8} {r['samples_per_s']:>9.0f} {r['wall_s']:>6.0f}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=25600, help="samples per algorithm (default: 200 steps × 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", nargs="+", choices=sorted(RUNS), default=list(RUNS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", default="bench/results/algorithms.json")
    args = ap.parse_args()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            extra, per_step = RUNS[name]
            algorithm = name.partition("-")[0]
            sets = [f"algorithm={algorithm}", f"seed={args.seed}", *extra, *args.overrides]
            steps = max(1, args.samples // per_step)
            rows, _, error = run_train(name, sets, steps, Path(tmp) / name)
            results[name] = {"error": error} if error else {**summarize(rows), "config": sets}
    print(format_table(results))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": machine(), "samples": args.samples, "seed": args.seed,
                                           "results": results}, indent=2))
    print(f"wrote {args.json}", file=sys.stderr)
    return 0 if not any("error" in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
