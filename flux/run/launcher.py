"""Starts a run's actors as OS processes, shows progress, and stops every one of them, always.

On a machine without a GPU the launcher imports what the actors import (torch, transformers, the
model's modelling code: ~5 s of one core) once, then forks each actor from itself, so that they start
with it all loaded (flux/integrations/cpu/fork.py); elsewhere (CUDA is not safe across a fork), or with
FLUX_ACTOR_START=spawn, each actor is a fresh `python -m actors.<role>`. A forked actor has the same
command line, session, streams and environment as a spawned one.

Shutdown is predictable: the learner finishes → the controller broadcasts Stop → actors drain and
exit. On Ctrl-C, or when any actor dies, the launcher sends SIGTERM to the rest, joins them with a
deadline, then kills what is left, and removes the run's shared-memory segments.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from flux.config import ConfigError, FluxConfig, dump_config
from flux.plugins import hook
from flux.run.runtime import OMP_SPIN, RunSpec, Timeline, die_with_parent, free_port

STOP_DEADLINE_S = 10.0


class SetupError(ValueError):
    """Bad input found before any actor starts (prompts, reward, algorithm, model); exit code 2."""


@dataclass
class Actor:
    name: str
    role: str
    proc: subprocess.Popen  # or, forked, flux/integrations/cpu/fork.py's Forked
    stderr_path: Path


def flux_is_the_program() -> bool:
    """This process is `flux` (the console script or `python -m flux.cli`), not a program calling it."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return Path(sys.argv[0]).name == "flux" or getattr(spec, "name", "") == "flux.cli"


def latest_checkpoint(run_dir: str | Path, stream=None) -> Path:
    """The newest complete checkpoint of a run (flux/run/checkpoints.py); incomplete ones newer than it (a crash
    while saving) are named on `stream` and skipped. Raises SetupError when there is none."""
    from flux.run.checkpoints import complete_checkpoints

    found, incomplete = complete_checkpoints(run_dir)
    if not found:
        raise SetupError(f"--resume {run_dir}: no complete checkpoint in {Path(run_dir, 'checkpoints')} "
                         "(checkpoints are written every checkpoint.every steps and at the end)")
    if stream is not None:
        for d in incomplete:
            stream.write(f"flux: skipping incomplete checkpoint {d} (the run stopped while saving it)\n")
    return found[-1][1]


