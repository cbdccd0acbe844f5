"""`flux train --resume RUN_DIR`: a killed job continues from its last checkpoint (model, optimizer,
controller state, data cursor), and in sync mode the resumed steps see exactly the data the
uninterrupted run saw: the same prompts, and (completions being seeded by prompts and policy version)
the same samples and rewards."""

import json
import os
import signal
import subprocess

import pytest

from tests.test_e2e import (
    SMALL,
    assert_nothing_left,
    flux_train,
    metrics,
    processes_mentioning,
    train_cmd,
    wait_for,
)

SYNC = [*SMALL, "--set", "adaptive_async.mode=sync", "--set", "learner.checkpoint_every=4",
        "--set", "eval.num_prompts=5", "--max-steps", "8"]


def test_a_killed_sync_run_resumes_exactly(default_model, tmp_path):
    whole = tmp_path / "whole"
    out = flux_train(*SYNC, "--out", str(whole))
    assert out.returncode == 0, out.stderr[-2000:]

    killed = tmp_path / "killed"
    killed.mkdir()
    with open(tmp_path / "killed.out", "w") as log:
        proc = subprocess.Popen(train_cmd(*SYNC, "--out", str(killed)), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: (killed / "checkpoints" / "step_4" / "controller_state.json").is_file(), 120,
                 "the step-4 checkpoint")
        os.killpg(proc.pid, signal.SIGKILL)  # the whole job: launcher (and, through it, every actor)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    spec = str(killed / "spec.json")
    wait_for(lambda: not processes_mentioning(spec), 15, "the killed job's actors to die")
    old_prefix = f"flux-{json.loads((killed / 'spec.json').read_text())['run_id']}-"
    # (the killed actors may or may not have had time to unlink their weight slots; either way none may
    # be left once the resumed run ends)

    out = subprocess.run(train_cmd("--resume", str(killed)), capture_output=True, text=True, timeout=150,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout and "step_4" in out.stdout

    a, b = metrics(whole), metrics(killed)
    assert [r["step"] for r in b] == list(range(8))      # lines past the checkpoint were redone, not doubled
    for ra, rb in zip(a, b):
        assert ra["prompts"] == rb["prompts"], ra["step"]
        assert ra["version"] == rb["version"]
        assert ra["reward_mean"] == rb["reward_mean"], ra["step"]
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-6), ra["step"]
    final_a = json.loads((whole / "checkpoints" / "step_8" / "controller_state.json").read_text())
    final_b = json.loads((killed / "checkpoints" / "step_8" / "controller_state.json").read_text())
    assert final_a["cursor"] == final_b["cursor"] and final_a["version"] == final_b["version"] == 8
    assert_nothing_left(killed)
    assert not [n for n in os.listdir("/dev/shm") if n.startswith(old_prefix)]  # the resume removed them


def test_resume_without_a_checkpoint_is_a_one_line_error(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    out = subprocess.run(train_cmd("--resume", str(run)), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "not a run directory" in out.stderr and "Traceback" not in out.stderr
    (run / "config.yaml").write_text("max_steps: 3\n")
    out = subprocess.run(train_cmd("--resume", str(run)), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 2 and "no complete checkpoint" in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
