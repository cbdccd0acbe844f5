"""Publish-to-loaded time of one weights version, next to a plain memcpy of the same bytes in the same run.

    python bench/weight_sync.py [--sizes 10M 100M 500M] [--repeats 3] [--json bench/results/weight_sync.json]

Weights are random fp32 tensors with the shapes of a Qwen2 model (10M and 100M: the architecture scaled
down; 500M: Qwen2-0.5B's own config, tied embeddings). For each size, in this order (memory is freed
between cases; 500M is 2 GB a copy, and the TCP case holds four: the state dict, the shm slot, the
server's snapshot and the reader's buffer):

- memcpy: `np.copyto` of the same number of bytes into a buffer whose pages are already mapped (`warm`),
  and into a fresh one (`fresh`, page faults included: what any loader allocating its result pays).
- shm: `WeightPublisher.publish` in this process -> `load_weights` in a reader process (flux/run/weights.py:
  the writer copies the state dict into a locked slot; the reader maps each slot once and returns views
  of it). Time from calling publish to the reader holding the state dict. shm-checksum: the same with
  the optional checksum, summed by the writer as it copies and verified by the reader.
- tcp-curve / tcp-plain: publish to shm -> the weight server (a thread here, as in the controller process)
  snapshots the slot -> `WeightFetcher.fetch` in the reader process over TCP loopback, CURVE-encrypted or
  plain (net.weight_stream) -> chunks assembled and checked -> state dict. Same clock.

"loaded" = the reader process holds the whole state dict (what `engine.load_weights` is handed; copying it into a model is the engine's business and the same for every path). Times are
medians over --repeats versions after two warm-up versions (one per shm slot), with the fastest version
in brackets (on a shared machine, the least disturbed one). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

# hidden, layers, vocab, intermediate, heads, kv heads (Qwen2 layout: q/k/v biases, RMSNorms, SwiGLU)
CONFIGS = {
    "10M": (256, 6, 16384, 1024, 4, 2),
    "100M": (768, 12, 32000, 2048, 12, 4),
    "500M": (896, 24, 151936, 4864, 14, 2),  # Qwen2-0.5B
}


def qwen2_shapes(hidden: int, layers: int, vocab: int, inter: int, heads: int, kv_heads: int) -> dict:
    kv = kv_heads * (hidden // heads)
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
            p + "mlp.down_proj.weight": (hidden, inter),
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,)})
    shapes["model.norm.weight"] = (hidden,)
    return shapes


PATHS = ["shm", "shm-checksum", "tcp-plain", "tcp-curve"]


def state_dict(size: str, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {k: torch.rand(s, generator=g) for k, s in qwen2_shapes(*CONFIGS[size]).items()}


# ---------------------------------------------------------------- the reader process
def reader(conn, keys: str, window: int) -> None:
    """Loads what it is told to and answers (t_start, t_loaded, nbytes) on the shared monotonic clock."""
    import torch
    import zmq

    torch.set_num_threads(1)
    from flux.integrations.remote.auth import client_keys
    from flux.integrations.remote.weight_stream import WeightFetcher
    from flux.run.weights import load_weights

    ctx = zmq.Context()
    fetchers: dict[str, WeightFetcher] = {}
    while True:
        msg = conn.recv()
        if msg is None:
            break
        kind, version, arg = msg
        t0 = time.perf_counter()
        if kind.startswith("shm"):
            sd = load_weights(arg)
        else:
            if arg not in fetchers:
                curve = client_keys(Path(keys, "bench.key_secret")) if kind == "tcp-curve" else None
                fetchers[arg] = WeightFetcher(ctx, arg, curve, window=window, stall_s=30.0)
            sd = fetchers[arg].fetch(version)
        t1 = time.perf_counter()
        nbytes = -1 if sd is None else sum(t.numel() * t.element_size() for t in sd.values())
        del sd
        gc.collect()
        conn.send((t0, t1, nbytes))
    for f in fetchers.values():
        f._close()
    ctx.term()


# ---------------------------------------------------------------- the cases
def time_memcpy(nbytes: int, repeats: int) -> dict:
    src = np.empty(nbytes, np.uint8)
    src[:] = 1
    dst = np.empty_like(src)
    dst[:] = 0
    warm, fresh = [], []
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        warm.append(time.perf_counter() - t)
    del dst
    for _ in range(repeats):
        t = time.perf_counter()
        out = np.empty_like(src)
        np.copyto(out, src)
        fresh.append(time.perf_counter() - t)
        del out
    return {"warm_s": statistics.median(warm), "fresh_s": statistics.median(fresh)}


def time_path(kind: str, sd: dict, conn, repeats: int, keys: str, chunk_bytes: int, tag: str) -> dict:
    """Medians over `repeats` versions (after a warm-up) for shm or a tcp stream: publish-to-loaded
    (`total_s`), the publish call (`publish_s`), and the reader's part (`load_s`: from its start to the
    verified state dict; for tcp this includes the server's snapshot of the slot)."""
    import zmq

    from flux.integrations.remote.weight_stream import WeightServer
    from flux.run.weights import WeightPublisher

    pub = WeightPublisher(f"flux-bench-{os.getpid()}-{tag}", slots=2, checksum=kind == "shm-checksum")
    ctx = server = gate = None
    if not kind.startswith("shm"):
        from flux.integrations.remote.auth import Gatekeeper

        ctx = zmq.Context()
        gate = Gatekeeper(ctx, keys, logging.getLogger("bench"))
        gate.start()
        server = WeightServer(ctx, "tcp://127.0.0.1:0", keys if kind == "tcp-curve" else None, chunk_bytes)
        server.start()
        server.ready.wait(10)
    rows = []
    try:
        warmup = 2  # one version per shm slot: both segments exist (and are mapped) before timing
        for version in range(1, repeats + warmup + 1):
            t0 = time.perf_counter()
            handle = pub.publish(version, sd)
            t1 = time.perf_counter()
            if server is not None:
                server.announce(handle)
            conn.send((kind, version, server.endpoint if server else handle))
            r0, r1, nbytes = conn.recv()
            if nbytes != handle["nbytes"] and nbytes < 0:
                raise RuntimeError(f"{kind}: version {version} was not loaded")
            if version > warmup:  # warm-up: segments created, sockets connected, imports done
                rows.append({"total_s": r1 - t0, "publish_s": t1 - t0, "load_s": r1 - r0})
                print(f"    {kind} v{version}: {rows[-1]}", file=sys.stderr, flush=True)
    finally:
        if server is not None:
            server.stop()
            gate.stop()
            ctx.term()
        pub.close()
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out.update({f"{k}_min": min(r[k] for r in rows) for k in rows[0]})  # the least disturbed version
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--paths", nargs="+", default=PATHS, choices=PATHS)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-kb", type=int, default=4096, help="net.weight_chunk_kb")
    ap.add_argument("--window", type=int, default=4, help="net.weight_window")
    ap.add_argument("--json", default=str(ROOT / "bench/results/weight_sync.json"))
    ap.add_argument("--note", default="", help="what else ran on the machine, kept in the JSON")
    args = ap.parse_args()

    import torch
    from common import machine

    from flux.integrations.remote.auth import make_keys

    torch.set_num_threads(1)
    keys = tempfile.mkdtemp(prefix="flux-bench-keys-")
    make_keys(keys, ["bench"])
    spawn = mp.get_context("spawn")
    parent, child = spawn.Pipe()
    proc = spawn.Process(target=reader, args=(child, keys, args.window), daemon=True)
    proc.start()
    results = []
    try:
        for size in args.sizes:
            sd = state_dict(size)
            params = sum(t.numel() for t in sd.values())
            nbytes = sum(t.numel() * t.element_size() for t in sd.values())
            print(f"{size}: {params / 1e6:.1f}M params, {nbytes / 2**20:.0f} MiB", file=sys.stderr, flush=True)
            row = {"size": size, "params": params, "bytes": nbytes, "memcpy": time_memcpy(nbytes, args.repeats)}
            gc.collect()
            for kind in args.paths:
                row[kind] = time_path(kind, sd, parent, args.repeats, keys, args.chunk_kb * 1024, size)
                gc.collect()
                print(f"  {kind}: {row[kind]['total_s']:.3f}s", file=sys.stderr, flush=True)
            results.append(row)
            del sd
            gc.collect()
    finally:
        parent.send(None)
        proc.join(30)
    print_table(results)
    out = {"machine": {**machine(), "note": args.note},
           "chunk_kb": args.chunk_kb, "window": args.window, "repeats": args.repeats, "results": results}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")


def print_table(results: list[dict]) -> None:
    print("| size | MiB | memcpy warm / fresh | path | publish-to-loaded (min) | × memcpy warm / fresh "
          "| reader's part | GB/s end to end / reader |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        warm, fresh = r["memcpy"]["warm_s"], r["memcpy"]["fresh_s"]
        for kind in PATHS:
            if kind not in r:
                continue
            t, load = r[kind]["total_s"], r[kind]["load_s"]
            print(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['bytes'] / 2**20:.0f} | {warm * 1e3:.0f} / "
                  f"{fresh * 1e3:.0f} ms | {kind} | {t * 1e3:.0f} ({r[kind]['total_s_min'] * 1e3:.0f}) ms | "
                  f"{t / warm:.1f} / {t / fresh:.1f} | "
                  f"{load * 1e3:.0f} ms | {r['bytes'] / t / 1e9:.2f} / {r['bytes'] / load / 1e9:.2f} |")


if __name__ == "__main__":
    main()
