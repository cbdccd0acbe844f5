"""Learner ranks on another machine: `flux train` with learner.local_ranks < learner.ranks starts rank 0
here, and rank 1 joins with `flux learner --join` over the run's CURVE endpoint, as a second node would.

Two launch commands on this machine over 127.0.0.1 act as the two nodes. The run is sync, so its steps
must be the one-rank run's (as in tests/test_learner_ranks.py); the ranks are FSDP-sharded, so every step
also gathers weights across the "nodes". A key the run does not know, and a rank it does not take, are
refused with one line and exit code 2.
"""

import subprocess
import sys

import pytest
from click.testing import CliRunner

from flux.cli import main
from tests.test_e2e import assert_nothing_left, flux_train, metrics, processes_mentioning, train_cmd, wait_for
from tests.test_learner_ranks import SYNC

STEPS = 6


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for run, client in (("run", "node1"), ("other", "stranger")):
        result = CliRunner().invoke(main, ["keys", str(d / run), "--client", client])
        assert result.exit_code == 0, result.output
    return d


def join(connect: str, key, *extra, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flux.cli", "learner", "--join", connect, "--key", str(key),
                           *extra], capture_output=True, text=True, timeout=timeout, check=False)


def test_a_learner_rank_joins_from_another_machine_and_takes_the_one_rank_steps(default_model, keys, tmp_path):
    one = tmp_path / "one"
    ref = flux_train("--max-steps", str(STEPS), *SYNC, "--out", str(one), timeout=240)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    run_dir, log = tmp_path / "run", tmp_path / "launcher.out"
    run_dir.mkdir()
    with open(log, "w") as out:
        proc = subprocess.Popen(train_cmd("--max-steps", str(STEPS), *SYNC, "--set", "learner.ranks=2", "--set",
                                          "learner.local_ranks=1", "--set", "learner.sharding=fsdp", "--set",
                                          "net.remote=true", "--set", f"net.keys={keys / 'run'}",
                                          "--out", str(run_dir)), stdout=out, stderr=subprocess.STDOUT)
    try:
        line = wait_for(lambda: [x for x in log.read_text().splitlines() if "learner rank 1 joins with" in x],
                        90, "the join command")[0]
        connect = line.split("--join ")[1].split()[0]
        assert f"--key {keys / 'run'}/NAME.key_secret --rank 1" in line
        stranger = join(connect, keys / "other" / "stranger.key_secret", "--server-key",
                        str(keys / "run" / "server.key"), "--rank", "1")
        assert stranger.returncode == 2 and "refused this key" in stranger.stderr, stranger.stderr
        wrong = join(connect, keys / "run" / "node1.key_secret", "--rank", "2")
        assert wrong.returncode == 2, wrong.stderr
        assert wrong.stderr.strip() == (f"flux: error: --rank 2: the run at {connect} takes learner ranks 1..1 "
                                        "from other machines")
        node1 = join(connect, keys / "run" / "node1.key_secret", "--rank", "1", "--out", str(tmp_path / "node1"))
        code = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert node1.returncode == 0, node1.stdout + node1.stderr
    assert code == 0, log.read_text()
    assert "flux: learner rank 1 of 2 joins run" in node1.stdout and "left the run" in node1.stdout
    rank1 = (tmp_path / "node1" / "logs" / "learner1.log").read_text()
    assert f"learner rank 1 leaves after step {STEPS}" in rank1
    a_rows, b_rows = metrics(one), metrics(run_dir)
    assert [r["step"] for r in b_rows] == list(range(STEPS))
    for a, b in zip(a_rows, b_rows):
        assert a["prompts"] == b["prompts"] and a["reward_mean"] == b["reward_mean"]
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-5), (a["step"], a["loss"], b["loss"])
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert (run_dir / "checkpoints" / f"step_{STEPS}" / "model.safetensors").is_file()
    assert_nothing_left(run_dir)
    assert processes_mentioning(str(tmp_path / "node1")) == []


def test_remote_learner_ranks_need_the_remote_endpoint():
    from flux.config import ConfigError, FluxConfig

    FluxConfig(learner={"ranks": 2, "local_ranks": 2}).validate()
    with pytest.raises(ConfigError, match="learner.local_ranks"):
        FluxConfig(learner={"ranks": 2, "local_ranks": 1}).validate()
    with pytest.raises(ConfigError, match="learner.local_ranks"):
        FluxConfig(learner={"ranks": 2, "local_ranks": 3}, net={"remote": True}).validate()
