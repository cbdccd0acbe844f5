"""Actors forked from the launcher on a machine without a GPU: the launcher imports what the actors import
(torch, transformers, the model's modelling code: ~5 s of one core) once (`preload`), then forks each
actor from itself (`Forked`), so that they start with it all loaded. A forked actor has the same command
line (setproctitle), session, streams and environment as a spawned `python -m actors.<role>`.

Not where CUDA may be initialised (a forked child could not use it), not with FLUX_ACTOR_START=spawn, and
only when `flux` is the program: a caller's own program may hold locks in other threads, or have run
torch's OpenMP threads (GNU libgomp: a forked child then hangs in its first parallel region).
"""

from __future__ import annotations

import gc
import importlib
import os
import signal
import subprocess
import sys
import time
import traceback
from contextlib import suppress
from pathlib import Path

from flux.run.launcher import flux_is_the_program
from flux.run.runtime import TIMELINE, RunSpec, actor_main, die_with_parent


class Forked:
    """An actor forked from the launcher, as `subprocess.Popen` would start `python ARGV` (the part of
    Popen the launcher uses: pid, returncode, poll, wait, send_signal)."""

    def __init__(self, argv: list[str], stderr: Path, env: dict[str, str]):
        self.returncode: int | None = None
        gc.freeze()  # the child never collects (and so never finalizes) what it inherits
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})  # until the child has its own handlers
        try:
            self.pid = os.fork()
            if self.pid == 0:
                _become(argv, stderr, env, mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            gc.unfreeze()

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored, a caller's own waitpid)
                pid, status = self.pid, 0
            self.returncode = os.waitstatus_to_exitcode(status) if pid else None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = time.monotonic() + (1e9 if timeout is None else timeout)
        while self.poll() is None and time.monotonic() < end:
            time.sleep(0.01)
        if self.returncode is None:
            raise subprocess.TimeoutExpired(f"actor {self.pid}", timeout)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)


def _become(argv: list[str], stderr: Path, env: dict[str, str], mask: set) -> None:
    """In a just-forked child (SIGINT and SIGTERM blocked): run `python ARGV` (`-m actors.<role> ...`)
    here; never returns. What fails before the actor's own code runs is printed to its stderr file."""
    try:
        null, err = os.open(os.devnull, os.O_RDWR), os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, std in ((null, 0), (null, 1), (err, 2)):
            os.dup2(fd, std)
        sys.stdin, sys.stdout, sys.stderr = (open(i, m, buffering=1, closefd=False) for i, m in enumerate("rww"))
        os.setsid()  # as start_new_session: Ctrl-C reaches the launcher only
        die_with_parent()
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        with suppress(ImportError):
            import setproctitle

            setproctitle.setproctitle(" ".join([sys.executable, *argv]))  # what ps shows (before env changes)
        os.environ.clear()
        os.environ.update(env)
        if "huggingface_hub.constants" in sys.modules:  # read at import, when the launcher's env held
            sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
        TIMELINE.marks = {"process": time.time()}
        sys.argv = argv[1:]
        actor_main(argv[1].removeprefix("actors."), importlib.import_module(argv[1]).body)  # ends in os._exit
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(1)



def preload(spec: RunSpec) -> bool:
    """Import the actors' code here, so that `start` can fork them; False where it must not fork."""
    # Where a GPU driver is, something here may initialise CUDA (a check, an import), and a forked child
    # then cannot use it: spawn there.
    # Only as the `flux` program: a caller's own program may hold locks in other threads, or have run
    # torch's OpenMP threads (GNU libgomp: a forked child then hangs in its first parallel region).
    if os.environ.get("FLUX_ACTOR_START") == "spawn" or any(Path(d).exists() for d in ("/dev/nvidiactl", "/dev/kfd")) \
            or not flux_is_the_program():
        return False
    import transformers

    with suppress(Exception):  # the modelling code of the run's model (it may be unknown here)
        config = transformers.AutoConfig.from_pretrained(spec.model_path)
        transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]  # noqa: B018
    return True
