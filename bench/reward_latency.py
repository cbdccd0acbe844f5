"""A slow reward must not slow generation: the built-in example with rewards that take 50 ms per sample.

    python bench/reward_latency.py [--steps 40] [--repeats 2] [--modes adaptive,async] [--json FILE]
                                   [--set KEY=VALUE ...]

Runs the built-in example (`flux train`, no config) once per variant and adaptive_async.mode, the runs
interleaved, each `--repeats` times:

- `instant`: the built-in char_match (microseconds per sample);
- `sleep_50ms`: char_match after `time.sleep(0.05)` (bench/slow_rewards.py), in the reward pool's
  threads (reward_workers, default 128);
- `async_50ms`: the same as an `async def` awaiting `asyncio.sleep(0.05)`;
- `sleep_50ms_1_worker` (only when named in --variants: 40 steps take minutes): the plain function with
  reward_workers=1, one sample at a time (what a reward called inside the generator's loop costs,
  though still beside the engine).

Throughput is the steady state: samples trained after the first step over the wall time they took
(metrics.jsonl `wall_s`). The ratio to `instant` in the same mode is the number the target (within
10 %) is about.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, mean, run_train, write_json  # noqa: E402

VARIANTS = {
    "instant": [],
    "sleep_50ms": ["reward=slow_rewards:slow_char_match"],
    "async_50ms": ["reward=slow_rewards:async_slow_char_match"],
    "sleep_50ms_1_worker": ["reward=slow_rewards:slow_char_match", "reward_workers=1"],
}


def throughput(rows: list[dict], batch: int) -> float:
    """Samples trained per second after the first step."""
    if len(rows) < 2:
        return float("nan")
    return batch * (len(rows) - 1) / max(1e-9, rows[-1]["wall_s"] - rows[0]["wall_s"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--modes", default="adaptive,async")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--variants", default="instant,sleep_50ms,async_50ms")
    ap.add_argument("--json", default="")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    ap.add_argument("--keep", default="", help="Directory for the runs (default: a temporary one).")
    args = ap.parse_args(argv)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])
    root = Path(args.keep or tempfile.mkdtemp(prefix="flux-reward-latency-"))
    names, modes = args.variants.split(","), args.modes.split(",")
    runs: dict[tuple[str, str], list[dict]] = {(m, n): [] for m in modes for n in names}
    for r in range(args.repeats):
        for mode, name in runs:
            sets = [*args.sets, f"adaptive_async.mode={mode}", *VARIANTS[name]]
            rows, cfg, error = run_train(f"{mode}/{name}", sets, args.steps, root / f"{mode}-{name}-{r}")
            if error:
                raise SystemExit(f"reward_latency: {mode}/{name} failed: {error}")
            batch = cfg["learner"]["groups_per_step"] * cfg["rollout"]["group_size"]
            runs[mode, name].append({"samples_per_s": throughput(rows, batch), "wall_s": rows[-1]["wall_s"],
                                     "generator_busy_frac": mean(x["generator_busy_frac"] for x in rows),
                                     "async_ratio": mean(x["async_ratio"] for x in rows),
                                     "reward_mean_last5": mean(x["reward_mean"] for x in rows[-5:])})
    table: dict[str, dict] = {}
    print(f"{'mode':9s} {'variant':22s} {'samples/s':>10s} {'ratio':>7s} {'wall s':>8s} {'gen busy':>9s} {'async':>6s}")
    for (mode, name), v in runs.items():
        base = mean(x["samples_per_s"] for x in runs.get((mode, "instant"), []))
        t = {k: mean(x[k] for x in v) for k in v[0]}
        t.update(ratio_to_instant=t["samples_per_s"] / base, runs=v)
        table.setdefault(mode, {})[name] = t
        print(f"{mode:9s} {name:22s} {t['samples_per_s']:10.1f} {t['ratio_to_instant']:7.2f} {t['wall_s']:8.1f} "
              f"{t['generator_busy_frac']:9.2f} {t['async_ratio']:6.2f}")
    if args.json:
        write_json(args.json, {"bench": "reward_latency", "steps": args.steps, "repeats": args.repeats,
                               "sets": args.sets, "machine": machine(), "modes": table})
    return 0


if __name__ == "__main__":
    sys.exit(main())