def keep_metrics_before(run_dir: Path, step: int) -> None:
    """Drop the metrics lines of steps ≥ `step` (they are run again after a resume)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by the kill
    path.write_text("".join(x + "\n" for x in kept))


@contextmanager
def naming(field: str, *errors: type[Exception]):
    """`errors` raised inside become a SetupError "FIELD: reason" (the reason alone with no field)."""
    try:
        yield
    except errors as e:
        raise SetupError(f"{field}: {e}" if field else str(e)) from None


def prepare(cfg: FluxConfig, resume_from: str | Path = "") -> RunSpec:
    """Check everything an actor would trip over, make the run directory, write config + spec.

    With `resume_from` (a checkpoint directory, see `latest_checkpoint`), the run directory is kept and
    its metrics lines after the checkpoint's step are dropped."""
    from flux.algorithms import get_algorithm
    from flux.data import DataError, is_preference, split_records, within_length
    from flux.evaluation import all_eval_records
    from flux.rewards import build_parts
    from flux.sinks import load_factory

    with naming("prompts", DataError, ValueError):
        records = split_records(cfg)[0]
    with naming("eval.prompts", DataError, ValueError):
        all_eval_records(cfg)  # the records it names load
    with naming("rewards" if cfg.rewards else "reward", ValueError):
        build_parts(cfg)
    with naming("logging.sinks", ValueError):
        for dotted in cfg.logging.sinks:
            load_factory(dotted)
    try:
        algorithm = get_algorithm(cfg.algorithm)
        algorithm.params(cfg.algo)
    except (KeyError, ValueError) as e:
        raise SetupError(f"algorithm: {e.args[0] if e.args else e}") from None
    if algorithm.preference:  # a group whose samples all score the same makes no pair: drop and replace it
        cfg.dynamic_sampling = True
    if is_preference(records[0]):
        if not algorithm.preference:
            raise SetupError(f"prompts: {cfg.prompts} holds preference pairs (chosen/rejected), which only a "
                             f"preference algorithm such as dpo trains on, not {algorithm.name}")
        cfg.rollout.group_size = 2  # offline pairs: a group is the pair (B = 2 · groups_per_step)
    if cfg.rollout.engine == "sglang":
        with naming("rollout.engine=sglang", hook("sglang.SGLangError")):
            hook("sglang.check_setup")(cfg.rollout)
    remote = {}
    if cfg.net.remote:  # CURVE endpoints for `flux generator --connect` (flux/integrations/remote/side.py)
        with naming("", ValueError):
            remote = hook("remote.endpoints")(cfg)
    with naming("", ValueError):
        model_path = resolve_model_path(cfg.model_path, cfg.prompts)
    if not (Path(model_path) / "config.json").is_file():
        raise SetupError(f"model_path: {model_path} is not an HF model directory (no config.json)")
    counts = {"train": len(records)}
    if cfg.data.max_prompt_length:  # left out (counted) where the rendered prompt is longer
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        records, counts["train_too_long"] = within_length(records, cfg, tokenizer)
        counts.update(train=len(records), eval_too_long=within_length(all_eval_records(cfg), cfg, tokenizer)[1])
        if not records:
            raise SetupError(f"data.max_prompt_length: all {counts['train_too_long']} training prompts of "
                             f"{cfg.prompts} are longer than {cfg.data.max_prompt_length} tokens")
    cuda = [f"{k}.device={d}" for k, d in (("learner", cfg.learner.device), ("rollout", cfg.rollout.device))
            if d.startswith("cuda")]
    if cuda:
        import torch

        if not torch.cuda.is_available():
            raise SetupError(f"{cuda[0]}: no CUDA device is visible here (torch.cuda.is_available() is False)")
    if cfg.learner.backend == "megatron":
        with naming("learner.backend=megatron", ValueError):
            hook("megatron.check_setup")(model_path, cfg.learner.tensor_parallel, cfg.learner.pipeline_parallel)

    run_dir = Path(cfg.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}").resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    (run_dir / "data.json").write_text(json.dumps(counts) + "\n")
    if resume_from:
        step = json.loads(Path(resume_from, "controller_state.json").read_text()).get("step") or 0
        keep_metrics_before(run_dir, int(step))
        old = run_dir / "spec.json"
        if old.is_file():  # a killed run leaves its shared-memory weight slots (and socket directory) behind
            from flux.run.weights import cleanup_prefix

            killed = json.loads(old.read_text())
            cleanup_prefix(f"flux-{killed['run_id']}-")
            if killed.get("socket_dir", "").startswith(tempfile.gettempdir()):
                shutil.rmtree(killed["socket_dir"], ignore_errors=True)
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    # The local actors talk over ipc:// sockets in a directory only this user can enter: another user of
    # the machine cannot connect and speak as an actor. (TCP stays for remote peers, behind CURVE.)
    run_id = uuid.uuid4().hex[:8]
    sockets = Path(tempfile.mkdtemp(prefix=f"flux-{run_id}-"))  # mode 0700; short: ipc paths cap near 107 bytes
    spec = RunSpec(run_id=run_id, run_dir=str(run_dir), model_path=str(model_path),
                   controller_router=f"ipc://{sockets}/controller", controller_pub=f"ipc://{sockets}/pub",
                   buffer_pull=f"ipc://{sockets}/buffer-pull", buffer_router=f"ipc://{sockets}/buffer",
                   num_prompts=len(records), config=cfg, resume_from=str(resume_from or ""), remote=remote,
                   secret=secrets.token_hex(16), vocab_size=vocab_size(model_path), socket_dir=str(sockets))
    spec_file = run_dir / "spec.json"
    spec_file.unlink(missing_ok=True)
    fd = os.open(spec_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # it holds the run's secret
    with os.fdopen(fd, "w") as f:
        f.write(spec.to_json())
    return spec




def resolve_model_path(model_path: str, prompts: str = "") -> str:
    """`builtin:tiny` (or empty) → the built-in model's directory (made on first use, warm-started on the
    run's built-in task); a directory as it is; a Hub id (`Qwen/Qwen2.5-0.5B`) → its snapshot, resolved as
    transformers resolves it: from the local HF cache, downloaded only where the environment allows it
    (not under HF_HUB_OFFLINE=1). Raises ValueError with one line when a Hub id cannot be found."""
    if not model_path or model_path.startswith("builtin:"):
        return hook("builtin.resolve_model_path")(model_path, prompts)
    return model_path if Path(model_path).exists() else hook("data.model_dir")(model_path)


def vocab_size(model_path: str | Path) -> int:
    """The embedding rows of an HF model directory (config.json `vocab_size`; 0 if it names none)."""
    config = json.loads(Path(model_path, "config.json").read_text())
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or 0
    return int(size) if isinstance(size, int) else 0


def start(spec: RunSpec, actors: list[Actor], fork: bool = False) -> list[Actor]:
    """Controller first (everyone connects to it), then buffer, learner ranks and the generators; forked
    from this process with `fork` (after the CPU integration's `preload`), else spawned.

    Learner rank 0 is `learner`, rank r > 0 `learner<r>`; each gets torch.distributed's RANK, WORLD_SIZE,
    MASTER_ADDR and MASTER_PORT (rank 0 hosts the group's store on a free local port, or, where ranks from
    learner.local_ranks on join from other machines, on net.remote_host's learner port).
    Appends to `actors` as it goes, so a Ctrl-C in the middle still leaves the caller every started one.
    """
    ranks = spec.config.learner.ranks
    roles = [("controller", "controller"), ("buffer", "buffer")]
    roles += [("learner", f"learner{r or ''}") for r in range(spec.config.learner.local_ranks or ranks)]
    roles += [("generator", f"gen{i}") for i in range(spec.config.rollout.num_generators)]
    host, port = "127.0.0.1", free_port()
    if "learners" in spec.remote:  # ranks on other machines join rank 0's store there (remote.md)
        host, port = spec.remote["learners"].removeprefix("tcp://").rsplit(":", 1)
    dist_env = {"WORLD_SIZE": str(ranks), "MASTER_ADDR": host, "MASTER_PORT": str(port)}
    logs = Path(spec.run_dir) / "logs"
    logs.mkdir(exist_ok=True)
    # Actors run the same code as the launcher, whatever the working directory or other checkouts.
    code_root = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH", "")) if p)
    env = {OMP_SPIN[0]: OMP_SPIN[1], **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    for role, name in roles:
        err = logs / f"{name}.stderr"
        # Set for every learner, even a single one, so that none inherits a RANK from the user's shell.
        rank_env = {**dist_env, "RANK": name.removeprefix("learner") or "0"} if role == "learner" else {}
        argv = ["-m", f"actors.{role}", "--spec", str(Path(spec.run_dir) / "spec.json"), "--name", name]
        proc = hook("cpu.Forked")(argv, err, {**env, **rank_env}) if fork else subprocess.Popen(
            [sys.executable, *argv], stdout=subprocess.DEVNULL, stderr=open(err, "wb"), env={**env, **rank_env},
            preexec_fn=die_with_parent, start_new_session=True)  # Ctrl-C reaches the launcher only
        actors.append(Actor(name, role, proc, err))
    return actors


def stop_all(actors: list[Actor], spec: RunSpec, deadline_s: float = STOP_DEADLINE_S) -> None:
    """SIGTERM → join with a deadline → SIGKILL; then remove leftover shared memory."""
    from flux.run.weights import cleanup_prefix

    for a in actors:
        if a.proc.poll() is None:
            a.proc.send_signal(signal.SIGTERM)
    end = time.monotonic() + deadline_s
    for a in actors:
        try:
            a.proc.wait(timeout=max(0.1, end - time.monotonic()))
        except subprocess.TimeoutExpired:
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
    cleanup_prefix(spec.shm_prefix)
    if spec.socket_dir:
        shutil.rmtree(spec.socket_dir, ignore_errors=True)


def last_words(actor: Actor) -> str:
    """The most telling line an actor left: its crash line, else the last non-empty stderr line."""
    try:
        lines = [ln for ln in actor.stderr_path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    crash = [ln for ln in lines if " crashed: " in ln or " stops the run: " in ln]
    return (crash or lines or [""])[-1].strip()


def news(actor: Actor, seen: dict[str, int], marker: str) -> list[str]:
    """Complete lines containing `marker` that `actor` wrote to its stderr since the last call."""
    try:
        with actor.stderr_path.open("rb") as f:
            f.seek(seen.get(actor.name, 0))
            chunk = f.read()
    except OSError:
        return []
    complete = chunk[: chunk.rfind(b"\n") + 1]
    seen[actor.name] = seen.get(actor.name, 0) + len(complete)
    return [ln.strip() for ln in complete.decode(errors="replace").splitlines() if marker in ln]


def root_cause(actors: list[Actor]) -> Actor:
    """Of the actors that failed, the one to blame: a run-stopping error first, then a crash, then any."""
    said = {a.name: last_words(a) for a in actors}
    return min(actors, key=lambda a: (" stops the run: " not in said[a.name], " crashed: " not in said[a.name]))


def run(cfg: FluxConfig, stream=sys.stdout, resume_from: str | Path = "") -> tuple[int, RunSpec]:
    """Run a whole job. Returns (exit code, spec): 0 done, 1 an actor failed, 130 interrupted."""
    timeline = Timeline()  # one per run: the Python API may run several in one process
    timeline.mark("run")  # the command's imports and config are done
    spec = prepare(cfg, resume_from)
    timeline.bind(spec.run_dir, "launcher")
    timeline.mark("prepared")  # run directory, prompts, model (built or found), spec
    stream.write(f"flux: run {spec.run_id} in {spec.run_dir}"
                 + (f", resumed from {resume_from}" if resume_from else "") + "\n")
    from flux.evaluation import describe_eval

    counts = json.loads(Path(spec.run_dir, "data.json").read_text())
    if cfg.data.max_prompt_length:
        stream.write(f"flux: data.max_prompt_length={cfg.data.max_prompt_length} leaves out {counts['train_too_long']} "
                     f"training and {counts['eval_too_long']} evaluation prompts (longer)\n")
    stream.write(f"flux: {describe_eval(cfg, counts)}\n")
    if spec.remote:
        stream.write(f"flux: remote generators attach with: flux generator --connect {spec.remote['connect']} "
                     f"--key {spec.remote['keys']}/NAME.key_secret\n")
        for r in range(cfg.learner.local_ranks or cfg.learner.ranks, cfg.learner.ranks):
            stream.write(f"flux: learner rank {r} joins with: flux learner --join {spec.remote['connect']} "
                         f"--key {spec.remote['keys']}/NAME.key_secret --rank {r}\n")
    stream.flush()
    actors: list[Actor] = []
    progress = hook("tools.Progress")(spec.run_dir, cfg.max_steps, stream)
    code = 0
    lost: set[str] = set()  # generators that died
    seen: dict[str, int] = {}  # bytes of each generator's stderr already scanned for restarts
    interrupted, previous = _signals_as_interrupt()
    try:
        fork = hook("cpu.preload")(spec)
        timeline.mark("preloaded")
        start(spec, actors, fork)  # inside the try: a Ctrl-C while spawning still stops what started
        timeline.mark("spawned")
        while True:
            time.sleep(0.2)
            if interrupted.is_set():  # a signal whose KeyboardInterrupt a finalizer swallowed
                raise KeyboardInterrupt
            progress.poll()
            for a in actors:
                for line in news(a, seen, "engine restarted") if a.role == "generator" else ():
                    progress.say(f"flux: {line.split(' flux.' + a.name + ': ', 1)[-1]}")
            exited = [a for a in actors if a.proc.poll() is not None]
            for a in exited:
                if a.role == "generator" and a.proc.returncode != 0 and a.name not in lost:
                    # A generator may die: the controller re-queues its unfinished groups and the others go
                    # on. The run stops only when none is left.
                    lost.add(a.name)
                    progress.say(f"flux: generator {a.name} died (exit code {a.proc.returncode}): "
                                 f"{last_words(a) or 'no message'}; its groups are re-queued")
            failed = [a for a in exited if a.proc.returncode != 0
                      and (a.role != "generator" or " stops the run: " in last_words(a))]
            # Every generator dead (a clean exit means the run is ending: its learner's exit may just not be seen yet).
            if not failed and lost and all(a.proc.poll() not in (None, 0) for a in actors if a.role == "generator"):
                failed = [a for a in actors if a.name in lost][:1]
            if failed:
                # The actors hear Stop and exit; the one that caused it may still be on its way out.
                end = time.monotonic() + 2.0
                while time.monotonic() < end and any(a.proc.poll() is None for a in actors):
                    time.sleep(0.05)
                a = root_cause([x for x in actors if x.proc.poll() not in (None, 0)] or failed)
                progress.close()
                words = last_words(a)
                if " stops the run: " in words:
                    stream.write(f"flux: {words}\n")
                else:
                    what = "the last generator" if a.role == "generator" else f"{a.role} {a.name}"
                    stream.write(f"flux: {what} died (exit code {a.proc.returncode}): "
                                 f"{words or 'no message'}; stopping the run\n")
                code = 1
                break
            if any(a.name == "learner" or a.role == "controller" for a in exited):  # learner rank 0
                # Normal end: the learner finished, the controller broadcast Stop; let the rest drain.
                timeline.mark("learner_exited")
                end = time.monotonic() + STOP_DEADLINE_S
                while time.monotonic() < end and any(a.proc.poll() is None for a in actors):
                    time.sleep(0.1)
                progress.poll()
                progress.close()
                code = 0 if all(a.proc.returncode == 0 for a in actors
                                if a.proc.poll() is not None and a.name not in lost) else 1
                break
    except KeyboardInterrupt:
        progress.close()
        stream.write("flux: interrupted; stopping actors\n")
        code = 130
    finally:
        stop_all(actors, spec)
        timeline.mark("stopped", save=True)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if code == 0:
        progress.summarize()
    return code, spec


def _signals_as_interrupt() -> tuple[threading.Event, dict]:
    """Ctrl-C and SIGTERM (a scheduler, `kill`, a test) stop the run: drain, stop every actor, clean up.
    The handler raises KeyboardInterrupt and also sets the returned event, which the run loop checks: a
    signal that lands while a finalizer (`__del__`, a GC callback) runs has its exception swallowed by
    Python ("Exception ignored in ..."). Returns (event, previous handlers: none off the main thread)."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        return interrupted, {}

    def interrupt(_signum, _frame):
        interrupted.set()
        raise KeyboardInterrupt

    return interrupted, {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}


__all__ = ["run", "prepare", "start", "stop_all", "SetupError", "ConfigError"]
