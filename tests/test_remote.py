"""Remote generators: `flux keys`, `flux generator --connect` attaching to a live `flux train` over CURVE,
training groups, leaving with a Goodbye; an unauthorised key refused and logged; nothing left behind.

Everything runs on this machine over 127.0.0.1 (the same model and prompts paths), as real subprocesses.
"""

import json
import logging
import os
import signal
import stat
import subprocess
import time
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from actors.controller import Controller
from flux.integrations.remote import messages as M
from flux.run import protocol as P
from flux.cli import main
from flux.config import ConfigError, FluxConfig, load_config
from flux.run.runtime import RunSpec
from tests.test_e2e import (
    SMALL,
    assert_nothing_left,
    metrics,
    processes_mentioning,
    train_cmd,
    wait_for,
)

# Generation is paced by a simulated per-token delay (sleep, not CPU), so the run lasts long enough for
# a generator to attach, whatever the load on the machine.
PACED = [*SMALL, "--set", "eval.num_prompts=1", "--set", "rollout.slowdown=0.015",
         "--set", "rollout.groups_per_call=1"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    result = CliRunner().invoke(main, ["keys", str(d / "run"), "--client", "good"])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(main, ["keys", str(d / "other"), "--client", "bad"]).exit_code == 0
    return d


def test_flux_keys_makes_a_key_directory_and_keeps_existing_keys(keys):
    run = keys / "run"
    assert sorted(p.name for p in run.iterdir()) == ["authorized", "good.key_secret", "server.key",
                                                      "server.key_secret"]
    assert [p.name for p in (run / "authorized").iterdir()] == ["good.key"]
    for secret in ("server.key_secret", "good.key_secret"):
        assert stat.S_IMODE((run / secret).stat().st_mode) == 0o600
    server = (run / "server.key").read_text()
    result = CliRunner().invoke(main, ["keys", str(run), "--client", "later"])
    assert result.exit_code == 0 and "later.key_secret" in result.output
    assert (run / "server.key").read_text() == server            # a second client, the same run key
    (run / "authorized" / "later.key").unlink()
    (run / "later.key_secret").unlink()


def test_remote_config_needs_keys_and_allows_zero_local_generators(tmp_path):
    with pytest.raises(ConfigError, match="rollout.num_generators"):
        load_config(None, ["rollout.num_generators=0"])
    with pytest.raises(ConfigError, match="net.keys"):
        load_config(None, ["net.remote=true"])
    cfg = load_config(None, ["net.remote=true", f"net.keys={tmp_path}", "rollout.num_generators=0"])
    assert cfg.rollout.num_generators == 0


def test_a_run_with_remote_on_and_no_keys_stops_before_any_actor(default_model, tmp_path):
    proc = subprocess.run(train_cmd("--set", "net.remote=true", "--set", f"net.keys={tmp_path / 'nope'}",
                                    "--out", str(tmp_path / "run")), capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith("flux: error: ") and "flux keys" in proc.stderr, proc.stderr
    assert not (tmp_path / "run" / "spec.json").exists()


def test_a_remote_peer_speaks_only_for_remote_generators(tmp_path, keys):
    cfg = FluxConfig(rollout={"group_size": 4}, learner={"groups_per_step": 2},
                     net={"remote": True, "keys": str(keys / "run")}).validate()
    remote = {"keys": str(keys / "run"), "router": "tcp://127.0.0.1:5", "pub": "tcp://127.0.0.1:6",
              "pull": "tcp://127.0.0.1:7", "weights": "tcp://127.0.0.1:8", "connect": "tcp://127.0.0.1:5"}
    spec = RunSpec("r1", str(tmp_path), "m", "tcp://a:1", "tcp://a:2", "tcp://a:3", "tcp://a:4", 558, cfg,
                   remote=remote)
    ctl = Controller(spec, logging.getLogger("test"))
    try:
        ctl.handle(None, P.Register("generator", "gen0", 1, "h"))
        info = ctl.handle(None, M.RunInfoRequest("gen0", "far"), remote=True)
        assert info.name == "gen0-2" and info.ports == {"pub": 6, "pull": 7, "weights": 8}
        assert info.config["rollout"]["group_size"] == 4 and len(info.prompts_digest) == 64
        assert info.weights_token == ""                                   # CURVE stream: no token
        assert ctl.handle(None, M.RunInfoRequest("gen0", "far"), remote=True).name == "gen0-3"
        welcome = ctl.handle(None, P.Register("generator", "gen0-2", 9, "far"), remote=True)
        assert ctl.members["gen0-2"].remote and welcome.weights is None
        ctl.handle(None, P.Published(1, {"kind": "shm", "name": "x", "version": 1, "nbytes": 64, "host": "h"}))
        again = ctl.handle(None, P.Register("generator", "gen0-2", 9, "far"), remote=True)
        assert again.weights == {"kind": "stream", "version": 1, "nbytes": 64}   # never a local shm handle
        # a remote peer cannot pose as the learner or buffer, nor speak in a local generator's name
        before = ctl.drops.total
        for msg in (P.Published(2, {"kind": "shm", "name": "y", "version": 2}), P.StepReport(0, 2, {}),
                    P.BufferReport(0, 0, {}), P.Register("learner", "learner", 3, "far"),
                    P.Goodbye("generator", "gen0", "x", True), P.AdmitRequest("gen0", 4)):
            assert ctl.handle(None, msg, remote=True) is None
        assert ctl.drops.total == before + 6
        assert ctl.admission.version == 1 and "gen0" in ctl.members and "learner" not in ctl.members
        assert ctl.handle(None, P.AdmitRequest("gen0-2", 1), remote=True).groups
    finally:
        ctl.metrics.close()


def test_an_unencrypted_weight_stream_takes_a_token_per_remote_generator(tmp_path, keys):
    cfg = FluxConfig(net={"remote": True, "keys": str(keys / "run"), "weight_stream": "plain"}).validate()
    remote = {"keys": str(keys / "run"), "router": "tcp://h:5", "pub": "tcp://h:6", "pull": "tcp://h:7",
              "weights": "tcp://h:8", "connect": "tcp://h:5"}
    spec = RunSpec("r1", str(tmp_path), "m", "tcp://a:1", "tcp://a:2", "tcp://a:3", "tcp://a:4", 558, cfg,
                   remote=remote)
    ctl = Controller(spec, logging.getLogger("test"))
    try:
        a = ctl.handle(None, M.RunInfoRequest("a", "far"), remote=True)
        b = ctl.handle(None, M.RunInfoRequest("b", "far"), remote=True)
        assert len(a.weights_token) == 32 and a.weights_token != b.weights_token
        assert ctl.peers.weight_tokens == {a.weights_token, b.weights_token}
        ctl.handle(None, P.Register("generator", "a", 9, "far"), remote=True)
        ctl.handle(None, P.Goodbye("generator", "a", "SIGTERM", True), remote=True)
        assert ctl.peers.weight_tokens == {b.weights_token}                   # withdrawn when it leaves
        rank = ctl.handle(None, M.RunInfoRequest("learner1", "far", True), remote=True)  # flux learner --join
        assert rank.name == "learner1" and rank.weights_token == ""           # nothing to withdraw later
        assert ctl.peers.weight_tokens == {b.weights_token} and "learner1" not in ctl.peers.handed_out
    finally:
        ctl.metrics.close()


# ---------------------------------------------------------------- end to end
def start_train(run_dir: Path, keys: Path, *args) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True)
    log = run_dir.parent / "launcher.out"
    with open(log, "w") as out:
        proc = subprocess.Popen(train_cmd(*PACED, "--set", "net.remote=true", "--set", f"net.keys={keys}", *args,
                                          "--out", str(run_dir)), stdout=out, stderr=subprocess.STDOUT)
    wait_for(lambda: (run_dir / "logs" / "controller.log").exists()
             and "remote endpoints up" in (run_dir / "logs" / "controller.log").read_text(), 90, "the controller")
    return proc, log


def start_generator(run_dir: Path, key: Path, name: str, *extra) -> tuple[subprocess.Popen, Path]:
    connect = json.loads((run_dir / "spec.json").read_text())["remote"]["connect"]
    out = run_dir.parent / f"gen-{name}"
    log = run_dir.parent / f"gen-{name}.out"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "flux.cli", "generator", "--connect", connect, "--key",
                                 str(key), "--name", name, "--out", str(out), *extra],
                                stdout=f, stderr=subprocess.STDOUT)
    return proc, log


