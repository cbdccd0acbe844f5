"""Does the built-in example learn for every seed? Runs `flux train` once per seed, back to back.

    python bench/example_seeds.py --seeds 0 1 2 3 [--json bench/results/example_seeds.json] [--set k=v ...]

Prints a table (reward over the first 5 and the last 10% of steps, held-out eval before and after, wall
time, samples/s) and writes JSON. Runs are sequential so they do not compete for cores.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def run_seed(seed: int, extra: list[str], out_root: Path) -> dict:
    out = out_root / f"seed{seed}"
    cmd = [sys.executable, "-m", "flux.cli", "train", "--out", str(out), "--set", f"seed={seed}"]
    for item in extra:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"seed": seed, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    k, j = max(1, len(rows) // 10), min(5, len(rows))
    return {
        "seed": seed, "steps": len(rows),
        "reward_first": sum(r["reward_mean"] for r in rows[:j]) / j,
        "reward_last": sum(r["reward_mean"] for r in rows[-k:]) / k,
        "reward_step1": rows[0]["reward_mean"],
        "eval_before": rows[0].get("eval_score"), "eval_after": rows[-1].get("eval_score"),
        "wall_s": rows[-1]["wall_s"], "samples_per_s": rows[-1]["samples_per_s"],
        "staleness_mean": sum(r["staleness_mean"] for r in rows) / len(rows),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--json", default="bench/results/example_seeds.json")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = []
        for seed in args.seeds:
            results.append(run_seed(seed, args.overrides, Path(tmp)))
            print(f"seed {seed} done", file=sys.stderr)
    head = f"{'seed':>4} {'steps':>5} {'reward first 5→last 10%':>24} {'eval before→after':>18} {'wall s':>7} {'samples/s':>9}"
    print(head)
    for r in results:
        if "error" in r:
            print(f"{r['seed']:>4} failed: {r['error']}")
            continue
        print(f"{r['seed']:>4} {r['steps']:>5} {r['reward_first']:>10.3f} → {r['reward_last']:<9.3f} "
              f"{r['eval_before']:>8.3f} → {r['eval_after']:<7.3f} {r['wall_s']:>7.0f} {r['samples_per_s']:>9.0f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"machine": {"cpus": __import__("os").cpu_count(),
                                                      "platform": platform.platform()},
                                           "overrides": args.overrides, "runs": results}, indent=1))
    print(f"wrote {args.json}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
