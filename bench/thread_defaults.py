"""Thread defaults (`learner.threads` / `rollout.threads` = 0: by mode and cores) against one thread each.

    python bench/thread_defaults.py          # writes bench/results/thread_defaults.json

The built-in example, 40 steps, in sync and adaptive mode, each with the automatic thread counts and with
one thread per process, interleaved, two repeats; samples trained per second after the first step.
"""
import json, subprocess, sys, os
runs = [("sync_auto", ["adaptive_async.mode=sync"]), ("sync_1thread", ["adaptive_async.mode=sync", "learner.threads=1", "rollout.threads=1"]),
        ("adaptive_auto", []), ("adaptive_1thread", ["learner.threads=1", "rollout.threads=1"])]
out = {}
for rep in range(2):
    for name, sets in runs:
        d = f"/tmp/flux-thread-defaults/{name}-{rep}"
        cmd = [sys.executable, "-m", "flux.cli", "train", "--max-steps", "40", "--set", "eval.num_prompts=10", "--out", d]
        for s in sets: cmd += ["--set", s]
        subprocess.run(cmd, capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=True)
        rows = [json.loads(l) for l in open(f"{d}/metrics.jsonl")]
        sps = 128 * (len(rows) - 1) / (rows[-1]["wall_s"] - rows[0]["wall_s"])
        out.setdefault(name, []).append(round(sps, 1))
        print(name, rep, round(sps, 1), flush=True)
import platform
json.dump({"bench": "thread defaults (built-in example, 40 steps, samples/s after the first step)", "runs": out,
           "mean": {k: round(sum(v) / len(v), 1) for k, v in out.items()}, "cpus": os.cpu_count(),
           "platform": platform.platform()}, open(sys.argv[1] if len(sys.argv) > 1 else "bench/results/thread_defaults.json", "w"), indent=1)
