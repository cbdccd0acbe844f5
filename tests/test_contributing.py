"""docs/contributing.md's four one-file extensions (examples/), all in one real run: an engine, a learner
backend, a sink and an algorithm, each named by a dotted path and none needing a change to Flux."""

import csv
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from tests.test_e2e import SMALL, assert_nothing_left, flux_train, metrics

ROOT = Path(__file__).resolve().parent.parent


def test_an_engine_a_learner_a_sink_and_an_algorithm_from_outside_flux(default_model, tmp_path):
    run = tmp_path / "run"
    out = flux_train(*SMALL, "--max-steps", "6", "--out", str(run), "--set", "adaptive_async.mode=sync",
                     "--set", "rollout.engine=examples.custom_engine:build",
                     "--set", "learner.backend=examples.custom_learner:FrozenEmbeddingLearner",
                     "--set", "logging.sinks=[examples.custom_sink:make_sink]",
                     "--set", "algorithm=examples.custom_algorithm:RANK", cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(metrics(run)) == 6
    assert "gen0 up: " in (log := (run / "logs" / "gen0.log").read_text()) and "examples.custom_engine:build" in log
    assert re.search(r"learner up: rank,", (run / "logs" / "learner.log").read_text())
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(6)) and all(float(r["samples_per_s"]) > 0 for r in rows)
    before = load_file(Path(default_model) / "model.safetensors")
    after = load_file(run / "checkpoints" / "step_6" / "model.safetensors")
    emb = next(k for k in before if "embed_tokens" in k)
    assert torch.equal(before[emb], after[emb])                       # frozen by the custom learner
    assert any(not torch.equal(before[k], after[k]) for k in before if k != emb)   # the rest trained
    assert_nothing_left(run)


def test_a_dotted_path_that_does_not_import_is_a_one_line_config_error(tmp_path):
    for key in ("rollout.engine", "learner.backend"):
        out = flux_train("--set", f"{key}=examples.nope:build", "--out", str(tmp_path / "r"), cwd=ROOT)
        assert out.returncode == 2 and key in out.stderr and "Traceback" not in out.stderr, out.stderr
        assert len(out.stderr.strip().splitlines()) == 1


def test_the_installed_flux_command_resolves_dotted_paths_from_the_working_directory(default_model, tmp_path):
    import shutil
    import subprocess

    flux = shutil.which("flux")
    if flux is None:
        import pytest

        pytest.skip("the `flux` console script is not installed")
    run = tmp_path / "run"
    out = subprocess.run([flux, "train", *SMALL, "--max-steps", "1", "--out", str(run), "--set",
                          "adaptive_async.mode=sync", "--set", "rollout.engine=examples.custom_engine:build"],
                         cwd=ROOT, capture_output=True, text=True, timeout=150, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert len(metrics(run)) == 1
