"""`flux status`: what a run is doing, read from its run directory.

While a run is live its controller rewrites RUN_DIR/status.json about once per heartbeat period
(`net.heartbeat_s`): membership (role, name, pid, host, heartbeat age, busy fraction, version) and its own
numbers (version, async ratio, the controller's smoothed staleness (an RMS) and target, buffer depth).
The per-step numbers (reward, eval score, lag, samples/s) come from the last line of metrics.jsonl. A run is

    live      status.json is fresh and the controller's pid exists
    finished  the controller wrote its final status.json (state `stopped`) because the learner finished
    stopped   the same, for another reason (a signal, Ctrl-C, an actor's death): the reason is shown
    stale     status.json stopped changing, or the controller's pid is gone without a final status
    starting  no status.json yet, and spec.json was written in the last minute
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from flux.run.runtime import STATUS_FILE, write_status  # noqa: F401  (the writer lives in the core)

STARTING_GRACE_S = 60.0  # how long a run may go without status.json before it counts as stale


class StatusError(ValueError):
    """The run directory is missing or unreadable; the message is one line."""


@dataclass
class RunView:
    """One reading of a run directory."""

    run_dir: Path
    state: str                  # live | finished | stopped | stale | starting
    detail: str                 # why that state (a reason, or how old the last update is)
    status: dict | None         # status.json, if any
    last: dict | None           # the last metrics.jsonl row, if any
    config: dict                # config.yaml as written (empty if absent)
    age_s: float | None         # seconds since status.json was written


def read_run(run_dir: str | Path, now: float | None = None) -> RunView:
    """Read status.json, the tail of metrics.jsonl and config.yaml; decide live / finished / stale."""
    d = Path(run_dir)
    now = time.time() if now is None else now
    if not d.is_dir():
        raise StatusError(f"{d}: no such run directory")
    known = ("config.yaml", "spec.json", "metrics.jsonl", STATUS_FILE)
    if not any((d / name).exists() for name in known):
        raise StatusError(f"{d}: not a Flux run directory (no config.yaml, status.json or metrics.jsonl)")
    config = _load(d / "config.yaml", yaml.safe_load) or {}
    if not isinstance(config, dict):
        raise StatusError(f"{d / 'config.yaml'}: not a mapping of config keys")
    status = _load(d / STATUS_FILE, json.loads)
    if status is not None and not (isinstance(status, dict) and isinstance(status.get("time"), (int, float))):
        raise StatusError(f"{d / STATUS_FILE}: not a Flux status file")
    last = last_row(d / "metrics.jsonl")
    state, detail, age = _liveness(d, status, now)
    return RunView(d, state, detail, status, last, config, age)


def _load(path: Path, parse):
    """Parse a file, None if it does not exist; StatusError naming it if it is garbage."""
    try:
        return parse(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, yaml.YAMLError) as e:
        why = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise StatusError(f"{path}: unreadable ({why})") from None


def last_row(path: Path, chunk: int = 1 << 16) -> dict | None:
    """The last complete line of a JSONL file, reading only its tail (a half-written line is skipped)."""
    try:
        with path.open("rb") as f:
            size = f.seek(0, os.SEEK_END)
            start = size
            while start > 0:
                start = max(0, start - chunk)
                f.seek(start)
                data = f.read(size - start)
                lines = data[: data.rfind(b"\n") + 1].splitlines()
                if len(lines) > 1 or (lines and start == 0):
                    break
                chunk *= 2
            else:
                return None
    except FileNotFoundError:
        return None
    if not lines:
        return None
    try:
        row = json.loads(lines[-1])
    except ValueError:
        raise StatusError(f"{path}: last line is not JSON") from None
    if not isinstance(row, dict):
        raise StatusError(f"{path}: last line is not a JSON object")
    return row


def pid_alive(pid, host: str | None = None, since: float | None = None) -> bool | None:
    """Whether `pid` runs here (None: on another host, can't tell). A process younger than `since`
    (a wall time) is a reused pid, not ours."""
    if host and host != socket.gethostname():
        return None
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (since is None or proc.create_time() <= since + 1.0)
    except psutil.Error:
        return False


def _liveness(d: Path, status: dict | None, now: float) -> tuple[str, str, float | None]:
    if status is None:
        groups = _load(d / "groups.json", json.loads)
        if isinstance(groups, dict):  # groups.json is written at stop, by a Flux without status.json
            reason = str(groups.get("reason", ""))
            return ("finished", "", None) if reason == "finished" else ("stopped", reason, None)
        spec = d / "spec.json"
        if spec.exists() and now - spec.stat().st_mtime < STARTING_GRACE_S:
            return "starting", "no status.json yet", None
        return "stale", "no status.json (not started, or written by an older Flux)", None
    age = max(0.0, now - status["time"])
    if status.get("state") == "stopped":
        reason = str(status.get("reason", ""))
        return ("finished", "", age) if reason == "finished" else ("stopped", reason, age)
    ctl = next((m for m in status.get("members", []) if m.get("role") == "controller"), {})
    alive = pid_alive(ctl.get("pid"), ctl.get("host"), status.get("started"))
    stale_after = max(5.0, 4 * float(status.get("heartbeat_s", 1.0)))
    if alive is False:
        return "stale", f"controller pid {ctl.get('pid')} gone without a final status: killed or crashed", age
    if age > stale_after:
        return "stale", f"no update for {age:.0f}s", age
    return "live", f"updated {age:.1f}s ago", age


# ---- rendering --------------------------------------------------------------------------------------

def _num(value, fmt: str, missing: str = "-") -> str:
    return missing if not isinstance(value, (int, float)) or isinstance(value, bool) else format(value, fmt)


def render(view: RunView) -> str:
    """The status block: run, progress, control loop, numbers, then one line per actor."""
    s, m, cfg = view.status or {}, view.last or {}, view.config
    aa = cfg.get("adaptive_async") or {}
    max_steps = s.get("max_steps", cfg.get("max_steps"))
    step = m["step"] + 1 if isinstance(m.get("step"), int) else 0
    target = s.get("target_staleness", aa.get("target_staleness"))
    lines = [
        (f"flux run {s.get('run_id', '?')}  {view.run_dir}  {view.state.upper()}"
         + (f" ({view.detail})" if view.detail else "")),
        (f"step {step}/{_num(max_steps, 'd', '?')}  version {_num(m.get('version', s.get('version')), 'd')}  "
         f"mode {s.get('mode', aa.get('mode', '?'))}  wall {_num(m.get('wall_s'), '.0f')} s"),
        (f"reward {_num(m.get('reward_mean'), '.3f')}  eval {_num(m.get('eval_score'), '.3f')}  "
         f"samples/s {_num(m.get('samples_per_s'), '.1f')}  tokens/s {_num(m.get('tokens_per_s'), '.0f')}"),
        (f"async ratio {_num(m.get('async_ratio', s.get('async_ratio')), '.2f')}  "
         f"staleness {_num(m.get('staleness_mean'), '.3f')} "
         f"(RMS {_num(m.get('staleness_ema', s.get('staleness_ema')), '.3f')}, "
         f"target {_num(target, '.3f')})"),
        (f"lag mean {_num(m.get('lag_mean'), '.2f')} max {_num(m.get('lag_max'), '.0f')}  "
         f"buffer {_num(s.get('buffer_depth'), 'd')} groups  "
         f"dropped stale {_num(m.get('dropped_stale'), 'd')} groups"),
    ]
    members = s.get("members", [])
    if members:
        rows = [("role", "name", "pid", "state", "heartbeat", "busy", "version")]
        rows += [_member_row(x, view) for x in members]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    else:
        lines.append("actors: none reported yet")
    return "\n".join(lines)


def _member_row(x: dict, view: RunView) -> tuple[str, ...]:
    alive = bool(x.get("alive"))
    if alive and view.state != "live":  # the controller's last word is old: ask the OS
        alive = pid_alive(x.get("pid"), x.get("host"))
        state = {True: "alive", False: "exited", None: "unknown"}[alive]
    elif alive:
        state = "alive"
    else:
        state = f"{x.get('state', 'gone')} ({x.get('reason') or '?'})"
    age = x.get("heartbeat_age_s")
    beat = f"{age + (view.age_s or 0.0):.1f}s ago" if alive and isinstance(age, (int, float)) else "-"
    return (str(x.get("role", "?")), str(x.get("name", "?")), str(x.get("pid", "?")), state, beat,
            _num(x.get("busy_frac"), ".2f"), _num(x.get("version"), "d"))


def watch(run_dir: str | Path, follow: bool | None = None, interval: float = 1.0, stream=sys.stdout) -> int:
    """Print the status block; with `follow` (default: on a terminal) redraw it until the run ends.

    On a terminal the previous block is cleared and redrawn in place; otherwise each refresh prints a
    new block after a blank line, so logs and pipes get plain text.
    """
    tty = stream.isatty()
    follow = tty if follow is None else follow
    height = 0
    while True:
        view = read_run(run_dir)
        text = render(view)
        if height:
            stream.write(f"\033[{height}F\033[J" if tty else "\n")  # up to the old block's start; clear
        stream.write(text + "\n")
        stream.flush()
        height = text.count("\n") + 1
        if not follow or view.state in ("finished", "stopped", "stale"):
            return 0
        time.sleep(interval)
