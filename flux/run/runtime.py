"""What every actor process shares: the run spec, logging, signals, parent watch, thread count.

An actor is started by the launcher as `python -m actors.<role> --spec RUN_DIR/spec.json [--name N]`, or
forked from it to the same effect (flux/run/launcher.py); either way it runs `actor_main`.
The spec holds the socket addresses and the resolved config, so every actor sees the same run.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from flux.config import FluxConfig, _build

LOG_FORMAT = "%(asctime)s %(levelname).1s %(name)s: %(message)s"
STATUS_FILE = "status.json"


@dataclass
class RunSpec:
    """Where a run's sockets live and what it runs; written once by the launcher as spec.json."""

    run_id: str
    run_dir: str
    model_path: str
    controller_router: str
    controller_pub: str
    buffer_pull: str
    buffer_router: str
    num_prompts: int
    config: FluxConfig
    resume_from: str = ""
    """A checkpoint directory to continue from (`flux train --resume`), or empty for a fresh run."""
    remote: dict = field(default_factory=dict)
    """The CURVE endpoints of a run open to remote generators (`net.remote`): router, pub, pull, weights,
    keys, connect; in a remote generator's own spec only `weights`. Empty: no remote side."""
    curve: dict = field(default_factory=dict)
    """A remote generator's CURVE client keys (`client_keys` of flux/integrations/remote/auth.py); empty for local actors."""
    secret: str = ""
    """The run's secret for admission tokens (flux.control.admission.admission_token); never sent to a remote peer."""
    vocab_size: int = 0
    """The model's vocabulary: a token id at or above it is refused at the buffer (0 = unchecked)."""
    socket_dir: str = ""
    """The run-private directory (mode 0700) holding the local actors' ipc:// sockets."""

    def to_json(self) -> str:
        d = dict(self.__dict__)
        d["config"] = self.config.to_dict()
        return json.dumps(d, indent=1)

    @classmethod
    def load(cls, path: str | Path) -> "RunSpec":
        d = json.loads(Path(path).read_text())
        d["config"] = _build(FluxConfig, d["config"], "")
        return cls(**d)

    @property
    def shm_prefix(self) -> str:
        return f"flux-{self.run_id}-"


def connect(sock, address: str, spec: RunSpec) -> None:
    """Connect an actor's socket to one of the run's addresses, as a CURVE client when the spec has keys
    (a remote generator); local actors connect in the clear to 127.0.0.1.

    A remote generator's sends give up (zmq.Again) after net.heartbeat_timeout_s: if the run stops
    accepting it (its key revoked and the connection re-made, the run gone), it fails instead of hanging.
    """
    if spec.curve:
        import zmq

        from flux.plugins import hook

        hook("remote.secure_client")(sock, spec.curve)
        sock.setsockopt(zmq.SNDTIMEO, int(spec.config.net.heartbeat_timeout_s * 1000))
    sock.connect(address)


def write_status(run_dir: str | Path, status: dict) -> None:
    """Atomically replace RUN_DIR/status.json (what `flux status` reads): a reader sees the old file or the
    new one, never half."""
    path = Path(run_dir) / STATUS_FILE
    tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(status, indent=1))
    os.replace(tmp, path)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def setup_logging(run_dir: str | Path | None, name: str) -> logging.Logger:
    """One format everywhere; each actor also writes RUN_DIR/logs/<name>.log."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(logging.INFO)
    fmt = logging.Formatter(LOG_FORMAT)
    err = logging.StreamHandler(sys.stderr)
    err.setFormatter(fmt)
    err.setLevel(logging.WARNING)
    root.addHandler(err)
    if run_dir:
        logs = Path(run_dir) / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(logs / f"{name}.log")
        fh.setFormatter(fmt)
        root.addHandler(fh)
    logging.captureWarnings(True)  # warnings.warn (torch, transformers) lands in the same log, same format
    quiet_libraries()
    return logging.getLogger(f"flux.{name}")


def quiet_libraries() -> None:
    """transformers' progress bars and advice belong in no actor's stderr."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    with suppress(ImportError):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()


