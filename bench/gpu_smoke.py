"""GPU smoke test of the SGLang backend: one command, PASS/FAIL per check, a JSON report.

    python bench/gpu_smoke.py                  # on a GPU machine with sglang installed (<= 8 minutes)
    python bench/gpu_smoke.py --cpu-dry-run    # everything that runs without a GPU (CI runs this)

Nothing is downloaded: the model is the embedded default (a small random Qwen2 built locally with
`save_pretrained`, flux/integrations/builtin/tiny.py). The checks, in order:

  server        a real SGLang server started the way a generator starts it (SGLangServer)
  logprobs_v0   generation at version 0 against the HF model's log-probs of the same tokens
                (mean |delta| <= 0.02)
  ipc_v1        weights by /update_weights_from_tensor (CUDA IPC handles) to version 1, checked with
                /get_weights_by_name, and every later token labelled version 1
  inflight_*    an update while requests run, in each pause mode: per-token versions never go back
  distributed   weights by /update_weights_from_distributed over a gloo group (NCCL cannot pair two
                ranks on one GPU), checked with /get_weights_by_name
  tokens_per_s  generation throughput (256 prompts x 128 tokens, sampled)
  train         `flux train --set rollout.engine=sglang` for 30 steps: reward rises, staleness reported
  torch_bf16    `flux train` on the default backends, learner and built-in engine on the GPU in bf16
                (learner.device/dtype, rollout.device/dtype) for 30 steps: reward rises
  (both train runs report tokens/s of generation and training, learner and generator busy fractions,
  and the weight update time per version and per GB: CUDA IPC into the built-in engine, the SGLang
  update in the other)

With --cpu-dry-run the server is the mock (tests/sglang_mock.py, started by the same SGLangServer),
tensors stay on the CPU (sent by value instead of by IPC handle), the train runs are 4 steps (torch_bf16
on the CPU, bf16 autocast there), and the checks that need the real model (log-probs, a rising reward
on the SGLang mock) say SKIP. Exit code: 0 when nothing FAILs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# float32 and a plain attention backend so the server's log-probs are comparable with the HF model's;
# no tokenizer in the server (Flux sends and reads token ids only).
SERVER_ARGS = ["--dtype", "float32", "--attention-backend", "torch_native", "--disable-cuda-graph",
               "--skip-tokenizer-init", "--mem-fraction-static", "0.3", "--skip-server-warmup"]
TOLERANCE = 0.02


class Report:
    def __init__(self, dry: bool):
        self.dry, self.checks, self.t0 = dry, {}, time.monotonic()

    def run(self, name: str, fn, *args) -> None:
        t = time.monotonic()
        try:
            status, detail = fn(*args)
        except Exception as e:  # noqa: BLE001 (a failed check is reported, the others still run)
            status, detail = "FAIL", {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        detail = {"status": status, "seconds": round(time.monotonic() - t, 2), **detail}
        self.checks[name] = detail
        shown = {k: v for k, v in detail.items() if k not in ("status", "trace")}
        print(f"{status:4} {name:14} {json.dumps(shown)}", flush=True)

    def ok(self) -> bool:
        return all(c["status"] != "FAIL" for c in self.checks.values())


def perturbed(state: dict, seed: int) -> dict:
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    return {n: (t + 0.05 * torch.randn(t.shape, generator=g).to(t.device, t.dtype)).contiguous()
            for n, t in state.items()}


def weights_match(engine, state: dict, names: list[str]) -> dict:
    """/get_weights_by_name of a few parameters against what was sent (first 16 values)."""
    import numpy as np

    worst = 0.0
    for name in names:
        got = engine.client.call("/get_weights_by_name", {"name": name, "truncate_size": 16})
        if got is None:
            raise AssertionError(f"/get_weights_by_name {name}: the server has no such parameter")
        got = np.asarray(got, np.float64).reshape(-1)[:16]
        want = state[name].detach().float().cpu().reshape(-1)[:16].numpy()
        worst = max(worst, float(np.abs(got - want).max()))
    if worst > 1e-5:
        raise AssertionError(f"served weights differ from the sent ones by up to {worst:.3g}")
    return {"max_abs_diff": worst, "params": len(names)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="the mock server, CPU tensors, a short run")
    ap.add_argument("--out", default="", help="JSON report (default bench/results/gpu_smoke[_dry].json)")
    ap.add_argument("--work", default="", help="scratch directory (default: a temporary one)")
    ap.add_argument("--steps", type=int, default=0, help="train steps (default 30, dry 4)")
    args = ap.parse_args(argv)
    dry = args.cpu_dry_run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if dry:  # the mock server (tests/sglang_mock.py) runs as `python -m tests.sglang_mock` from any directory
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    import tempfile

    import numpy as np
    import torch

    from flux.engine.base import SamplingParams
    from flux.integrations.builtin.tiny import ensure_default_model
    from flux.integrations.sglang.engine import PAUSE_MODES, SGLangEngine, SGLangServer
    from flux.run.runtime import free_port
    from tests.sglang_mock import expected_shapes

    if not dry and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --cpu-dry-run", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    work = Path(args.work or tempfile.mkdtemp(prefix="flux-gpu-smoke-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = ensure_default_model(work / "model")
    device = "cpu" if dry else "cuda"
    report = Report(dry)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    base = {n: p.detach().clone() for n, p in hf.named_parameters()}  # a tied lm_head is listed once
    prompts = [tok(f"sort {a}{b}{c}=", add_special_tokens=False).input_ids
               for a, b, c in [(3, 8, 1), (9, 2, 5), (4, 0, 7), (6, 1, 2)]]
    check_names = [n for n in ("model.embed_tokens.weight", "model.norm.weight",
                               "model.layers.0.input_layernorm.weight") if n in base]
    server = SGLangServer(model_dir, port=free_port(), log_path=work / "sglang.log",
                          args=["--token-delay", "0.002"] if dry else SERVER_ARGS,
                          module="tests.sglang_mock" if dry else "sglang.launch_server")
    state = {"engine": None, "version": 0}

    def start_server():
        t = time.monotonic()
        server.start(timeout_s=300)
        state["engine"] = SGLangEngine(server.url, bucket_bytes=1 << 20)
        return "PASS", {"url": server.url, "startup_s": round(time.monotonic() - t, 1),
                        "module": server.command[2]}

    def logprobs_v0():
        engine = state["engine"]
        outs = engine.generate(prompts * 4, SamplingParams(max_new_tokens=12, temperature=1.0, seed=1))
        assert all((c.versions == 0).all() for c in outs)
        if dry:
            return "SKIP", {"why": "the mock's log-probs are not a model's", "completions": len(outs)}
        deltas = []
        with torch.no_grad():
            for p, c in zip(prompts * 4, outs):
                ids = torch.tensor([p + c.token_ids.tolist()], device=device)
                logp = torch.log_softmax(hf(ids).logits[0, len(p) - 1:-1].float(), -1)
                ref = logp.gather(-1, torch.tensor(c.token_ids, device=device).long()[:, None])[:, 0]
                deltas += (ref.cpu().numpy() - c.logprobs).tolist()
        mad = float(np.mean(np.abs(deltas)))
        return ("PASS" if mad <= TOLERANCE else "FAIL"), {"mean_abs_delta": round(mad, 5), "tokens": len(deltas),
                                                          "tolerance": TOLERANCE}

    def ipc_v1():
        engine = state["engine"]
        new = {n: t.to(device) for n, t in perturbed(base, 1).items()}
        engine.load_weights(1, new)
        assert engine.apply_pending() and engine.version == 1
        state["version"], state["weights"] = 1, new
        match = weights_match(engine, new, check_names)
        outs = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0))
        assert all((c.versions == 1).all() for c in outs), "a token after the update is not labelled 1"
        return "PASS", {**match, "by": "cuda ipc" if new[check_names[0]].is_cuda else "value (cpu)"}

    def inflight(mode: str):
        engine = SGLangEngine(server.url, version=state["version"], pause_mode=mode, bucket_bytes=1 << 20)
        old, new = state["version"], state["version"] + 1
        weights = {n: t.to(device) for n, t in perturbed(base, 10 + new).items()}
        timer = threading.Timer(0.05, engine.load_weights, args=(new, weights))
        timer.start()
        outs = engine.generate(prompts * 16, SamplingParams(max_new_tokens=48, temperature=1.0))
        timer.join()
        engine.apply_pending()
        state["version"], state["weights"] = new, weights
        assert engine.version == new
        for c in outs:
            assert set(c.versions.tolist()) <= {old, new} and (np.diff(c.versions) >= 0).all(), c.versions
        mixed = sum(len(set(c.versions.tolist())) > 1 for c in outs)
        state["engine"].version = new  # the shared server moved on
        engine.close()  # not its server: it stays up for the next check
        return "PASS", {"completions": len(outs), "switched_mid_sequence": mixed, "versions": [old, new]}

    def distributed():
        engine = SGLangEngine(server.url, version=state["version"], weight_sync="distributed",
                              group_backend="gloo", bucket_bytes=1 << 20)
        new = perturbed(base, 99)  # sent from the CPU: gloo pairs with the server's rank on any device
        version = state["version"] + 1
        engine.load_weights(version, new)
        assert engine.apply_pending() and engine.version == version
        match = weights_match(engine, new, check_names)
        engine.close()  # destroys the group on both ends
        state["version"] = version
        state["engine"].version = version
        return "PASS", {**match, "backend": "gloo"}

    def tokens_per_s():
        engine = state["engine"]
        n, length = (256, 128) if not dry else (16, 16)
        ps = [prompts[i % len(prompts)] for i in range(n)]
        engine.generate(ps[:8], SamplingParams(max_new_tokens=4))  # warm
        t = time.perf_counter()
        outs = engine.generate(ps, SamplingParams(max_new_tokens=length, temperature=1.0))
        dt = time.perf_counter() - t
        tokens = sum(len(c.token_ids) for c in outs)
        return "PASS", {"tokens": tokens, "seconds": round(dt, 3), "tokens_per_s": round(tokens / dt, 1)}

    def throughput(rows: list[dict], run_dir: Path) -> dict:
        """Tokens/s of generation and training, busy fractions, weight updates per version and per GB
        (the learner publishes fp32 weights: 4 bytes a parameter)."""
        from safetensors import safe_open

        from bench.common import mean

        gen = json.loads((run_dir / "logs" / "gen0.timeline.json").read_text()).get("totals", {})
        spec = json.loads((run_dir / "spec.json").read_text())
        with safe_open(str(Path(spec["model_path"]) / "model.safetensors"), "pt") as f:
            gb = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys()) * 4 / 1e9
        per_version = gen.get("weight_load_s", 0) / max(1, gen.get("weight_loads", 0))
        return {"generation_tokens_per_s": round(gen.get("tokens", 0) / max(1e-9, gen.get("busy_s", 0)), 1),
                "training_tokens_per_s": round(mean(r["tokens"] / max(1e-9, r["time_update_s"]) for r in rows), 1),
                "learner_busy_frac": round(mean(r["learner_busy_frac"] for r in rows), 3),
                "generator_busy_frac": round(mean(r["generator_busy_frac"] for r in rows), 3),
                "weight_loads": gen.get("weight_loads", 0), "weight_load_ms": round(1000 * per_version, 2),
                "weight_gb_per_version": round(gb, 6), "weight_load_s_per_gb": round(per_version / max(gb, 1e-12), 3)}

    def train():
        from bench.common import mean, run_train

        steps = args.steps or (4 if dry else 30)
        sets = ["rollout.engine=sglang", "rollout.sglang_startup_timeout_s=300"]
        sets += (["rollout.sglang_module=tests.sglang_mock"] if dry
                 else [f"rollout.sglang_args={json.dumps(SERVER_ARGS)}"])
        rows, _, error = run_train("train", sets, steps, work / "train")
        if error:
            return "FAIL", {"error": error, "log": str(work / "train" / "bench.log")}
        assert [r["step"] for r in rows] == list(range(steps)), "missing steps"
        assert all("staleness_mean" in r and "lag_max" in r for r in rows), "staleness not reported"
        k = max(1, steps // 3)
        first, last = mean(r["reward_mean"] for r in rows[:k]), mean(r["reward_mean"] for r in rows[-k:])
        detail = {"steps": steps, "reward_first": round(first, 3), "reward_last": round(last, 3),
                  "staleness_mean": round(mean(r["staleness_mean"] for r in rows), 4),
                  "lag_max": max(r["lag_max"] for r in rows), "wall_s": rows[-1].get("wall_s"),
                  **throughput(rows, work / "train")}
        if dry:
            return "SKIP", {**detail, "why": "the mock's rewards do not learn (the run itself passed)"}
        return ("PASS" if last > first else "FAIL"), detail

    def torch_bf16():
        from bench.common import mean, run_train

        steps = args.steps or (4 if dry else 30)
        sets = [f"learner.device={device}", f"rollout.device={device}", "learner.dtype=bf16", "rollout.dtype=bf16"]
        rows, _, error = run_train("torch_bf16", sets, steps, work / "torch_bf16")
        if error:
            return "FAIL", {"error": error, "log": str(work / "torch_bf16" / "bench.log")}
        k = max(1, steps // 3)
        first, last = mean(r["reward_mean"] for r in rows[:k]), mean(r["reward_mean"] for r in rows[-k:])
        detail = {"steps": len(rows), "device": device, "reward_first": round(first, 3), "reward_last": round(last, 3),
                  "wall_s": rows[-1].get("wall_s"), **throughput(rows, work / "torch_bf16")}
        if len(rows) != steps or not all(r["loss"] == r["loss"] for r in rows):
            return "FAIL", {**detail, "why": "missing steps or a NaN loss"}
        return ("PASS" if dry or last > first else "FAIL"), detail

    try:
        report.run("server", start_server)
        if state["engine"] is not None:
            report.run("logprobs_v0", logprobs_v0)
            report.run("ipc_v1", ipc_v1)
            for mode in PAUSE_MODES:
                report.run(f"inflight_{mode}", inflight, mode)
            report.run("distributed", distributed)
            report.run("tokens_per_s", tokens_per_s)
    finally:
        if state["engine"] is not None:
            state["engine"].close()
        server.stop()
    report.run("train", train)
    report.run("torch_bf16", torch_bf16)
    out = Path(args.out or ROOT / "bench" / "results" / ("gpu_smoke_dry.json" if dry else "gpu_smoke.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    info = {"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "dry_run": dry, "seconds": round(time.monotonic() - report.t0, 1)}
    try:
        import importlib.metadata

        info["sglang"] = importlib.metadata.version("sglang")
    except Exception:  # noqa: BLE001 (not installed: the dry run needs it not)
        info["sglang"] = None
    out.write_text(json.dumps({"machine": info, "checks": report.checks, "ok": report.ok()}, indent=1) + "\n")
    print(f"{'PASS' if report.ok() else 'FAIL'}: {sum(c['status'] == 'PASS' for c in report.checks.values())} "
          f"passed, {sum(c['status'] == 'SKIP' for c in report.checks.values())} skipped, "
          f"{sum(c['status'] == 'FAIL' for c in report.checks.values())} failed in {info['seconds']}s -> {out}")
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
