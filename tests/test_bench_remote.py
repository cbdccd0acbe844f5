"""bench/scaling.py's simulation (the real controller code on a simulated clock) and bench/weight_sync.py."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


scaling = load("scaling")
weight_sync = load("weight_sync")


def sim(**kw) -> dict:
    return scaling.Simulation(scaling.SimConfig(**{"generators": 16, "steps": 80, **kw})).run()


def test_sync_trains_only_on_the_newest_weights():
    r = sim(mode="sync")
    assert r["simulated"] and r["steps"] == 80
    assert r["staleness_mean"] == 0 and r["lag_max"] == 0 and r["dropped_groups"] == 0
    assert 0 < r["learner_utilisation"] < 1 and 0 < r["generator_utilisation"] <= 1


def test_the_pid_holds_the_target_with_many_long_tailed_generators():
    for target in (0.1, 0.2):
        r = sim(mode="adaptive", generators=64, steps=150, target=target)
        assert r["staleness_mean"] == pytest.approx(target, abs=0.02), r
    free = sim(mode="async", generators=64, steps=150)
    assert free["staleness_mean"] > 0.3 and free["learner_utilisation"] > r["learner_utilisation"]


def test_too_stale_tokens_are_masked_and_every_admitted_sample_is_accounted_for():
    s = scaling.Simulation(scaling.SimConfig(generators=32, steps=120, mode="async"))
    r = s.run()
    # eta_max = 2: nothing older is trained (older tokens of a trained group are masked out of the loss)
    assert r["masked_stale_tokens"] > 0 and r["lag_max"] <= 2
    # every admitted sample is in flight, trained, waiting in the composer, or given back
    assert s.admission.started <= (s.admission.version + 1 + s.admission.eta_max) * s.batch


def test_qwen2_shapes_have_the_advertised_sizes():
    counts = {size: sum(int(np.prod(s)) for s in weight_sync.qwen2_shapes(*cfg).values())
              for size, cfg in weight_sync.CONFIGS.items()}
    assert counts["10M"] == pytest.approx(10e6, rel=0.05)
    assert counts["100M"] == pytest.approx(100e6, rel=0.05)
    assert counts["500M"] == pytest.approx(494e6, rel=0.01)              # Qwen2-0.5B, tied embeddings


def test_weight_sync_runs_end_to_end_on_the_smallest_size(tmp_path):
    out = tmp_path / "ws.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "weight_sync.py"), "--sizes", "10M", "--repeats",
                           "1", "--json", str(out)], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())["results"][0]
    assert res["size"] == "10M" and {"memcpy", "shm", "tcp-plain", "tcp-curve"} <= res.keys()
    assert all(res[k]["total_s"] > 0 for k in ("shm", "tcp-plain", "tcp-curve"))
    assert "| 10M" in proc.stdout
