"""`flux status`: reading a run directory (synthetic and real), live/finished/stale, rendering, errors."""

import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from flux.integrations.tools import status as S
from flux.cli import main
from flux.config import FluxConfig, dump_config

HOST = socket.gethostname()


def member(role, name, pid, alive=True, **over) -> dict:
    row = {"role": role, "name": name, "pid": pid, "host": HOST, "alive": alive,
           "state": "alive" if alive else "exited", "reason": "", "heartbeat_age_s": 0.2 if alive else None,
           "busy_frac": 0.5 if role in ("learner", "generator") else None, "version": 3}
    row.update(over)
    return row


def status_doc(pid: int, **over) -> dict:
    doc = {"run_id": "abcd1234", "time": time.time(), "started": time.time(), "heartbeat_s": 0.5,
           "state": "running", "reason": "", "step": 2, "max_steps": 10, "version": 3, "mode": "adaptive",
           "async_ratio": 0.42, "staleness_ema": 0.09, "target_staleness": 0.1, "buffer_depth": 5,
           "members": [member("controller", "controller", pid), member("buffer", "buffer", pid),
                       member("learner", "learner", pid, busy_frac=0.66),
                       member("generator", "gen0", pid, busy_frac=0.81, version=2),
                       member("generator", "gen1", pid, alive=False, state="dead", reason="silent for 5s")]}
    doc.update(over)
    return doc


def rows(n: int) -> list[dict]:
    return [{"step": i, "version": i + 1, "reward_mean": 0.25 + i / 100, "eval_score": 0.5, "wall_s": 1.0 + i,
             "staleness_mean": 0.12, "staleness_ema": 0.09, "async_ratio": 0.42, "lag_mean": 0.5, "lag_max": 1,
             "samples_per_s": 123.4, "tokens_per_s": 900.0, "dropped_stale": 1} for i in range(n)]


def make_run(d: Path, status: dict | None, n_rows: int = 3) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    dump_config(FluxConfig(max_steps=10), d / "config.yaml")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n_rows)))
    if status is not None:
        S.write_status(d, status)
    return d


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_live_run_renders_every_number(tmp_path):
    d = make_run(tmp_path / "run", status_doc(os.getpid()))
    view = S.read_run(d)
    assert view.state == "live" and view.last["step"] == 2
    text = S.render(view)
    lines = text.splitlines()
    assert lines[0].startswith("flux run abcd1234") and "LIVE (updated" in lines[0]
    assert "step 3/10" in text and "version 3" in text and "mode adaptive" in text
    assert "reward 0.270" in text and "eval 0.500" in text and "samples/s 123.4" in text
    assert "async ratio 0.42" in text and "staleness 0.120 (RMS 0.090, target 0.100)" in text
    assert "lag mean 0.50 max 1" in text and "buffer 5 groups" in text and "dropped stale 1 groups" in text
    table = {line.split()[1]: line.split() for line in lines if line.split()[0] in
             ("controller", "buffer", "learner", "generator")}
    assert table["learner"][3:] == ["alive", f"{0.2 + view.age_s:.1f}s", "ago", "0.66", "3"]
    assert table["gen0"][3:] == ["alive", f"{0.2 + view.age_s:.1f}s", "ago", "0.81", "2"]
    assert "dead (silent for 5s)" in text


def test_finished_stale_and_starting(tmp_path):
    done = make_run(tmp_path / "done", status_doc(os.getpid(), state="stopped", reason="finished"))
    assert (S.read_run(done).state, S.read_run(done).detail) == ("finished", "")
    killed = make_run(tmp_path / "killed", status_doc(os.getpid(), state="stopped", reason="signal SIGTERM"))
    assert S.read_run(killed).state == "stopped"
    assert S.render(S.read_run(killed)).splitlines()[0].endswith("STOPPED (signal SIGTERM)")

    gone = dead_pid()
    crashed = make_run(tmp_path / "crashed", status_doc(gone, members=[member("controller", "controller", gone),
                                                                        member("learner", "learner", gone)]))
    view = S.read_run(crashed)
    assert view.state == "stale" and f"controller pid {gone} gone" in view.detail
    assert f"learner     learner     {gone}  exited" in S.render(view)

    quiet = make_run(tmp_path / "quiet", status_doc(os.getpid(), time=time.time() - 60))
    assert S.read_run(quiet).state == "stale" and "no update for 60s" in S.read_run(quiet).detail

    starting = make_run(tmp_path / "starting", None, n_rows=0)
    (starting / "spec.json").write_text("{}")
    view = S.read_run(starting)
    assert view.state == "starting" and view.last is None
    assert "actors: none reported yet" in S.render(view) and "step 0/10" in S.render(view)
    (starting / "groups.json").write_text('{"reason": "finished"}')   # a Flux without status.json
    assert S.read_run(starting).state == "finished"
    (starting / "groups.json").write_text('{"reason": "learner learner died: boom"}')
    assert (S.read_run(starting).state, S.read_run(starting).detail) == ("stopped", "learner learner died: boom")


