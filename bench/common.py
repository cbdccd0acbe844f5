"""What the bench scripts share: one `flux train` subprocess → its metrics rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml


def run_train(name: str, sets: list[str], max_steps: int, out: Path) -> tuple[list[dict], dict, str | None]:
    """One `flux train` subprocess, output to out/bench.log. Returns (metrics rows, resolved config,
    error or None); the error is the last line the run printed."""
    cmd = [sys.executable, "-m", "flux.cli", "train", "--out", str(out), "--max-steps", str(max_steps)]
    for item in sets:
        cmd += ["--set", item]
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    print(f"{name}: running {max_steps} steps in {out}", file=sys.stderr, flush=True)
    with open(out / "bench.log", "w") as log:
        proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    metrics = out / "metrics.jsonl"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    cfg = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").exists() else {}
    print(f"{name}: exit {proc.returncode} after {time.monotonic() - t0:.0f}s", file=sys.stderr, flush=True)
    if proc.returncode != 0 or not rows:
        tail = (out / "bench.log").read_text(errors="replace").strip().splitlines()
        return rows, cfg, (tail or [f"exit code {proc.returncode}"])[-1]
    return rows, cfg, None


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def machine() -> dict:
    """Where the numbers came from."""
    import platform

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}


def finite(x):
    """`x` with every NaN or infinity (a mean of nothing, a rate of no time) as None: strict JSON."""
    if isinstance(x, float) and x != x or x in (float("inf"), float("-inf")):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x


def write_json(path: str | Path, data: dict) -> None:
    """Write a benchmark's JSON (making its folder; NaN as null) and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(finite(data), indent=1, allow_nan=False))
    print(f"wrote {path}")


def have_matplotlib() -> bool:
    """Whether plots can be drawn (matplotlib comes with the `bench` extra); says so when not."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print('no plots: matplotlib is not installed (pip install -e ".[bench]")')
        return False
    return True
