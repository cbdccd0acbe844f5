"""Decode throughput of the built-in engine on the long-tail workload: one call per batch of groups
against continuous batching (groups join the running batch as rows finish).

    python bench/continuous_batching.py [--groups 64] [--before-tree /tmp/flux-before] [--json FILE]

The workload is the built-in `repeat` task on its warm-started tiny model (completions of 1 to 64 tokens,
a long tail), 16 samples per prompt, 4 groups in flight (as `rollout.groups_per_call=4`, the default before 2026-12-06), one
torch thread, temperature 1. Three ways through the same prompts, side by side in one process each:

- `calls`: `engine.generate` on 4 groups at a time (a call ends with its longest row);
- `continuous`: `add` / `step` with up to 4 groups' rows in flight (as the generator drives it);
- `calls_before` (with `--before-tree`): `calls` run by another checkout's engine, e.g. the commit before
  continuous batching, where finished rows still rode along to the end of the call.

Reported per way: generated tokens per second of engine time, decode steps, and the mean share of the
batch's rows doing useful work per decode step (tokens / (steps × rows in the batch at its widest)).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# this checkout's flux, installed or not (FLUX_BENCH_TREE: another checkout's, for calls_before)
sys.path.insert(0, os.environ.get("FLUX_BENCH_TREE") or str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json

GROUP, IN_FLIGHT, MAX_NEW = 16, 4, 64


def workload(groups: int):
    import torch
    from transformers import AutoTokenizer

    from flux.data import render_prompt
    from flux.engine.base import SamplingParams
    from flux.integrations.builtin.tasks import repeat_records
    from flux.integrations.builtin.tiny import ensure_default_model

    torch.set_num_threads(1)
    path = ensure_default_model(task="repeat")
    tok = AutoTokenizer.from_pretrained(path)
    records = repeat_records()
    prompts = [render_prompt(records[i % len(records)], tok) for i in range(groups)]
    stops = (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"))
    return path, prompts, SamplingParams(MAX_NEW, 1.0, 1.0, 0, stops, seed=1)


def run(way: str, groups: int) -> dict:
    from flux.engine.torch_engine import TorchEngine

    path, prompts, sampling = workload(groups)
    engine = TorchEngine.from_pretrained(str(path), seed=0)
    engine.generate([prompts[0]] * GROUP, sampling)  # warm-up, not counted
    engine.tokens_generated, engine.busy_seconds = 0, 0.0
    lengths, t0 = [], time.perf_counter()
    if way == "calls":
        for i in range(0, groups, IN_FLIGHT):
            outs = engine.generate([p for p in prompts[i:i + IN_FLIGHT] for _ in range(GROUP)], sampling)
            lengths += [len(c.token_ids) for c in outs]
        steps = None  # a call's decode steps: its longest row
    else:
        steps, nxt, done = 0, 0, 0
        while done < groups:
            while nxt < groups and engine.rows_in_flight + GROUP <= IN_FLIGHT * GROUP:
                engine.add(nxt, [prompts[nxt]] * GROUP, sampling)
                nxt += 1
            for _, outs in engine.step():
                done += 1
                lengths += [len(c.token_ids) for c in outs]
            steps += 1
    wall = time.perf_counter() - t0
    if steps is None:  # calls: each call of IN_FLIGHT groups decodes as long as its longest row
        steps = sum(max(lengths[i:i + IN_FLIGHT * GROUP]) for i in range(0, len(lengths), IN_FLIGHT * GROUP))
    tokens = sum(lengths)
    return {"tokens": tokens, "wall_s": round(wall, 3), "busy_s": round(engine.busy_seconds, 3),
            "tokens_per_s": round(tokens / engine.busy_seconds, 1), "decode_steps": steps,
            "useful_row_frac": round(tokens / (steps * IN_FLIGHT * GROUP), 3),
            "length_p50": sorted(lengths)[len(lengths) // 2], "length_p99": sorted(lengths)[int(len(lengths) * 0.99)],
            "length_max": max(lengths)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=64)
    ap.add_argument("--before-tree", default="", help="another checkout whose engine runs `calls` as calls_before")
    ap.add_argument("--way", choices=("calls", "continuous"), help=argparse.SUPPRESS)  # one way, as JSON
    ap.add_argument("--json", default="bench/results/continuous_batching.json")
    args = ap.parse_args()
    if args.way:
        print(json.dumps(run(args.way, args.groups)))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    me = [sys.executable, __file__, "--groups", str(args.groups), "--way"]
    ways = [("calls", me + ["calls"], env), ("continuous", me + ["continuous"], env)]
    if args.before_tree:
        ways.append(("calls_before", me + ["calls"], {**env, "FLUX_BENCH_TREE": str(Path(args.before_tree).resolve())}))
    out = {}
    for repeat in range(2):  # interleaved, so a slow moment of the machine hits every way
        for name, cmd, e in ways:
            res = json.loads(subprocess.run(cmd, capture_output=True, text=True, env=e, check=True).stdout.splitlines()[-1])
            out.setdefault(name, []).append(res)
            print(f"{name} (repeat {repeat}): {res['tokens_per_s']:.0f} tokens/s, {res['decode_steps']} steps, "
                  f"useful rows {res['useful_row_frac']:.2f}", flush=True)
    best = {k: max(r["tokens_per_s"] for r in v) for k, v in out.items()}
    summary = {"tokens_per_s_best": best,
               "continuous_over_calls": round(best["continuous"] / best["calls"], 2)}
    if "calls_before" in best:
        summary["continuous_over_calls_before"] = round(best["continuous"] / best["calls_before"], 2)
    print(json.dumps(summary))
    write_json(args.json, {"bench": "built-in engine decode throughput, long-tail repeat task", "groups": args.groups,
                           "group_size": GROUP, "groups_in_flight": IN_FLIGHT, "max_new_tokens": MAX_NEW,
                           "machine": machine(), "runs": out, **summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