def test_a_pid_reused_after_the_run_started_is_not_the_controller(tmp_path):
    d = make_run(tmp_path / "run", status_doc(os.getpid(), started=time.time() - 10 * 365 * 86400))
    assert S.read_run(d).state == "stale"


def test_last_row_skips_a_half_written_line_and_reads_only_the_tail(tmp_path):
    path = tmp_path / "metrics.jsonl"
    big = [{"step": i, "pad": "x" * 300} for i in range(500)]
    path.write_text("".join(json.dumps(r) + "\n" for r in big) + '{"step": 500, "pa')
    assert S.last_row(path, chunk=256)["step"] == 499
    path.write_text('{"step": 0}')            # no complete line yet
    assert S.last_row(path) is None
    path.write_text("")
    assert S.last_row(path) is None


def test_follow_on_a_terminal_redraws_in_place(tmp_path, monkeypatch):
    d = make_run(tmp_path / "run", status_doc(os.getpid()))

    class Tty(io.StringIO):
        def isatty(self):
            return True

    def sleep(_):  # the run ends during the first wait
        S.write_status(d, status_doc(os.getpid(), state="stopped", reason="finished"))

    monkeypatch.setattr(S.time, "sleep", sleep)
    out = Tty()
    assert S.watch(d, None, 0.01, out) == 0                     # a terminal follows by default
    first, second = out.getvalue().split("\033[", 1)
    height = first.count("\n")
    assert second.startswith(f"{height}F\033[J")                  # back to the block's first line, clear
    assert "LIVE" in first and "FINISHED" in second and out.getvalue().count("flux run") == 2