def status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def finish(proc: subprocess.Popen, timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_a_remote_generator_attaches_mid_run_trains_and_leaves(default_model, keys, tmp_path):
    run_dir = tmp_path / "run"
    steps = 60  # about 50 s with one generator: time for another to start on a busy machine
    proc, log = start_train(run_dir, keys / "run", "--max-steps", str(steps))
    gen = None
    try:
        wait_for(lambda: metrics(run_dir), 90, "the first step")           # the run is under way
        gen, gen_log = start_generator(run_dir, keys / "run" / "good.key_secret", "far")
        wait_for(lambda: status(run_dir).get("groups_by_generator", {}).get("far", 0) >= 2, 120,
                 "groups from the remote generator")
        at_leave = status(run_dir)["step"]
        gen.send_signal(signal.SIGTERM)
        assert finish(gen, 30) == 0, gen_log.read_text()
        code = finish(proc, 120)
    finally:
        for p in (proc, gen):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    text = log.read_text()
    assert code == 0, text
    assert at_leave is not None and at_leave < steps - 1                 # it left before the end
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(steps))
    assert any(r["generator_busy"].get("far", 0) > 0 for r in rows)      # the metrics show it working
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["by_generator"]["far"] >= 2 and groups["by_generator"]["gen0"] > 0
    assert groups["admitted"] == groups["trained"] + groups["dropped"] + groups["requeued"] \
        + groups["unfinished_at_stop"]
    controller = (run_dir / "logs" / "controller.log").read_text()
    assert "generator far registered" in controller and "generator far says goodbye (SIGTERM, ok=True)" in controller
    far = next(m for m in status(run_dir)["members"] if m["name"] == "far")
    assert far["state"] == "exited" and far["remote"]
    gen_text = gen_log.read_text()
    assert "attached to run" in gen_text and "left the run (SIGTERM)" in gen_text and "Traceback" not in gen_text
    # new versions reached it over the weight stream, whole and verified
    streamed = (tmp_path / "gen-far" / "logs" / "far.log").read_text()
    assert "weight stream {'versions': " in streamed and "'versions': 0," not in streamed, streamed
    assert_nothing_left(run_dir)
    assert processes_mentioning(str(tmp_path / "gen-far")) == []


