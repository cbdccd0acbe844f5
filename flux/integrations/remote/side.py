"""Remote generators: a run's CURVE side, and `flux generator --connect` that attaches to it.

On the training machine (`flux train --set net.remote=true --set net.keys=DIR`):

    controller   CURVE ROUTER (the one address to hand out) and CURVE PUB, a ZAP gatekeeper, and the
                 weight server thread (flux/integrations/remote/weight_stream.py)
    buffer       CURVE PULL for trajectory groups, its own gatekeeper

On a remote machine (`flux generator --connect tcp://HOST:PORT --key DIR/NAME.key_secret`):

    RunInfoRequest -> RunInfo     the resolved config, model path, prompts digest, the other ports
    check the model and prompts   the same paths, or --model / --prompts; the prompts must match the run's
    run the generator actor       actors/generator.py, unchanged, over CURVE sockets; new weights arrive
                                  over the weight stream; SIGTERM -> Goodbye -> exit

Local actors keep their 127.0.0.1 endpoints without CURVE: a remote peer never reaches them.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import socket
import sys
import time
from pathlib import Path

import zmq

from flux.integrations.remote import messages as M
from flux.run import protocol as P
from flux.integrations.remote.auth import (
    Gatekeeper,
    KeysError,
    check_key_dir,
    client_keys,
    curve_socket,
    secure_client,
)
from flux.run.runtime import RunSpec, free_port

HANDSHAKE_EVENTS = (zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)


class RemoteError(RuntimeError):
    """A remote generator cannot attach: the message says why and what to do."""


# ---------------------------------------------------------------- training machine
def remote_endpoints(cfg) -> dict:
    """The CURVE endpoints of a run with `net.remote` (RunSpec.remote). Raises ValueError."""
    key_dir = check_key_dir(cfg.net.keys)
    host, port = cfg.net.remote_host, cfg.net.remote_port
    # Learner ranks on other machines (learner.local_ranks): rank 0's torch.distributed store on a fifth port.
    joined = cfg.learner.local_ranks not in (0, cfg.learner.ranks)
    if joined and host in ("0.0.0.0", "::", "*"):
        raise ValueError("learner.local_ranks: learner ranks on other machines need net.remote_host to be this "
                         "machine's address that they reach (the learner group's store and gloo bind to it)")
    n = 5 if joined else 4
    if port:  # a fixed range, for firewalls: the ROUTER on the port, PUB, PULL, weights (learners) on the next
        ports = list(range(port, port + n))
        for p in ports:
            with socket.socket() as s:
                try:
                    s.bind((host, p))
                except OSError as e:
                    raise ValueError(f"net.remote_port: cannot listen on {host}:{p} ({e.strerror}); the run "
                                     f"needs ports {port}..{port + n - 1}") from None
    else:
        ports = [free_port(host) for _ in range(n)]
    shown = socket.gethostname() if host in ("0.0.0.0", "::", "*") else host
    addr = [f"tcp://{host}:{p}" for p in ports]
    return {"keys": str(key_dir), "router": addr[0], "pub": addr[1], "pull": addr[2], "weights": addr[3],
            "connect": f"tcp://{shown}:{ports[0]}", **({"learners": addr[4]} if joined else {})}


def prompts_digest(records: list[dict]) -> str:
    """sha256 of the prompt records: a remote generator's copy must be the run's, index for index."""
    return hashlib.sha256(json.dumps(records, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def stream_handle(handle: dict | None) -> dict | None:
    """What remote generators are told of a version: it is on the weight stream (not in local shm)."""
    if handle is None:
        return None
    return {"kind": "stream", "version": handle["version"], "nbytes": handle.get("nbytes", 0)}


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


class RemoteSide:
    """The controller's CURVE endpoints: ROUTER (the address handed out), PUB, gatekeeper, weight server."""

    def __init__(self, ctx: zmq.Context, spec: RunSpec, log, weight_tokens: set[str]):
        keys, net = spec.remote["keys"], spec.config.net
        self.gate = Gatekeeper(ctx, keys, log)
        self.gate.start()
        self.router, self.pub = curve_socket(ctx, zmq.ROUTER, keys), curve_socket(ctx, zmq.PUB, keys)
        for s in (self.router, self.pub):
            s.setsockopt(zmq.LINGER, 1000)
        self.router.setsockopt(zmq.MAXMSGSIZE, 2**20)  # a generator's requests are small; bigger: disconnected
        self.router.bind(spec.remote["router"])
        self.pub.bind(spec.remote["pub"])
        from flux.integrations.remote.weight_stream import WeightServer

        plain = net.weight_stream == "plain"  # unencrypted; each request must carry a granted token
        self.weights = WeightServer(ctx, spec.remote["weights"], None if plain else keys, net.weight_chunk_kb * 1024,
                                    log, tokens=weight_tokens if plain else None, allowed=self.gate.allowed)
        self.weights.start()
        self.weights.ready.wait(10)
        log.info("remote endpoints up (CURVE, keys %s): ROUTER %s, PUB %s, weights %s (%s); generators attach "
                 "with `flux generator --connect %s --key KEY`", keys, spec.remote["router"], spec.remote["pub"],
                 spec.remote["weights"], "unencrypted, tokens" if plain else "CURVE", spec.remote["connect"])

    def publish(self, msg: P.NewVersion) -> None:
        """A new version: the weight server holds it before remote generators hear of it."""
        self.weights.announce(msg.weights)
        P.send(self.pub, P.NewVersion(msg.version, stream_handle(msg.weights)))

    def close(self) -> None:
        self.weights.stop()
        self.router.close()
        self.pub.close()
        self.gate.stop()


