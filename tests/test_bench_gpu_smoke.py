"""bench/gpu_smoke.py --cpu-dry-run: every check of the GPU smoke test that can run without a GPU does,
against the mock server started the way a generator starts a real one, and none fails."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHECKS = {"server", "logprobs_v0", "ipc_v1", "inflight_abort", "inflight_retract", "inflight_in_place",
          "distributed", "tokens_per_s", "train", "torch_bf16"}


@pytest.mark.slow
def test_the_gpu_smoke_test_passes_its_cpu_dry_run(tmp_path):
    out = tmp_path / "smoke.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py"), "--cpu-dry-run", "--out", str(out),
                           "--work", str(tmp_path / "work")], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["machine"]["dry_run"] and set(report["checks"]) == CHECKS
    status = {name: c["status"] for name, c in report["checks"].items()}
    # only what needs a real model is skipped
    assert {n for n, s in status.items() if s == "SKIP"} == {"logprobs_v0", "train"}, status
    assert all(report["checks"][f"inflight_{m}"]["switched_mid_sequence"] > 0 for m in ("abort", "retract", "in_place"))
    assert report["checks"]["train"]["steps"] == 4 and "staleness_mean" in report["checks"]["train"]
    bf16 = report["checks"]["torch_bf16"]
    assert bf16["steps"] == 4 and bf16["device"] == "cpu" and bf16["generation_tokens_per_s"] > 0
    for check in ("train", "torch_bf16"):  # both engines: throughput, busy fractions, weight updates per GB
        c = report["checks"][check]
        assert c["training_tokens_per_s"] > 0 and 0 < c["learner_busy_frac"] <= 1 and 0 < c["generator_busy_frac"] <= 1
        assert c["weight_loads"] >= 1 and c["weight_gb_per_version"] > 0 and c["weight_load_s_per_gb"] > 0, c
    assert [line.split()[0] for line in proc.stdout.splitlines() if line.split()[1:2] and line.split()[1] in CHECKS] \
        == [status[line.split()[1]] for line in proc.stdout.splitlines() if line.split()[1:2] and line.split()[1] in CHECKS]


def test_without_a_gpu_the_real_run_says_what_to_do():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_smoke.py")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--cpu-dry-run" in proc.stderr
