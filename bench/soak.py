"""Soak: a long adaptive run with faults injected on a schedule; memory, descriptors and groups watched.

    python bench/soak.py [--minutes 30] [--kill-every 5] [--json bench/results/soak.json]

One `flux train` (adaptive, the built-in task, one local generator, `net.remote` on) for --minutes, with:
- a remote generator (`flux generator --connect`) SIGKILLed every --kill-every minutes and started again
  (its groups must be re-queued each time);
- a second remote generator attaching and leaving (SIGTERM, a Goodbye) every --kill-every minutes, half a
  period out of phase;
- every minute, a burst of malformed and lying messages at the local buffer and controller sockets
  (random bytes, cut or bit-flipped real messages, groups never admitted).
Every minute it samples the RSS and open file descriptors of every actor (the run's and the remote
generators'). At the end it stops the run with SIGINT (drain, groups.json written) and checks: RSS growth
of each actor after the first --warmup minutes, FD growth, shared-memory segments left in /dev/shm, and
that every admitted group is accounted for (trained, dropped with a reason, re-queued, or in flight).

Targets (issue "Nothing lost"): RSS growth < 5 % after the first 5 minutes, no FD growth (the most
descriptors open in the last third of the run ≤ the most in the first third: they move with connections),
no leaked segments, groups lost = 0. Not part of CI: it takes --minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from common import machine, write_json  # noqa: E402


def actors_of(spec: Path, extra_dirs: list[Path]) -> dict[str, psutil.Process]:
    """name -> process, for the run's actors (by spec path) and remote generators (by their out dir)."""
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
        except psutil.Error:
            continue
        if str(spec) in cmd and "--name" in cmd:
            found[cmd.split("--name", 1)[1].split()[0]] = p
        for d in extra_dirs:
            if "generator" in cmd and f"--out {d}" in cmd:
                found[d.name] = p
    return found


def sample(procs: dict[str, psutil.Process]) -> dict[str, dict]:
    out = {}
    for name, p in procs.items():
        try:
            out[name] = {"rss_mb": p.memory_info().rss / 2**20, "fds": p.num_fds()}
        except psutil.Error:
            pass
    return out


