"""bench/overhead.py on a real (short) run of the built-in example: every part of the split is there,
none is negative, and they account for the time they claim to split."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_overhead_splits_a_real_run(default_model, tmp_path):
    out = tmp_path / "overhead.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "overhead.py"), "--steps", "6", "--json", str(out),
                           "--keep", str(tmp_path), "--set", "eval.num_prompts=10"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dominant:" in proc.stdout
    r = json.loads(out.read_text())
    assert r["steps"] == 6 and 0 < r["first_step_s"] < r["wall_s"] and 0 < r["exit_after_last_step_s"] < r["wall_s"]
    for part in ("startup_parts_s", "exit_parts_s"):
        assert all(v >= 0 for v in r[part].values()), r[part]
    # the critical path runs forward in time and ends at the first step
    path = r["startup_critical_path_s"]
    assert 0 < path["actors spawned"] < path["learner imported"] < path["learner model loaded"] < path["learner ready"]
    assert path["generator ready"] < path["first group pushed"] < path["first batch"] < path["first step reported"]
    assert path["first step reported"] == pytest.approx(r["first_step_s"])
    per = r["per_step_s"]
    assert per["learner optimizer step (fwd+bwd+update)"] > 0 and per["generation (generator busy / step)"] > 0
    # the built-in GRPO needs no separate proximal pass: the optimizer step's forward gives it
    assert per["learner log-prob passes (no grad)"] < 0.2 * per["learner optimizer step (fwd+bwd+update)"]
    # each process left its timeline
    names = {p.name for p in (tmp_path / "run" / "logs").glob("*.timeline.json")}
    assert names == {f"{n}.timeline.json" for n in ("launcher", "controller", "buffer", "learner", "gen0")}
