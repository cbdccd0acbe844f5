"""The replay buffer: trajectories waiting to be trained on, and the batch composer.

    loop:
        pull trajectory groups from generators; let in only admitted ones (the Gate: admission token,
            no duplicates, token ids inside the vocabulary)
        hold the learner's batch request until enough whole groups are ready
        compose: drop groups older than η_max or from a future version (counted), freshest first,
            reply with a Batch
        tell the controller at once which groups arrived and which were dropped, and why
"""

from __future__ import annotations

import os
import socket

import zmq

from flux.run import protocol as P
from flux.control.composer import Composer, Gate
from flux.run.runtime import Rate, RunSpec, actor_main


def body(spec: RunSpec, name: str, stop, log) -> int:
    cfg = spec.config
    drops = P.DropCounter("buffer")
    ctx = zmq.Context()
    pull, router = ctx.socket(zmq.PULL), ctx.socket(zmq.ROUTER)
    ctl, sub = ctx.socket(zmq.DEALER), ctx.socket(zmq.SUB)
    for s in (pull, router, ctl, sub):
        s.setsockopt(zmq.LINGER, 0)
    pull.bind(spec.buffer_pull)
    router.bind(spec.buffer_router)
    ctl.connect(spec.controller_router)
    sub.connect(spec.controller_pub)
    sub.subscribe(b"Stop")
    P.send(ctl, P.Register("buffer", "buffer", os.getpid(), socket.gethostname()))
    remote_pull = gate = None
    if spec.remote:  # remote generators push to a CURVE PULL of their own (flux/integrations/remote/side.py)
        from flux.plugins import hook

        remote_pull, gate = hook("remote.open_curve_pull")(ctx, spec, log)

    composer = Composer(eta_max=cfg.adaptive_async.eta_max, skip_zero_variance=cfg.dynamic_sampling)
    door = Gate(spec.secret, spec.vocab_size)
    received: list[int] = []
    dropped_since_batch: list[int] = []
    waiting: tuple | None = None  # (identity, BatchRequest) held until it can be served
    report = Rate(cfg.net.heartbeat_s)
    poller = zmq.Poller()
    pulls = [s for s in (pull, remote_pull) if s is not None]
    for s in (*pulls, router, ctl, sub):
        poller.register(s, zmq.POLLIN)
    while not stop.is_set():
        ready = dict(poller.poll(50))
        for source in pulls:
            while source in ready:
                try:
                    _, msg, key = P.recv_from(source, drops, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if key and not gate.allowed(key):  # a remote generator whose key was removed: cut off
                    drops.drop("key_revoked", detail=getattr(msg, "generator", ""))
                elif isinstance(msg, P.TrajectoryGroup):
                    refused = door.check(msg)
                    if not refused:
                        received.append(msg.group_id)
                        composer.add(msg)
                    else:
                        drops.drop(refused, detail=f"group {msg.group_id} from {msg.generator}")
                    if refused == "bad_tokens":  # admitted but unusable: dropped, its credit comes back
                        composer.drop(msg.group_id, refused)
                elif msg is not None:
                    drops.drop("unexpected_type", detail=msg.TYPE)
        if router in ready:
            ident, msg = P.recv(router, drops)
            if isinstance(msg, P.BatchRequest):
                waiting = (ident, msg)
        if ctl in ready:
            P.recv(ctl, drops)  # the Welcome; nothing else is addressed to the buffer
        if sub in ready:
            _, msg = P.recv(sub, drops)
            if isinstance(msg, P.Stop):
                stop.set(msg.reason)
        groups = None
        if waiting is not None:
            ident, req = waiting
            groups = composer.take(req.groups, req.version)
        dropped = composer.pop_dropped()
        for gid in dropped.get("future_version", []):  # a version the learner never had: bad contents
            drops.drop("future_version", detail=f"group {gid}")
        if received or dropped:  # at once: a dropped group's credit comes back, so the learner is not starved
            P.send(ctl, P.BufferReport(composer.depth, composer.dropped_stale, composer.stats(), received, dropped))
            received = []
            dropped_since_batch += [gid for ids in dropped.values() for gid in ids]
        if groups is not None:
            ids, dropped_since_batch = dropped_since_batch, []
            P.send(router, P.Batch.from_groups(req.step, groups, len(ids), ids), identity=ident)
            waiting = None
        if report.due():
            P.send(ctl, P.Heartbeat("buffer", "buffer", 0.0, {**composer.stats(), "drops": drops.counts}))
    log.info("buffer stopping (%s): %d groups left unserved, %d dropped stale",
             stop.reason, composer.depth, composer.dropped_stale)
    P.send(ctl, P.Goodbye("buffer", "buffer", stop.reason or "stopped", True))
    for s in (*pulls, router, ctl, sub):
        s.close()
    if gate is not None:
        gate.stop()
    ctx.term()
    return 0


if __name__ == "__main__":
    actor_main("buffer", body)
