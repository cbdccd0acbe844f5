"""What a broken step, a broken policy or a broken reward does to a real run (`flux train` as a subprocess):
the run never hangs, every group is accounted for, and a run that cannot go on says why in one line."""

import json
import os
import sys
import textwrap

import pytest

from tests.test_e2e import SMALL, assert_nothing_left, flux_train

pytestmark = pytest.mark.slow

USER_CODE = textwrap.dedent('''
    """Stand-ins for user code, loaded by dotted path the way a user's own would be."""
    import math
    import time

    import torch

    from flux.algorithms import register_algorithm
    from flux.algorithms.grpo import grpo_advantages, grpo_loss

    calls = {"loss": 0, "reward": 0}


    @register_algorithm("nan_every_third", advantages=grpo_advantages)
    def nan_every_third(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None):
        """GRPO whose loss is NaN on every third optimizer step (one loss call per step: no micro-batches)."""
        loss, stats = grpo_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask)
        calls["loss"] += 1
        return (loss * float("nan") if calls["loss"] % 3 == 0 else loss), stats


    @register_algorithm("always_nan", advantages=grpo_advantages)
    def always_nan(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask, ref_logprobs=None):
        loss, stats = grpo_loss(logprobs, proximal_logprobs, behaviour_logprobs, advantages, mask)
        return loss * float("nan"), stats


    def flaky(completion, record):
        """Every 7th call raises, every 11th returns NaN, every 13th hangs, every 17th is not a number."""
        calls["reward"] += 1
        k = calls["reward"]
        if k % 7 == 0:
            raise KeyError("answer")
        if k % 11 == 0:
            return math.nan
        if k % 13 == 0:
            time.sleep(60)
        if k % 17 == 0:
            return "1.0"
        return float(len(completion) % 3 == 0)


    def broken(completion, record):
        raise ZeroDivisionError("always")
''')


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    (tmp_path / "user_code.py").write_text(USER_CODE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path), *sys.path]))
    return tmp_path


def run(tmp_path, *args, timeout=240):
    out = tmp_path / "run"
    result = flux_train(*SMALL, "--set", "eval.num_prompts=4", *args, "--out", str(out), timeout=timeout)
    return result, out


def groups(run_dir):
    return json.loads((run_dir / "groups.json").read_text())


def test_a_step_skipped_for_a_nan_loss_does_not_starve_a_sync_run(user_code, tmp_path):
    """Before: the skipped step published nothing, its samples kept their credit, and sync admission
    never let the next batch in: `flux train` hung after step 3 with heartbeats going on."""
    result, out = run(tmp_path, "--max-steps", "9", "--set", "algorithm=user_code:nan_every_third",
                      "--set", "adaptive_async.mode=sync", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(9))
    assert [r["step_skipped"] for r in rows] == [0, 0, 1] * 3
    assert [r["version"] for r in rows][-1] == 6                     # six steps published
    g = groups(out)
    assert g["dropped_by"] == {"step_skipped": 3 * 2} and g["trained"] == 6 * 2
    assert g["admitted"] == g["trained"] + g["dropped"] + g["requeued"] + g["unfinished_at_stop"]
    assert all(r["lag_mean"] == 0 for r in rows)                     # still strictly synchronous
    assert_nothing_left(out)


def test_consecutive_skipped_steps_stop_the_run_in_one_line(user_code, tmp_path):
    result, out = run(tmp_path, "--max-steps", "20", "--set", "algorithm=user_code:always_nan",
                      "--set", "learner.max_skipped_steps=2", timeout=120)
    assert result.returncode == 1
    lines = [ln for ln in result.stdout.splitlines() if "stops the run" in ln]
    assert lines == ["flux: learner stops the run: 2 consecutive optimizer steps skipped for a non-finite "
                     "gradient (steps 0..1); learner.max_skipped_steps=2"], result.stdout
    assert "Traceback" not in result.stdout + result.stderr
    assert_nothing_left(out)


def test_weights_that_overflow_are_named_with_their_step(tmp_path, default_model):
    """lr=1e30: before, the run ended only because the generator crashed on NaN sampling probabilities."""
    result, out = run(tmp_path, "--max-steps", "20", "--set", "learner.lr=1e30", timeout=120)
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert "stops the run: the policy's weights became non-finite at step 0" in last, result.stdout
    assert "probability tensor" not in result.stdout
    assert_nothing_left(out)