def test_with_no_local_generator_a_refused_key_gets_nothing_and_an_authorised_one_runs_the_job(
        default_model, keys, tmp_path):
    run_dir = tmp_path / "run"
    proc, log = start_train(run_dir, keys / "run", "--max-steps", "4", "--set", "rollout.num_generators=0",
                            "--set", "net.weight_stream=plain")  # the other weight path (mid-run test: CURVE)
    gen = None
    try:
        bad, bad_log = start_generator(run_dir, keys / "other" / "bad.key_secret", "intruder",
                                       "--server-key", str(keys / "run" / "server.key"))
        assert finish(bad, 60) == 2
        assert "refused this key" in bad_log.read_text(), bad_log.read_text()
        controller = (run_dir / "logs" / "controller.log").read_text()
        assert "refused a CURVE client at 127.0.0.1" in controller, controller
        assert "intruder" not in controller and metrics(run_dir) == []  # no prompts, no work, no weights
        gen, gen_log = start_generator(run_dir, keys / "run" / "good.key_secret", "far")
        assert finish(gen, 120) == 0, gen_log.read_text()                # it ends with the run's Stop
        code = finish(proc, 60)
    finally:
        for p in (proc, gen):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert code == 0, log.read_text()
    assert [r["step"] for r in metrics(run_dir)] == [0, 1, 2, 3]
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["by_generator"] == {"far": groups["produced"]} and groups["trained"] == 8
    assert "left the run (finished)" in gen_log.read_text()
    streamed = (tmp_path / "gen-far" / "logs" / "far.log").read_text()
    assert "weight stream {'versions': " in streamed and "'versions': 0," not in streamed, streamed
    assert_nothing_left(run_dir)
    assert processes_mentioning(str(tmp_path / "gen-far")) == []
    assert not os.path.exists(tmp_path / "gen-intruder" / "logs" / "intruder.stderr")