def test_follow_without_a_terminal_prints_plain_blocks(tmp_path, monkeypatch):
    d = make_run(tmp_path / "run", status_doc(os.getpid()))
    monkeypatch.setattr(S.time, "sleep", lambda _: S.write_status(d, status_doc(os.getpid(), state="stopped")))
    out = io.StringIO()
    S.watch(d, True, 0.01, out)
    text = out.getvalue()
    assert "\033" not in text and text.count("flux run") == 2 and "\n\nflux run" in text
    once = io.StringIO()
    S.watch(make_run(tmp_path / "live", status_doc(os.getpid())), None, 0.01, once)  # not a tty: once
    assert once.getvalue().count("flux run") == 1


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such run directory"),
    ("empty", "not a Flux run directory"),
    ("garbage status", "status.json: unreadable"),
    ("not a status", "not a Flux status file"),
    ("garbage metrics", "metrics.jsonl: last line is not JSON"),
    ("garbage config", "config.yaml"),
])
def test_bad_run_dirs_give_one_error_line_and_exit_2(tmp_path, case, needle):
    d = tmp_path / "run"
    if case == "empty":
        d.mkdir()
    elif case != "missing":
        make_run(d, status_doc(os.getpid()))
        if case == "garbage status":
            (d / "status.json").write_text("{not json")
        elif case == "not a status":
            (d / "status.json").write_text("[1, 2]")
        elif case == "garbage metrics":
            with (d / "metrics.jsonl").open("a") as f:
                f.write("{oops\n")
        else:
            (d / "config.yaml").write_text("a: [unclosed\n")
    result = CliRunner().invoke(main, ["status", str(d), "--once"])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flux: error: ") and needle in lines[0], lines
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_controller_status_lists_alive_exited_and_dead_members(tmp_path):
    import logging

    from actors.controller import Controller
    from flux.run import protocol as P
    from flux.run.runtime import RunSpec

    cfg = FluxConfig(max_steps=7, rollout={"group_size": 4}, learner={"groups_per_step": 2}).validate()
    spec = RunSpec("r1", str(tmp_path), "m", "tcp://a:1", "tcp://a:2", "tcp://a:3", "tcp://a:4", 10, cfg)
    ctl = Controller(spec, logging.getLogger("test"))
    for role, name, pid in [("buffer", "buffer", 11), ("learner", "learner", 12), ("generator", "gen0", 13),
                            ("generator", "gen1", 14), ("generator", "gen2", 15)]:
        ctl.handle(None, P.Register(role, name, pid, HOST))
    ctl.handle(None, P.Heartbeat("buffer", "buffer", 0.0, {"depth": 6}))
    ctl.handle(None, P.Heartbeat("generator", "gen0", 0.75, {"version": 0}))
    ctl.handle(None, P.Goodbye("generator", "gen1", "SIGTERM", True))
    ctl.members["gen2"].last_seen -= 60
    ctl.check_liveness()
    doc = ctl.status()
    rows = {m["name"]: m for m in doc["members"]}
    assert (doc["state"], doc["max_steps"], doc["buffer_depth"], doc["mode"]) == ("running", 7, 6, "adaptive")
    assert rows["controller"]["pid"] == os.getpid() and rows["controller"]["alive"]
    assert (rows["gen0"]["alive"], rows["gen0"]["busy_frac"], rows["gen0"]["version"]) == (True, 0.75, 0)
    assert (rows["gen1"]["state"], rows["gen1"]["reason"]) == ("exited", "SIGTERM")
    assert (rows["gen2"]["state"], rows["gen2"]["reason"]) == ("dead", "silent for 5s")
    assert rows["buffer"]["busy_frac"] is None and rows["learner"]["version"] == 0
    S.write_status(tmp_path, ctl.status(stopped="finished"))
    ctl.metrics.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "status.json"]  # no temp file left
    final = json.loads((tmp_path / "status.json").read_text())
    assert final["state"] == "stopped" and final["members"][0]["state"] == "exited"


# ---- a real run -------------------------------------------------------------------------------------

def test_status_and_plot_of_a_real_run(default_model, tmp_path):
    """One short `flux train`: status.json while it runs (live, every actor), then finished; plot works."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "flux.cli", "train", "--max-steps", "4", "--set", "learner.groups_per_step=2",
           "--set", "rollout.group_size=4", "--set", "eval.num_prompts=20", "--out", str(run_dir),
           "--set", "rollout.slowdown=0.02"]  # ~5 s of steps: several status rewrites while all are alive
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = None
    try:
        end = time.monotonic() + 120
        while time.monotonic() < end and proc.poll() is None and seen is None:
            try:
                view = S.read_run(run_dir)
            except S.StatusError:  # the directory is not there yet
                view = None
            roles = {m["role"] for m in (view.status or {}).get("members", [])} if view else set()
            if view and view.state == "live" and {"controller", "buffer", "learner", "generator"} <= roles:
                seen, pids = view, [S.pid_alive(m["pid"], m["host"]) for m in view.status["members"]]
            time.sleep(0.05)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    assert seen is not None, "never saw a live status with every actor"
    assert all(m["alive"] for m in seen.status["members"]) and pids == [True] * 4
    assert "LIVE" in S.render(seen)

    final = subprocess.run([sys.executable, "-m", "flux.cli", "status", str(run_dir)], capture_output=True,
                           text=True, timeout=60, check=False)
    assert final.returncode == 0, final.stderr
    text = final.stdout
    assert text.count("flux run") == 1 and "FINISHED" in text and "step 4/4" in text
    assert "version 4" in text and "gen0" in text and "learner" in text
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "stopped" and status["reason"] == "finished" and status["step"] == 3
    metrics = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert set(metrics[-1]["generator_busy"]) == {"gen0"}

    if importlib.util.find_spec("matplotlib") is None:
        return  # `flux plot` needs the plot extra; its tests say so
    plot = subprocess.run([sys.executable, "-m", "flux.cli", "plot", str(run_dir)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert plot.returncode == 0, plot.stderr
    png = run_dir / "plot.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {png}" in plot.stdout