def start_remote(connect: str, key: Path, name: str, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flux.cli", "generator", "--connect", connect, "--key", str(key),
                             "--name", name, "--out", str(out)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def fuzz_burst(spec: dict, rng: random.Random, n: int = 200) -> int:
    """Malformed and lying messages at the local sockets; returns how many were sent."""
    import zmq

    from flux.run import protocol as P
    from tests.test_fuzz_actors import forged_group, malformed, unexpected_messages

    ctx = zmq.Context()
    sent = 0
    try:
        for where, kind in (("controller_router", zmq.DEALER), ("buffer_pull", zmq.PUSH)):
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDTIMEO, 1000)  # a peer gone (the run ending) must not block the soak
            try:
                sock.connect(spec[where])
                for i in range(n):
                    frames = malformed(rng, unexpected_messages(where))
                    sock.send_multipart([b"", *frames] if kind == zmq.DEALER else frames)
                    sent += 1
                if where == "buffer_pull":
                    for i in range(n // 10):  # well-formed, never admitted (no token)
                        P.send(sock, forged_group(10**9 + rng.randrange(10**6), "", token=""))
                        sent += 1
            except zmq.Again:
                pass
            finally:
                sock.close()
    finally:
        ctx.destroy(linger=1000)
    return sent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--kill-every", type=float, default=5.0, help="minutes between faults of each kind")
    ap.add_argument("--warmup", type=float, default=5.0, help="minutes before RSS growth is measured")
    ap.add_argument("--sample-every", type=float, default=1.0, help="minutes between samples")
    ap.add_argument("--json", default="bench/results/soak.json")
    ap.add_argument("--out", default="")
    args = ap.parse_args()

    from flux.integrations.remote.auth import make_keys

    work = Path(args.out or tempfile.mkdtemp(prefix="flux-soak-"))
    keys = work / "keys"
    make_keys(keys, ["killed", "visitor"])
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "flux.cli", "train", "--max-steps", "10000000", "--out", str(run_dir),
           "--set", "net.remote=true", "--set", f"net.keys={keys}", "--set", "net.heartbeat_timeout_s=3",
           "--set", "checkpoint.every=500", "--set", "checkpoint.keep_last=2", "--set", "eval.every=200"]
    log = open(work / "train.out", "w")
    train = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                             start_new_session=True)
    spec_path = run_dir / "spec.json"
    t0 = time.monotonic()
    while not (run_dir / "metrics.jsonl").exists():
        if train.poll() is not None or time.monotonic() - t0 > 300:
            print("the run did not start; see", work / "train.out", file=sys.stderr)
            return 1
        time.sleep(0.5)
    spec = json.loads(spec_path.read_text())
    connect = spec["remote"]["connect"]
    killed_dir, visitor_dir = work / "gen-killed", work / "gen-visitor"
    killed = start_remote(connect, keys / "killed.key_secret", "killed", killed_dir)
    visitor = None
    rng = random.Random(0)
    events, samples = [], []
    faults = {"remote_generator_sigkilled": 0, "remote_generator_restarted": 0, "visitor_attached": 0,
              "visitor_left": 0, "fuzz_messages_sent": 0}
    period, end = args.kill_every * 60, t0 + args.minutes * 60
    next_kill, next_visit, next_sample = t0 + period, t0 + period / 2, t0
    interrupted = False
    try:
        while time.monotonic() < end and train.poll() is None:
            now = time.monotonic()
            if now >= next_sample:
                next_sample += args.sample_every * 60
                faults["fuzz_messages_sent"] += fuzz_burst(spec, rng)
                row = {"t_min": (now - t0) / 60, "actors": sample(actors_of(spec_path, [killed_dir, visitor_dir]))}
                samples.append(row)
                print(f"{row['t_min']:5.1f} min  " + "  ".join(
                    f"{k} {v['rss_mb']:.0f}MB/{v['fds']}fd" for k, v in sorted(row["actors"].items())), flush=True)
            if now >= next_kill:
                next_kill += period
                killed.send_signal(signal.SIGKILL)
                killed.wait(30)
                faults["remote_generator_sigkilled"] += 1
                time.sleep(5)  # past net.heartbeat_timeout_s: declared dead, its groups re-queued
                killed = start_remote(connect, keys / "killed.key_secret", "killed", killed_dir)
                faults["remote_generator_restarted"] += 1
                events.append({"t_min": (time.monotonic() - t0) / 60, "event": "remote generator killed, restarted"})
            if now >= next_visit:
                next_visit += period
                if visitor is None:
                    visitor = start_remote(connect, keys / "visitor.key_secret", "visitor", visitor_dir)
                    faults["visitor_attached"] += 1
                    events.append({"t_min": (now - t0) / 60, "event": "visitor attached"})
                else:
                    visitor.send_signal(signal.SIGTERM)
                    visitor.wait(60)
                    visitor = None
                    faults["visitor_left"] += 1
                    events.append({"t_min": (now - t0) / 60, "event": "visitor left"})
            time.sleep(1)
    except KeyboardInterrupt:  # stop early, but still stop the run cleanly and report what was measured
        interrupted = True
    finally:
        for p in (killed, visitor):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
        if train.poll() is None:
            os.kill(train.pid, signal.SIGINT)  # the launcher's Ctrl-C: stop, drain, groups.json
            try:
                train.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(train.pid, signal.SIGKILL)
        log.close()
    time.sleep(2)
    leaked = sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"flux-{spec['run_id']}-"))
    orphans = sorted(actors_of(spec_path, [killed_dir, visitor_dir]))
    groups = json.loads((run_dir / "groups.json").read_text())
    lost = groups["admitted"] - (groups["trained"] + groups["dropped"] + groups["requeued"]
                                 + groups["unfinished_at_stop"])
    status = json.loads((run_dir / "status.json").read_text())
    dropped_messages = status.get("dropped_messages", {})

    growth = {}
    after = [s for s in samples if s["t_min"] >= args.warmup]
    for name in sorted({n for s in samples for n in s["actors"]}):
        series = [s["actors"][name] for s in after if name in s["actors"]]
        if len(series) >= 2:
            growth[name] = {"rss_first_mb": series[0]["rss_mb"], "rss_last_mb": series[-1]["rss_mb"],
                            "rss_max_mb": max(x["rss_mb"] for x in series),
                            "rss_growth_pct": 100 * (series[-1]["rss_mb"] / series[0]["rss_mb"] - 1),
                            "fds_first": series[0]["fds"], "fds_last": series[-1]["fds"],
                            "fds_max": max(x["fds"] for x in series),
                            "fds_max_first_third": max(x["fds"] for x in series[:max(1, len(series) // 3)]),
                            "fds_max_last_third": max(x["fds"] for x in series[-max(1, len(series) // 3):])}
    # The killed generator is a new process after each restart: its growth is per life, not measured here.
    steady = {k: v for k, v in growth.items() if k not in ("killed", "visitor")}
    targets = {
        "rss_growth_below_5pct": all(v["rss_growth_pct"] < 5 for v in steady.values()),
        # Descriptors move with connections (a visitor attached or not): growth is a trend, so the most
        # open in the last third of the run may not exceed the most open in the first third.
        "no_fd_growth": all(v["fds_max_last_third"] <= v["fds_max_first_third"] for v in steady.values()),
        "no_leaked_segments": not leaked,
        "no_orphans": not orphans,
        "groups_lost_zero": lost == 0,
    }
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result = {"machine": machine(), "minutes": args.minutes, "interrupted": interrupted, "steps": len(rows), "faults": faults, "events": events,
              "groups": groups, "groups_lost": lost, "dropped_messages": dropped_messages,
              "leaked_segments": leaked, "orphans": orphans, "growth_after_warmup": growth, "samples": samples,
              "targets": targets, "run_dir": str(run_dir)}
    print(f"\n{len(rows)} steps in {args.minutes:g} min; faults {faults}")
    print(f"groups {groups}; lost {lost}")
    print(f"dropped messages {dropped_messages}")
    print(f"{'actor':10} {'RSS first':>10} {'RSS last':>9} {'growth':>7} {'FDs first':>9} {'FDs last':>8}")
    for name, v in growth.items():
        print(f"{name:10} {v['rss_first_mb']:9.0f}M {v['rss_last_mb']:8.0f}M {v['rss_growth_pct']:6.1f}% "
              f"{v['fds_first']:9d} {v['fds_last']:8d}")
    print(f"leaked segments {leaked}; orphans {orphans}")
    print("targets: " + ", ".join(f"{k} {'MET' if ok else 'MISSED'}" for k, ok in targets.items()))
    if args.json:
        write_json(args.json, result)
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
