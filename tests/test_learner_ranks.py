"""`flux train --set learner.ranks=2` end to end: two learner processes in a gloo group, each holding the
whole model (`learner.sharding: replicate`) or half of it (`fsdp`).

In sync mode completions are seeded by prompts, version and generator, so a two-rank run sees the same
batches as a one-rank run and must take the same steps (losses within rounding). A learner rank killed
mid-run stops the whole run, with nothing left behind.
"""

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

STEPS, FIRST = 6, 4  # the two-rank run stops after FIRST steps and is resumed to STEPS
SYNC = [*SMALL, "--set", "learner.groups_per_step=4", "--set", "learner.lr=3e-4", "--set", "learner.lr_schedule=constant",
        "--set", "adaptive_async.mode=sync", "--set", "eval.num_prompts=4"]


@pytest.fixture(scope="module")
def one_rank(default_model, tmp_path_factory):
    """One sync run with one learner rank."""
    one = tmp_path_factory.mktemp("ranks") / "ranks1"
    proc = flux_train("--max-steps", str(STEPS), *SYNC, "--out", str(one), timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return one


@pytest.fixture(scope="module", params=["replicate", "fsdp"])
def sync_runs(one_rank, tmp_path_factory, request):
    """The same run with two ranks (replicated, or FSDP-sharded), stopped after FIRST steps and resumed
    (`flux train --resume`). One after the other: two cores."""
    two = tmp_path_factory.mktemp("ranks") / f"ranks2-{request.param}"
    procs = [flux_train("--max-steps", str(FIRST), *SYNC, "--set", "learner.ranks=2", "--set",
                        f"learner.sharding={request.param}", "--out", str(two), timeout=240),
             flux_train("--resume", str(two), "--max-steps", str(STEPS), timeout=240)]
    return one_rank, two, procs


def test_two_ranks_complete_a_sync_run_and_resume_it(sync_runs):
    _, run_dir, procs = sync_runs
    for proc in procs:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "resumed from" in procs[1].stdout and f"step_{FIRST}" in procs[1].stdout
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert [r["version"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["lag_max"] == 0 and r["step_skipped"] == 0.0 for r in rows)
    for step in (FIRST, STEPS):
        assert (run_dir / "checkpoints" / f"step_{step}" / "model.safetensors").is_file()
    # rank 1 trained every step and left when rank 0 finished, in both runs
    rank1 = (run_dir / "logs" / "learner1.log").read_text()
    assert f"learner rank 1 leaves after step {FIRST}" in rank1 and f"leaves after step {STEPS}" in rank1
    assert "2 rank(s)" in (run_dir / "logs" / "learner.log").read_text()
    assert_nothing_left(run_dir)


def test_two_ranks_take_the_one_rank_steps(sync_runs):
    one, two = (metrics(d) for d in sync_runs[:2])
    assert len(one) == len(two) == STEPS
    for a, b in zip(one, two):
        assert a["prompts"] == b["prompts"] and a["reward_mean"] == b["reward_mean"]   # the same completions
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
        assert b["staleness_mean"] == pytest.approx(a["staleness_mean"], abs=1e-5)
    assert any(r["loss"] != 0 for r in one)


def test_a_killed_learner_rank_stops_the_whole_run(default_model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = tmp_path / "launcher.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(train_cmd("--max-steps", "1000", *SMALL, "--set", "eval.num_prompts=1",
                                          "--set", "learner.ranks=2", "--out", str(run_dir)),
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: metrics(run_dir), 180, "the first metrics line")
        spec = str(run_dir / "spec.json")
        learners = [p for p in processes_mentioning(spec) if "actors.learner" in " ".join(p.cmdline())]
        assert len(learners) == 2
        [victim] = [p for p in learners if "--name learner1" in " ".join(p.cmdline())]
        victim.send_signal(signal.SIGKILL)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text()
    assert code == 1, text
    # rank 1 is usually reported; rank 0 may fail first, at its next collective with the dead rank
    assert "learner learner1 died" in text or ("learner learner died" in text and "by peer" in text), text
    assert_nothing_left(run_dir)