def test_a_fixed_remote_port_takes_the_next_three_too(keys):
    import socket

    from flux.integrations.remote.side import remote_endpoints

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        base = s.getsockname()[1]
    cfg = load_config(None, ["net.remote=true", f"net.keys={keys / 'run'}", f"net.remote_port={base}"])
    try:
        ends = remote_endpoints(cfg)
    except ValueError:  # one of the next three happens to be taken on this machine
        pytest.skip("no four consecutive free ports")
    assert [ends[k] for k in ("router", "pub", "pull", "weights")] == [
        f"tcp://127.0.0.1:{base + i}" for i in range(4)]
    assert ends["connect"] == f"tcp://127.0.0.1:{base}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", base + 2))
        s.listen()
        with pytest.raises(ValueError, match=f"{base + 2}"):
            remote_endpoints(cfg)


def test_a_removed_key_is_refused_from_its_next_connection_and_its_connected_generator_cut_off(
        default_model, keys, tmp_path):
    """Before, the gatekeeper cached every key it had let in, so a deleted key kept working; and a generator
    already connected went on taking work and weights whatever its key's fate."""
    run_keys = keys / "run"
    assert CliRunner().invoke(main, ["keys", str(run_keys), "--client", "revoked"]).exit_code == 0
    key = run_keys / "revoked.key_secret"
    run_dir = tmp_path / "run"
    proc, log = start_train(run_dir, run_keys, "--max-steps", "80", "--set", "net.heartbeat_timeout_s=3")
    gen = again = None
    try:
        wait_for(lambda: metrics(run_dir), 90, "the first step")
        gen, gen_log = start_generator(run_dir, key, "far")
        wait_for(lambda: status(run_dir).get("groups_by_generator", {}).get("far", 0) >= 1, 120,
                 "a group from the remote generator")
        (run_keys / "authorized" / "revoked.key").unlink()
        removed_at = time.monotonic()
        assert finish(gen, 30) == 1, gen_log.read_text()                 # cut off, and it says so
        cut_after = time.monotonic() - removed_at
        assert "cut off by the run" in gen_log.read_text() and "Traceback" not in gen_log.read_text()
        again, again_log = start_generator(run_dir, key, "again")
        assert finish(again, 60) == 2 and "refused this key" in again_log.read_text(), again_log.read_text()
        code = finish(proc, 180)
    finally:
        (run_keys / "revoked.key_secret").unlink(missing_ok=True)
        for p in (proc, gen, again):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert code == 0, log.read_text()
    assert cut_after < 3 + 10                              # net.heartbeat_timeout_s (+ a busy machine's slack)
    controller = (run_dir / "logs" / "controller.log").read_text()
    assert "generator far cut off: its key was removed" in controller, controller
    far = next(m for m in status(run_dir)["members"] if m["name"] == "far")
    assert far["state"] == "dead" and far["reason"] == "key removed"
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["admitted"] == groups["trained"] + groups["dropped"] + groups["requeued"] \
        + groups["unfinished_at_stop"]
    assert_nothing_left(run_dir)