def open_curve_pull(ctx: zmq.Context, spec: RunSpec, log) -> tuple[zmq.Socket, Gatekeeper]:
    """The buffer's CURVE PULL for remote generators' trajectory groups, and its process's gatekeeper."""
    gate = Gatekeeper(ctx, spec.remote["keys"], log)
    gate.start()
    pull = curve_socket(ctx, zmq.PULL, spec.remote["keys"])
    pull.setsockopt(zmq.LINGER, 0)
    pull.setsockopt(zmq.MAXMSGSIZE, 2**28)  # one array of one group; a peer sending more is disconnected
    pull.bind(spec.remote["pull"])
    return pull, gate


# ---------------------------------------------------------------- remote machine
def ask_run_info(address: str, curve: dict, name: str, timeout_s: float = 20.0, learner: bool = False) -> M.RunInfo:
    """RunInfoRequest -> RunInfo over CURVE; a refused key or a failed handshake is a RemoteError at once."""
    from zmq.utils.monitor import recv_monitor_message

    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    secure_client(sock, curve)
    monitor = sock.get_monitor_socket(HANDSHAKE_EVENTS)
    sock.connect(address)
    drops = P.DropCounter("attach")
    try:
        P.send(sock, M.RunInfoRequest(name, socket.gethostname(), learner))
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if monitor.poll(0):
                event = recv_monitor_message(monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise RemoteError(f"{address} refused this key: its public key is not authorised there "
                                      "(on the training machine, put the client's .key file in KEYS/authorized/)")
                raise RemoteError(f"the CURVE handshake with {address} failed: wrong server key (server.key of "
                                  "the run's key directory), or not a Flux remote endpoint")
            if sock.poll(100):
                _, msg = P.recv(sock, drops)
                if isinstance(msg, M.RunInfo):
                    return msg
        raise RemoteError(f"no answer from {address} within {timeout_s:g}s: is the run up, with net.remote=true "
                          "and that port reachable?")
    finally:
        sock.disable_monitor()
        monitor.close()
        sock.close()


def spec_from_info(info: M.RunInfo, address: str, curve: dict, out: Path, model: str | None = None,
                   prompts: str | None = None, engine: str | None = None, with_prompts: bool = True) -> RunSpec:
    """This machine's RunSpec for the run: the run's config, with the model (and unless not `with_prompts`,
    as for a learner rank, the prompts) found here."""
    from flux.config import FluxConfig, _build
    from flux.data import DataError, split_records
    from flux.integrations.builtin.tiny import resolve_model_path

    cfg = _build(FluxConfig, info.config, "")
    if prompts:
        cfg.prompts = prompts
    if engine:
        cfg.rollout.engine = engine
    model_path = model or info.model_path
    if not model and not Path(info.model_path, "config.json").is_file() and cfg.model_path.startswith("builtin:"):
        model_path = resolve_model_path(cfg.model_path, cfg.prompts)  # the embedded default is built the same way here
    if not Path(model_path, "config.json").is_file():
        raise RemoteError(f"the run's model {model_path} is not on this machine: pass --model DIR (a copy of "
                          f"the run's base model {cfg.model_path})")
    try:
        records = split_records(cfg)[0] if with_prompts else None
    except (DataError, ValueError) as e:
        raise RemoteError(f"prompts: {e} (pass --prompts FILE, a copy of the run's prompts)") from None
    if with_prompts and prompts_digest(records) != info.prompts_digest:
        raise RemoteError(f"the prompts at {cfg.prompts} ({len(records)} records) are not the run's "
                          f"({info.num_prompts} records): pass --prompts FILE, an exact copy")
    host = address.removeprefix("tcp://").rsplit(":", 1)[0]
    return RunSpec(run_id=info.run_id, run_dir=str(out), model_path=str(model_path), controller_router=address,
                   controller_pub=f"tcp://{host}:{info.ports['pub']}", buffer_pull=f"tcp://{host}:{info.ports['pull']}",
                   buffer_router="", num_prompts=info.num_prompts, config=cfg,
                   remote={"weights": f"tcp://{host}:{info.ports['weights']}", "token": info.weights_token},
                   curve=curve)


def client_curve(connect: str, key: str, server_key: str | None, option: str) -> dict:
    """A remote peer's CURVE client keys, after checking the endpoint it was given (`option`)."""
    if not connect.startswith("tcp://") or ":" not in connect.removeprefix("tcp://"):
        raise RemoteError(f"{option} {connect}: expected tcp://HOST:PORT")
    try:
        return client_keys(key, server_key)
    except KeysError as e:
        raise RemoteError(str(e)) from None


def run_generator(connect: str, key: str, server_key: str | None = None, name: str | None = None,
                  engine: str | None = None, model: str | None = None, prompts: str | None = None,
                  out: str | None = None, timeout_s: float = 20.0, stream=sys.stdout) -> int:
    """`flux generator`: attach to a running job, generate until it stops or a signal comes. Exit code."""
    from flux.run.runtime import StopFlag, _say_dying, install_stop_handlers, setup_logging

    curve = client_curve(connect, key, server_key, "--connect")
    name = name or f"{socket.gethostname()}-{os.getpid()}"
    out_dir = Path(out or f"runs/generator-{name}").resolve()
    log = setup_logging(out_dir, name)
    stop = StopFlag()
    install_stop_handlers(stop, watch_parent=False)
    try:
        info = ask_run_info(connect, curve, name, timeout_s)
    except RemoteError as e:
        log.error("cannot attach to %s: %s", connect, e)
        raise
    spec = spec_from_info(info, connect, curve, out_dir, model, prompts, engine)
    stream.write(f"flux: generator {info.name} attached to run {info.run_id} at {connect} (version {info.version}); "
                 f"logs in {out_dir}/logs\n")
    stream.flush()
    from actors.generator import body

    try:
        code = body(spec, info.name, stop, log)
    except zmq.Again:  # a send timed out: the run no longer takes this generator
        log.error("generator %s: the run at %s stopped accepting it (key revoked, or the run is gone)",
                  info.name, connect)
        stream.write(f"flux: generator {info.name}: the run at {connect} stopped accepting it (key revoked, or "
                     "the run is gone)\n")
        return 1
    except Exception as e:
        log.exception("generator %s crashed", info.name)
        _say_dying(spec, "generator", info.name, f"{type(e).__name__}: {e}")
        stream.write(f"flux: generator {info.name} crashed: {type(e).__name__}: {e}\n")
        return 1
    if stop.reason == P.KEY_REMOVED:
        log.error("generator %s cut off by the run at %s: %s", info.name, connect, P.KEY_REMOVED)
        stream.write(f"flux: generator {info.name} cut off by the run at {connect}: {P.KEY_REMOVED}\n")
        return 1
    stream.write(f"flux: generator {info.name} left the run ({stop.reason or 'stopped'})\n")
    return code


def run_learner(connect: str, key: str, server_key: str | None = None, rank: int | None = None,
                model: str | None = None, out: str | None = None, timeout_s: float = 20.0,
                stream=sys.stdout) -> int:
    """`flux learner --join`: learner rank `rank` of a running job whose other ranks are elsewhere
    (learner.local_ranks). The run's config, model path, learner ports and checkpoint come over CURVE, as a
    remote generator's do; then this process joins rank 0's torch.distributed group (torch's RANK,
    WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and trains in lockstep with it (actors/learner.py `follow`)."""
    from flux.run.runtime import StopFlag, install_stop_handlers, setup_logging

    if rank is None:  # what a launcher (srun, a SLURM or torchrun-style script) hands each process
        rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "-1")))
    curve = client_curve(connect, key, server_key, "--join")
    name = f"learner{rank}"
    info = ask_run_info(connect, curve, name, timeout_s, learner=True)
    lc = info.config.get("learner", {})
    first, ranks = lc.get("local_ranks") or lc.get("ranks", 1), lc.get("ranks", 1)
    if "learners" not in info.ports or not first <= rank < ranks:
        raise RemoteError(f"--rank {rank}: the run at {connect} takes learner ranks {first}..{ranks - 1} from "
                          f"other machines" if "learners" in info.ports else
                          f"the run at {connect} takes no learner ranks from other machines (learner.local_ranks)")
    out_dir = Path(out or f"runs/learner-{rank}").resolve()
    spec = spec_from_info(info, connect, curve, out_dir, model, with_prompts=False)
    if info.resume_from and not Path(info.resume_from, "trainer_state.json").is_file():
        raise RemoteError(f"the run resumed from {info.resume_from}, which is not on this machine (share it, "
                          "or copy it to the same path)")
    spec.resume_from = info.resume_from
    if lc.get("backend") == "megatron" and lc.get("tensor_parallel", 1) * lc.get("pipeline_parallel", 1) > 1:
        if not Path(info.run_dir).is_dir():  # every TP rank and stage writes its AdamW state into the checkpoint
            raise RemoteError(f"megatron's tensor/pipeline-parallel ranks write their optimizer state into the "
                              f"run's checkpoints: the run directory {info.run_dir} must be here too (a shared "
                              "filesystem)")
        spec.run_dir = info.run_dir
    log = setup_logging(out_dir, name)
    stop = StopFlag()
    install_stop_handlers(stop, watch_parent=False)
    host = connect.removeprefix("tcp://").rsplit(":", 1)[0]
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(ranks), MASTER_ADDR=host, MASTER_PORT=str(info.ports["learners"]))
    stream.write(f"flux: learner rank {rank} of {ranks} joins run {info.run_id} at {host}:{info.ports['learners']}; "
                 f"logs in {out_dir}/logs\n")
    stream.flush()
    from actors.learner import body

    try:
        code = body(spec, name, stop, log)
    except Exception as e:
        log.exception("learner rank %d failed", rank)
        stream.write(f"flux: learner rank {rank} failed: {type(e).__name__}: {e}\n")
        return 1
    stream.write(f"flux: learner rank {rank} left the run ({stop.reason or 'it finished'})\n")
    return code