def host_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def actor_threads(cfg, role: str) -> int:
    """`learner.threads` / `rollout.threads`, or for 0 (auto) the machine's cores shared out by mode: in
    sync mode the learner and the generators take turns, so each side has every core (split among its
    own processes); otherwise they run at once, and the cores are split among all of them."""
    n = cfg.learner.threads if role == "learner" else cfg.rollout.threads
    cores = host_cores()
    ranks, gens = cfg.learner.ranks, cfg.rollout.num_generators
    share = (ranks if role == "learner" else gens) if cfg.adaptive_async.mode == "sync" else ranks + gens
    return n or max(1, cores // share)


# GNU OpenMP (torch's, on Linux) lets an idle worker thread spin this many rounds before it sleeps. Its
# default, 300,000, kept a core busy for milliseconds after every parallel region, the very moment the
# next actor (the generator after a publish, the buffer and learner after a batch) had work: sync ran
# 8-13 % faster with 5,000-60,000 (bench/results/omp_spin.json). Set before torch loads, user's value wins.
OMP_SPIN = ("GOMP_SPINCOUNT", "20000")


def set_threads(n: int) -> None:
    """An explicit, small intra-op thread count: two actors on two cores must not oversubscribe."""
    import torch

    torch.set_num_threads(n)
    with suppress(RuntimeError):  # already set (it can be set once per process)
        torch.set_num_interop_threads(1)


class StopFlag:
    """Set by SIGTERM/SIGINT or by the parent's death; actor loops check `.is_set()`."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str) -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


def install_stop_handlers(stop: StopFlag, watch_parent: bool = True) -> None:
    """SIGTERM/SIGINT set the flag (drain, then exit); if the launcher dies, the actor stops too."""

    def on_signal(signum, _frame):
        stop.set(signal.Signals(signum).name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if watch_parent:
        parent = os.getppid()

        def watch():
            while not stop.wait(1.0):
                if os.getppid() != parent:
                    stop.set("launcher died")

        threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def die_with_parent() -> None:
    """preexec_fn for actor processes: Linux sends SIGTERM to the child when the launcher dies."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass  # not Linux: the parent-watch thread covers it


class Rate:
    """Run something at most every `period` seconds: `if rate.due(): ...`."""

    def __init__(self, period: float):
        self.period = period
        self._last = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= self.period:
            self._last = now
            return True
        return False


class Heartbeater(threading.Thread):
    """Sends Heartbeat(role, name, busy_frac(), stats()) to the controller on its own DEALER socket.

    A thread of its own so that a long step (a big batch, a checkpoint) never looks like a death.
    """

    def __init__(self, ctx, spec: RunSpec, role: str, name: str, busy_frac, stats=dict):
        super().__init__(name=f"{name}-heartbeat", daemon=True)
        self.ctx, self.spec, self.role, self.actor = ctx, spec, role, name
        self.busy_frac, self.stats = busy_frac, stats
        self.halt = threading.Event()

    def run(self) -> None:
        from flux.run import protocol as P
        import zmq

        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        connect(sock, self.spec.controller_router, self.spec)
        while not self.halt.wait(self.spec.config.net.heartbeat_s):
            P.send(sock, P.Heartbeat(self.role, self.actor, min(1.0, max(0.0, self.busy_frac())), self.stats()))
        sock.close()


class Timeline:
    """When this process reached each point of its life (wall-clock seconds, comparable across the run's
    processes), plus totals it wants known at exit. Saved to RUN_DIR/logs/<name>.timeline.json, which
    bench/overhead.py reads to split the time from `flux train` to the first step and from the last step
    to exit. ``process`` is when the OS started the process (before any import)."""

    def __init__(self):
        self.marks: dict[str, float] = {"process": _process_start()}
        self.totals: dict[str, float] = {}
        self.path: Path | None = None

    def bind(self, run_dir: str | Path, name: str) -> None:
        self.path = Path(run_dir) / "logs" / f"{name}.timeline.json"

    def mark(self, point: str, save: bool = False) -> None:
        """The first time this point is reached counts."""
        self.marks.setdefault(point, time.time())
        if save:
            self.save()

    def save(self) -> None:
        if self.path is not None:
            tmp = self.path.with_name(f".{self.path.name}.tmp")
            tmp.write_text(json.dumps({"marks": self.marks, "totals": self.totals}))
            os.replace(tmp, self.path)


def _process_start() -> float:
    """Wall-clock time the OS started this process, to ~10 ms (Linux: /proc; psutil's create_time rounds
    the boot time to a whole second). Elsewhere: now."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rpartition(")")[2].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return time.time()


TIMELINE = Timeline()


class FluxRunError(RuntimeError):
    """The run cannot go on, for a reason one line says (no traceback is worth showing the user)."""


def actor_main(role: str, body) -> None:
    """Run an actor's main; on a crash log the traceback, tell the controller, exit non-zero."""
    import argparse

    TIMELINE.mark("imported")  # the actor's module and its top-level imports
    ap = argparse.ArgumentParser(prog=f"actors.{role}")
    ap.add_argument("--spec", required=True)
    ap.add_argument("--name", default=role)
    args = ap.parse_args()
    spec = RunSpec.load(args.spec)
    log = setup_logging(spec.run_dir, args.name)
    TIMELINE.bind(spec.run_dir, args.name)
    stop = StopFlag()
    install_stop_handlers(stop)
    try:
        code = body(spec, args.name, stop, log)
    except FluxRunError as e:  # not this actor's fault alone: the whole run stops (a generator's too)
        log.error("%s %s stops the run: %s", role, args.name, e)
        _say_dying(spec, role, args.name, str(e), fatal=True)
        print(f"{args.name} stops the run: {e}", file=sys.stderr)
        code = 1
    except Exception as e:  # the launcher reports this line; the log file has the traceback
        log.exception("%s %s crashed", role, args.name)
        _say_dying(spec, role, args.name, f"{type(e).__name__}: {e}")
        print(f"{args.name} crashed: {type(e).__name__}: {e}", file=sys.stderr)
        code = 1
    TIMELINE.mark("exit", save=True)
    # Everything this actor owns is closed by now (sockets, shared memory, files). Skip the interpreter's
    # teardown (freeing torch, transformers and every module one by one: about a second here), which
    # would only delay the end of the run.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _say_dying(spec: RunSpec, role: str, name: str, reason: str, fatal: bool = False) -> None:
    from flux.run import protocol as P
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 500)
    connect(sock, spec.controller_router, spec)
    P.send(sock, P.Goodbye(role, name, reason[:500], False, fatal))
    sock.close()
    ctx.term()
