"""Encode and decode rates of the wire protocol (flux.run.protocol) for the messages a run sends most.

    python bench/protocol_codec.py [--json FILE] [--seconds S]

Each message is encoded (validated, to frames) and decoded (validated, arrays as views of the frames)
in a loop for about ``--seconds``; the rate is messages per second on one core. The shapes follow the
built-in example: a group is 8 samples of 32 tokens, a batch is 16 such groups.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, write_json  # noqa: E402

from flux.run import protocol as P  # noqa: E402


def group(gid: int, n: int = 8, length: int = 32) -> P.TrajectoryGroup:
    total = n * length
    return P.TrajectoryGroup(
        group_id=gid, prompt_index=gid, generator="gen-0", sample_count=n,
        prompt_ids=np.arange(24, dtype="<i4"), response_ids=np.arange(total, dtype="<i4") % 500,
        response_lens=np.full(n, length, "<i4"), logprobs=-np.ones(total, "<f4"),
        versions=np.full(total, 3, "<i4"), rewards=np.zeros(n, "<f4"), finish=np.ones(n, "<u1"),
        gen_seconds=0.25, meta={"task": "sort"})


def messages() -> dict[str, P.Message]:
    return {
        "Heartbeat": P.Heartbeat(role="generator", name="gen-0", busy_frac=0.5,
                                 stats={"tok_s": 1234.5, "groups": 17, "loaded": 3}),
        "Admit": P.Admit(groups=[{"group_id": i, "prompt_index": i, "token": "ab" * 16} for i in range(4)],
                         version=3, weights={"kind": "shm", "version": 3, "name": "flux_x_3", "nbytes": 64}),
        "StepReport": P.StepReport(step=3, version=3, metrics={f"m{i}": float(i) for i in range(40)}),
        "TrajectoryGroup": group(1),
        "Batch": P.Batch.from_groups(3, [group(i) for i in range(16)]),
    }


def rate(fn, seconds: float) -> float:
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for _ in range(100):
            fn()
        n += 100
    return n / dt


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args(argv)
    rows = {}
    for name, msg in messages().items():
        frames = [bytes(f) for f in P.encode(msg)]
        rows[name] = {"encode_per_s": rate(lambda: P.encode(msg), args.seconds),
                      "decode_per_s": rate(lambda: P.decode(frames), args.seconds),
                      "header_bytes": len(frames[0])}
        print(f"{name:16s} encode {rows[name]['encode_per_s']:10,.0f}/s  decode {rows[name]['decode_per_s']:10,.0f}/s"
              f"  header {rows[name]['header_bytes']} B", flush=True)
    if args.json:
        write_json(args.json, {"machine": machine(), "messages": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
