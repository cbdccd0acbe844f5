"""`flux train --resume RUN_DIR`: a killed job continues from its last checkpoint (model, optimizer,
controller state, data cursor), and in sync mode the resumed steps see exactly the data the
uninterrupted run saw: the same prompts, and (completions being seeded by prompts and policy version)
the same samples and rewards."""

import json
import os
import signal
import subprocess

from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from flux.config import FluxConfig
from flux.control.pid import PID, rms_input
from flux.control.staleness import StalenessMonitor
from tests.test_e2e import (
    SMALL,
    assert_nothing_left,
    flux_train,
    metrics,
    processes_mentioning,
    train_cmd,
    wait_for,
)

# From version 5 on generation sleeps 20 ms a token, so that the run is still going (steps 5-8 take
# seconds) when the test sees the step-4 checkpoint and kills it; the sleep does not change what is sampled.
SYNC = [*SMALL, "--set", "adaptive_async.mode=sync", "--set", "checkpoint.every=4",
        "--set", "eval.num_prompts=5", "--max-steps", "8", "--set", "rollout.slowdown_schedule=[[5, 0.02]]"]


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

    partial = killed / "checkpoints" / ".step_7.partial"   # as if the job had died while saving step 7
    partial.mkdir(exist_ok=True)
    (partial / "trainer_state.json").write_text("{}")
    out = subprocess.run(train_cmd("--resume", str(killed)), capture_output=True, text=True, timeout=150,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "resumed from" in out.stdout and "step_4" in out.stdout
    assert f"skipping incomplete checkpoint {partial}" in out.stdout

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
    wa, wb = (load_file(d / "checkpoints" / "step_8" / "model.safetensors") for d in (whole, killed))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)   # the same weights, bit for bit
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


def kill_after_checkpoint(cmd, run_dir, tmp_path, which="job"):
    """Start `flux train`, wait for its step-4 checkpoint, SIGKILL the whole job (or only the learner)."""
    run_dir.mkdir()
    with open(tmp_path / f"{run_dir.name}.out", "w") as log:
        proc = subprocess.Popen(train_cmd(*cmd, "--out", str(run_dir)), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for(lambda: (run_dir / "checkpoints" / "step_4" / "controller_state.json").is_file(), 120,
                 "the step-4 checkpoint")
        if which == "job":
            os.killpg(proc.pid, signal.SIGKILL)
        else:  # the learner alone, mid-step: the launcher stops the rest and says why
            learner = [p for p in processes_mentioning(str(run_dir / "spec.json"))
                       if "--name learner" in " ".join(p.cmdline())]
            assert len(learner) == 1
            learner[0].send_signal(signal.SIGKILL)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    wait_for(lambda: not processes_mentioning(str(run_dir / "spec.json")), 15, "the killed job's actors to die")
    return proc.returncode, (tmp_path / f"{run_dir.name}.out").read_text()


def accounted(groups: dict) -> bool:
    return groups["admitted"] == groups["trained"] + groups["dropped"] + groups["requeued"] + \
        groups["unfinished_at_stop"]


@pytest.mark.parametrize("mode", ["adaptive", "async"])
def test_an_asynchronous_run_resumes_with_its_controller_and_its_groups_in_flight(default_model, tmp_path, mode):
    """Asynchronous modes leave groups in flight at every checkpoint: they are re-queued (their prompts
    first), and the control loop (async ratio, PID memory) continues where the checkpoint left it."""
    cmd = [*SMALL, "--set", f"adaptive_async.mode={mode}", "--set", "checkpoint.every=4", "--set",
           "eval.num_prompts=5", "--max-steps", "12", "--set", "rollout.slowdown=0.003"]
    run_dir = tmp_path / "run"
    kill_after_checkpoint(cmd, run_dir, tmp_path)
    saved = json.loads((run_dir / "checkpoints" / "step_4" / "controller_state.json").read_text())
    in_flight = saved["ledger"]["in_flight"]
    out = subprocess.run(train_cmd("--resume", str(run_dir)), capture_output=True, text=True, timeout=180,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(12))
    log = (run_dir / "logs" / "controller.log").read_text()
    assert f"resumed at step 4, version 4 ({len(in_flight)} in-flight prompts re-queued)" in log
    if mode == "async":
        assert in_flight, saved                              # async at full lead: some were in flight
    trained_after = Counter(p for r in rows[4:] for p in r["prompts"])
    assert Counter(in_flight) <= trained_after, (in_flight, trained_after)   # each one trained after all
    # The checkpoint holds the control loop of step 3, and step 4 continues it: its ratio is the restored
    # PID's answer to step 4's staleness (a fresh PID would answer differently).
    assert rows[3]["controller"]["pid"] == saved["pid"] and rows[3]["async_ratio"] == saved["async_ratio"]
    if mode == "adaptive":
        cfg = FluxConfig().adaptive_async
        pid = PID(cfg.target_staleness, cfg.kp, cfg.ki, cfg.kd, cfg.min_async_ratio, cfg.max_async_ratio,
                  bias=cfg.initial_async_ratio, ema_horizon=cfg.ema_horizon)
        for key in ("integral", "ema", "output"):
            setattr(pid, key, saved["pid"][key])
        s4 = rms_input(rows[4]["staleness_mean"], cfg.target_staleness)
        assert rows[4]["async_ratio"] == pytest.approx(pid.update(s4), abs=1e-12)
        assert rows[4]["controller"]["pid"] == pytest.approx(pid.state(), abs=1e-12)
        # and the lag-0 floor estimate continues too: step 4's floor is the restored batches' plus its own
        sc = FluxConfig().staleness
        monitor = StalenessMonitor(sc.signal, eta_max=cfg.eta_max, d_ref=sc.d_ref, w_lag=sc.w_lag,
                                   window=sc.floor_window)
        monitor.restore(saved["staleness"])
        assert saved["staleness"]["recent"]                   # step 0 at least trained lag-0 tokens
        assert monitor.update(rows[4])["staleness_floor"] == pytest.approx(rows[4]["staleness_floor"], abs=1e-12)
    else:
        assert {r["async_ratio"] for r in rows} == {1.0}
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["trained"] == 12 * 2 and accounted(groups), groups
    assert_nothing_left(run_dir)


def test_a_learner_killed_mid_step_is_resumed_and_every_group_accounted_for(default_model, tmp_path):
    cmd = [*SMALL, "--set", "checkpoint.every=4", "--set", "eval.num_prompts=5", "--max-steps", "10",
           "--set", "rollout.slowdown=0.003"]
    run_dir = tmp_path / "run"
    code, said = kill_after_checkpoint(cmd, run_dir, tmp_path, which="learner")
    assert code == 1 and "flux: learner learner died (exit code -9)" in said, said
    stopped = json.loads((run_dir / "groups.json").read_text())
    assert accounted(stopped), stopped                          # the killed run's own accounting holds
    out = subprocess.run(train_cmd("--resume", str(run_dir)), capture_output=True, text=True, timeout=180,
                         check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    assert [r["step"] for r in metrics(run_dir)] == list(range(10))
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["trained"] == 10 * 2 and accounted(groups), groups
    assert_nothing_left(run_dir)