# ---------------------------------------------------------------- the controller's side (actors/controller.py)
# What a remote peer may say: a generator's part of the conversation, nothing of the learner's or buffer's.
REMOTE_TYPES = (M.RunInfoRequest, P.Register, P.Heartbeat, P.AdmitRequest, P.GroupDone, P.Goodbye)


def may_send(ctl, msg, key: str = "") -> bool:
    """A remote peer speaks for remote generators only: never as the learner or buffer, never in the
    name of a local actor or of a remote one holding another key. Anything else is counted and dropped."""
    name = getattr(msg, "name", "")
    if not isinstance(msg, REMOTE_TYPES) or getattr(msg, "role", "generator") != "generator":
        ctl.drops.drop("remote_not_allowed", detail=msg.TYPE)
        return False
    member = ctl.members.get(name)
    if member is not None and not isinstance(msg, M.RunInfoRequest):
        if not member.remote:
            ctl.drops.drop("remote_not_allowed", detail=f"{msg.TYPE} in the name of local {name}")
            return False
        if member.key and key != member.key:
            ctl.drops.drop("remote_not_allowed", detail=f"{msg.TYPE} in the name of {name}, another key")
            return False
    return True


def run_info(ctl, req: M.RunInfoRequest) -> M.RunInfo:
    """What a remote generator needs to join: the config, model path, prompts digest, the other ports.
    A learner rank gets the same, under its own name and without a weight-stream token (it never fetches
    weights, and never registers, so a token would never be withdrawn)."""
    name, k = req.name, 1
    peers = ctl.peers
    while not req.learner and (name in ctl.members or name in peers.handed_out):
        k += 1
        name = f"{req.name}-{k}"
    token = ""
    if not req.learner:
        peers.handed_out.add(name)
    if ctl.cfg.net.weight_stream == "plain" and not req.learner:
        token = peers.token_of[name] = secrets.token_hex(16)
        peers.weight_tokens.add(token)
    r = ctl.spec.remote
    ctl.log.info("remote peer %s on %s asks to join", name, req.host)
    return M.RunInfo(ctl.spec.run_id, name, ctl.admission.version, ctl.spec.model_path, ctl.spec.num_prompts,
                     peers.prompts_digest, ctl.cfg.to_dict(),
                     {k: port_of(r[k]) for k in ("pub", "pull", "weights", "learners") if k in r}, token,
                     ctl.spec.resume_from, ctl.spec.run_dir)


class Peers:
    """The controller's book of remote generators: names handed out, weight-stream tokens, the prompts digest."""

    def __init__(self, cfg):
        from flux.data import split_records  # before data.max_prompt_length, as a remote generator reads them

        self.handed_out: set[str] = set()  # names given to remote generators in a RunInfo
        # net.weight_stream=plain: the weight server serves these tokens only (one per remote generator)
        self.weight_tokens: set[str] = set()
        self.token_of: dict[str, str] = {}
        self.prompts_digest = prompts_digest(split_records(cfg)[0])

    def forget(self, name: str) -> None:
        self.weight_tokens.discard(self.token_of.pop(name, ""))

    def cut_off(self, ctl) -> None:
        """Remote generators whose key was removed from the authorized directory are dead to the run."""
        for name, m in list(ctl.members.items()):
            if m.remote and m.key and not ctl.key_allowed(m.key):
                ctl.log.warning("generator %s cut off: its key was removed from %s", name, ctl.gate.authorized)
                del ctl.members[name]
                ctl.forget(m, "dead", "key removed")
                ctl.reclaim(m)


def handlers(ctl) -> dict:
    """What the controller of a run open to remote generators answers beyond its own table."""
    return {M.RunInfoRequest: lambda req: run_info(ctl, req)}
