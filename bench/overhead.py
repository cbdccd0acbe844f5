"""Flux's own overhead on the built-in example: start, steady state, stop.

    python bench/overhead.py [--steps 40] [--json FILE] [--set KEY=VALUE ...]

Runs `flux train` (the built-in example, or it with --set overrides) as a user would and splits its
wall time with the timelines every process of the run saves (RUN_DIR/logs/<name>.timeline.json, see
flux.run.runtime.Timeline) and the per-step timings of metrics.jsonl:

- launch to first trained step: the command's imports and config, the run's preparation (prompts,
  model, spec), the launcher's import of the actors' code (torch, transformers, modelling code: once,
  then it forks them; nothing where it spawns fresh interpreters, see flux/integrations/cpu/fork.py), starting
  the actors, each actor's imports and model/engine load (near zero for a forked actor), the learner's
  initial held-out eval, the wait for the first batch and the first step itself;
- per step (mean over the steps after the first two): generation (the generators' busy time per step),
  the learner's wait for a batch, its separate log-prob passes, the optimizer step (forward with grad,
  backward, update), the weight publish, the generator's weight load, and the rest of the learner's
  step (staleness signals, metrics, messaging);
- last step to exit: the learner's final eval, checkpoint and goodbye; the other actors' exit; the
  launcher's summary and interpreter exit.

Prints a table and which part dominates; `--json` writes it with top-level `first_step_s` and
`exit_after_last_step_s`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, mean, write_json  # noqa: E402


def run(steps: int, sets: list[str], out: Path) -> tuple[float, float, int, str]:
    cmd = [sys.executable, "-m", "flux.cli", "train", "--out", str(out), "--max-steps", str(steps)]
    for s in sets:
        cmd += ["--set", s]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return t0, time.time(), proc.returncode, (proc.stdout + proc.stderr)[-2000:]


def timelines(run_dir: Path) -> dict[str, dict]:
    return {p.name.removesuffix(".timeline.json"): json.loads(p.read_text())
            for p in (run_dir / "logs").glob("*.timeline.json")}


def analyse(t_launch: float, t_exit: float, run_dir: Path) -> dict:
    tl = timelines(run_dir)
    missing = {"launcher", "learner", "controller", "buffer", "gen0"} - set(tl)
    if missing:
        raise SystemExit(f"overhead: no timeline from {sorted(missing)} in {run_dir}/logs")
    L, G, launcher = tl["learner"]["marks"], tl["gen0"]["marks"], tl["launcher"]["marks"]

    def since(t: float) -> float:
        return t - t_launch

    startup = {
        "command imports and config": launcher["run"] - t_launch,
        "prepare (prompts, model, spec)": launcher["prepared"] - launcher["run"],
        "launcher imports the actors' code, to fork them": launcher["preloaded"] - launcher["prepared"],
        "start actors (fork, or spawn)": launcher["spawned"] - launcher["preloaded"],
        "learner imports (torch)": L["imported"] - L["process"],
        "learner model (transformers, from_pretrained)": L["model"] - L["imported"],
        "learner initial eval and setup": L["ready"] - L["model"],
        "learner wait for first batch": L["first_batch"] - L["ready"],
        "first step": L["first_step"] - L["first_batch"],
        "generator imports": G["imported"] - G["process"],
        "generator torch and transformers": G["libraries"] - G["imported"],
        "generator engine (modelling code, from_pretrained)": G["model"] - G["libraries"],
        "generator setup and register": G["ready"] - G["model"],
    }
    for name in ("controller", "buffer"):
        m = tl[name]["marks"]
        startup[f"{name} imports"] = m["imported"] - m["process"]
    critical = {  # seconds since launch at which the learner reached each point
        "actors spawned": since(launcher["spawned"]), "learner imported": since(L["imported"]),
        "learner model loaded": since(L["model"]), "learner ready": since(L["ready"]),
        "generator ready": since(G["ready"]), "first group pushed": since(G["first_group"]),
        "first batch": since(L["first_batch"]), "first step reported": since(L["first_step"]),
    }
    stop = {
        "last step -> learner exit (final eval, checkpoint, goodbye)": L["exit"] - L["last_step"],
        "learner exit -> every actor stopped": launcher["stopped"] - L["exit"],
        "actors stopped -> command exit (summary, interpreter)": t_exit - launcher["stopped"],
    }
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = rows[2:] or rows
    walls = [b["wall_s"] - a["wall_s"] for a, b in zip(steady, steady[1:])]
    per = {k: mean(r.get(k, 0.0) for r in steady)
           for k in ("step_s", "batch_wait_s", "time_logprobs_s", "time_update_s", "time_publish_s")}
    gen_totals = tl["gen0"]["totals"]
    loads = max(1, gen_totals.get("weight_loads", 0))
    per_step = {
        "step wall time": mean(walls) if walls else float("nan"),
        "generation (generator busy / step)": gen_totals.get("busy_s", 0.0) / max(1, len(rows)),
        "learner waits for a batch": per["batch_wait_s"],
        "learner log-prob passes (no grad)": per["time_logprobs_s"],
        "learner optimizer step (fwd+bwd+update)": per["time_update_s"],
        "learner weight publish": per["time_publish_s"],
        "learner other (signals, metrics, messages)": per["step_s"] - per["time_logprobs_s"]
        - per["time_update_s"] - per["time_publish_s"],
        "generator weight load (per version)": gen_totals.get("weight_load_s", 0.0) / loads,
    }
    learner_tokens = mean(r["tokens"] / max(1e-9, r["time_logprobs_s"] + r["time_update_s"]) for r in steady)
    return {
        "first_step_s": since(L["first_step"]),
        "exit_after_last_step_s": t_exit - L["last_step"],
        "wall_s": t_exit - t_launch,
        "steps": len(rows),
        "startup_parts_s": startup, "startup_critical_path_s": critical,
        "exit_parts_s": stop, "per_step_s": per_step,
        "learner_tokens_per_s": learner_tokens,
        "samples_per_s": rows[-1]["samples_per_s"],
        "dominant": {"startup": max(startup, key=startup.get), "exit": max(stop, key=stop.get),
                     "per_step": max((k for k in per_step if k != "step wall time"), key=per_step.get)},
    }


def show(r: dict) -> None:
    print(f"first step {r['first_step_s']:.2f} s after launch; exit {r['exit_after_last_step_s']:.2f} s "
          f"after the last step; {r['steps']} steps in {r['wall_s']:.1f} s, {r['samples_per_s']:.0f} samples/s, "
          f"learner {r['learner_tokens_per_s']:.0f} tokens/s")
    for title, key in (("start (seconds each part took)", "startup_parts_s"),
                       ("start (seconds since launch)", "startup_critical_path_s"),
                       ("stop", "exit_parts_s"), ("per step (seconds, mean)", "per_step_s")):
        print(f"\n{title}")
        for k, v in r[key].items():
            print(f"  {k:58s} {v:8.3f}")
    print("\ndominant: " + ", ".join(f"{k}: {v}" for k, v in r["dominant"].items()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json")
    ap.add_argument("--keep", help="run directory to keep (default: a temporary one)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(args.keep or tmp) / "run"
        t0, t1, code, tail = run(args.steps, args.sets, run_dir)
        if code != 0:
            print(f"overhead: flux train failed (exit {code}):\n{tail}", file=sys.stderr)
            return 1
        result = analyse(t0, t1, run_dir)
    show(result)
    if args.json:
        write_json(args.json, {"machine": machine(), "sets": args.sets, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main())