def test_a_flaky_reward_drops_and_counts_its_groups_and_the_run_goes_on(user_code, tmp_path):
    result, out = run(tmp_path, "--max-steps", "12", "--set", "reward=user_code:flaky",
                      "--set", "reward_timeout_s=0.5", "--set", "eval.num_prompts=8", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the learner's evaluation calls the same reward: its 7th call raised, and was left out of the mean
    assert rows[-1]["eval_reward_failed"] >= 1 and 0 <= rows[-1]["eval_score"] <= 1
    g = groups(out)
    assert g["trained"] == 12 * 2 and g["dropped_by"].get("reward_failed", 0) >= 3, g
    assert g["admitted"] == g["trained"] + g["dropped"] + g["requeued"] + g["unfinished_at_stop"]
    log = (out / "logs" / "gen0.log").read_text()
    for kind in ("raised", "non_finite", "timeout", "not_a_number"):
        assert log.count(f"failed ({kind}, logged once per kind") == 1, kind
    assert log.count("KeyError: 'answer'") == 1                      # the first traceback, once
    assert_nothing_left(out)


def test_a_reward_that_keeps_failing_stops_the_run_in_one_line(user_code, tmp_path):
    result, out = run(tmp_path, "--max-steps", "50", "--set", "reward=user_code:broken",
                      "--set", "eval.prompts=", timeout=120)
    assert result.returncode == 1
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("flux: gen0 stops the run: the reward function failed on 2"), result.stdout
    assert "raised: 2" in last and "reward_max_failure_rate=0.5" in last
    assert_nothing_left(out)


@pytest.mark.skipif(os.geteuid() != 0, reason="switching to another user id needs root")
def test_another_user_cannot_connect_to_the_local_actors(tmp_path, default_model):
    """The local actors talk over ipc:// sockets in a run-private directory (mode 0700): a second user of
    the machine cannot connect and speak as an actor. (Before: TCP on 127.0.0.1, open to every local user.)"""
    import stat
    import subprocess

    from tests.test_e2e import metrics, processes_mentioning, train_cmd, wait_for

    out = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(*SMALL, "--max-steps", "400", "--set", "rollout.slowdown=0.01",
                                      "--set", "eval.num_prompts=1", "--out", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: metrics(out), 120, "the first step")
        spec = json.loads((out / "spec.json").read_text())
        assert stat.S_IMODE((out / "spec.json").stat().st_mode) == 0o600        # it holds the run's secret
        addresses = [spec[k] for k in ("controller_router", "controller_pub", "buffer_pull", "buffer_router")]
        assert all(a.startswith("ipc://") for a in addresses)
        sockets = os.path.dirname(addresses[0].removeprefix("ipc://"))
        assert stat.S_IMODE(os.stat(sockets).st_mode) == 0o700
        slots = [n for n in os.listdir("/dev/shm") if n.startswith(f"flux-{spec['run_id']}-")]
        assert slots and all(stat.S_IMODE(os.stat(f"/dev/shm/{n}").st_mode) == 0o600 for n in slots)
        probe = ("import socket, sys\n"
                 "for path in sys.argv[1:]:\n"
                 "    s = socket.socket(socket.AF_UNIX)\n"
                 "    try:\n"
                 "        s.connect(path)\n"
                 "        print('connected', path)\n"
                 "    except PermissionError:\n"
                 "        print('refused', path)\n")
        paths = [a.removeprefix("ipc://") for a in addresses]
        as_root = subprocess.run([sys.executable, "-c", probe, *paths], capture_output=True, text=True, timeout=30)
        assert as_root.stdout.split().count("connected") == 4                   # the probe itself works
        # The other user runs the system's python: this one may sit in a directory only root can enter.
        other_python = next((p for p in ("/usr/bin/python3", "/usr/local/bin/python3") if os.access(p, os.X_OK)),
                            None)
        if other_python is None:
            pytest.skip("no python another user can run")
        other = subprocess.run([other_python, "-c", probe, *paths], capture_output=True, text=True, timeout=30,
                               user=65534, group=65534, extra_groups=[], cwd="/")
        assert other.stdout.split().count("refused") == 4, other.stdout + other.stderr
    finally:
        proc.terminate()
        proc.wait(60)
    assert processes_mentioning(str(out / "spec.json")) == []
    assert not os.path.exists(sockets)                                          # removed with the run
