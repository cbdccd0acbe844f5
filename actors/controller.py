"""The controller: the run's clock. Policy version, PID loop, admission credits, membership, stop.

    loop:
        serve requests on ROUTER (register, admit, heartbeats, group done, published, step reports),
            and remote generators' on the CURVE ROUTER (net.remote, flux/integrations/remote/side.py)
        declare silent actors dead; re-queue a dead generator's unfinished groups
        on every learner step: update the async ratio, send one metrics line to the sinks (metrics.jsonl, ...)
        about once per heartbeat period: rewrite status.json (membership and the control loop's numbers)
        when the learner says it is done (or a signal arrives): broadcast Stop, exit
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from flux.run import protocol as P
from flux.control.admission import Admission, PromptCursor, admission_token
from flux.run.checkpoints import finish_checkpoint
from flux.control.ledger import Ledger
from flux.control.pid import PID, rms_input, rms_reading
from flux.control.staleness import StalenessMonitor
from flux.plugins import hook
from flux.run.runtime import Rate, RunSpec, actor_main, write_status
from flux.sinks import open_sinks


@dataclass
class Member:
    role: str
    name: str
    pid: int
    last_seen: float
    host: str = ""
    busy_frac: float = 0.0
    stats: dict = field(default_factory=dict)
    remote: bool = False  # attached over the CURVE endpoint (`flux generator --connect`)
    key: str = ""  # a remote generator's CURVE public key (z85): the one its messages must come from


class Controller:
    """The control loop's state: admission, the group ledger, the PID, membership. `handle` is the dispatch."""

    def __init__(self, spec: RunSpec, log):
        cfg = spec.config
        self.spec, self.cfg, self.log = spec, cfg, log
        aa = cfg.adaptive_async
        ratio = {"sync": 0.0, "async": aa.max_async_ratio, "adaptive": aa.initial_async_ratio}[aa.mode]
        self.admission = Admission(cfg.batch_samples, aa.eta_max, ratio)
        self.pid = PID(aa.target_staleness, aa.kp, aa.ki, aa.kd, aa.min_async_ratio, aa.max_async_ratio,
                       bias=aa.initial_async_ratio, ema_horizon=aa.ema_horizon)
        sc = cfg.staleness
        self.monitor = StalenessMonitor(sc.signal, eta_max=max(1, aa.eta_max), d_ref=sc.d_ref, w_lag=sc.w_lag,
                                        window=sc.floor_window)
        self.ledger = Ledger(self.admission, PromptCursor(spec.num_prompts, cfg.seed), cfg.rollout.group_size)
        self.members: dict[str, Member] = {}
        self.gone: dict[str, dict] = {}  # name -> its last status row, for `flux status`
        self.weights: dict | None = None
        self.peer_drops: dict[str, dict] = {}  # actor -> malformed messages it dropped, by reason
        self.peers = hook("remote.Peers")(cfg) if spec.remote else None  # remote generators' names and tokens
        self.trained_samples = self.trained_tokens = 0
        self.dropped_stale = 0
        self.trained_lengths: dict[str, int] = {}  # completion-length histograms, cumulative
        self.dropped_lengths: dict[str, int] = {}
        self.t_start = time.time()
        self.t_first_admit: float | None = None
        self.done: str | None = None
        self.failed: str | None = None
        self.drops = P.DropCounter("controller")
        self.last_step: int | None = None
        self.metrics = open_sinks(spec.run_dir, cfg)
        self.gate = None  # the remote side's Gatekeeper (net.remote): which keys are still authorized
        self.dispatch = {P.Heartbeat: self.heartbeat,
                         P.AdmitRequest: self.admit, P.GroupDone: self.group_done, P.Published: self.published,
                         P.StepReport: self.on_step, P.BufferReport: self.on_buffer, P.Goodbye: self.on_goodbye}
        if spec.remote:  # RunInfoRequest (flux/integrations/remote)
            self.dispatch.update(hook("remote.handlers")(self))
        if spec.resume_from:
            self.restore(json.loads(Path(spec.resume_from, "controller_state.json").read_text()))

    # ---- requests -------------------------------------------------------------------------------
    def handle(self, ident, msg, remote: bool = False, key: str = "") -> P.Message | None:
        """One request → an optional reply. `remote`: it came in on the CURVE endpoint, from `key`."""
        if remote and key and not self.key_allowed(key):  # its key was removed: it is cut off
            self.drops.drop("key_revoked", detail=f"{msg.TYPE} from {getattr(msg, 'name', '?')}")
            return P.Stop(P.KEY_REMOVED)
        if remote and not hook("remote.may_send")(self, msg, key):
            return None
        member = self.members.get(getattr(msg, "name", None))
        if member is not None:
            member.last_seen = time.monotonic()
        if isinstance(msg, P.Register):
            return self.register(msg, remote, key)
        handler = self.dispatch.get(type(msg))
        if handler is None:
            self.drops.drop("unexpected_type", detail=msg.TYPE)
            return None
        return handler(msg)

    def register(self, msg: P.Register, remote: bool, key: str = "") -> P.Welcome:
        self.members[msg.name] = Member(msg.role, msg.name, msg.pid, time.monotonic(), msg.host, remote=remote,
                                        key=key)
        self.gone.pop(msg.name, None)
        self.log.info("%s %s registered (pid %d%s)", msg.role, msg.name, msg.pid,
                      f" on {msg.host}, remote" if remote else "")
        return P.Welcome(self.spec.run_id, self.admission.version, self.weights_for(remote))

    def weights_for(self, remote: bool) -> dict | None:
        """The newest weights handle, as a local (shared memory) or a remote (weight stream) peer reads it."""
        return hook("remote.stream_handle")(self.weights) if remote else self.weights

    def heartbeat(self, msg: P.Heartbeat) -> None:
        m = self.members.get(msg.name)
        if m:
            m.busy_frac, m.stats = msg.busy_frac, msg.stats
            if msg.stats.get("drops"):
                self.peer_drops[m.name] = dict(msg.stats["drops"])

    def published(self, msg: P.Published) -> P.NewVersion:
        self.admission.version = msg.version
        self.weights = msg.weights
        return P.NewVersion(msg.version, msg.weights)  # broadcast, not a reply (see loop)

    def announce_room(self, before: int) -> P.Control | None:
        """What to broadcast when admission has more room than `before` without a new version (credit came
        back with dropped or re-queued groups, or the ratio rose): refused generators ask again at once."""
        room = self.admission.room()
        return P.Control(self.admission.async_ratio, {"room": room}) if room > max(0, before) else None

    def key_allowed(self, key: str) -> bool:
        """Is a remote peer's CURVE key still in the run's authorized/ directory? (No remote side: yes.)"""
        return self.gate is None or self.gate.allowed(key)

    def admit(self, req: P.AdmitRequest) -> P.Admit:
        grants, member = [], self.members.get(req.name)
        # Past version 0 (the weights on disk) a credit names where its version's weights are; a resumed
        # run has none to name until its learner publishes them.
        named = self.admission.version == 0 or self.weights is not None
        if member is not None and self.done is None and named:
            grants = [{"group_id": g.group_id, "prompt_index": g.prompt_index,
                       "token": admission_token(self.spec.secret, g.group_id, req.name, g.prompt_index, g.n)}
                      for g in self.ledger.admit(req.name, req.max_groups)]
            if grants:
                self.t_first_admit = self.t_first_admit or time.time()
        return P.Admit(grants, self.admission.version, self.weights_for(member.remote) if grants else None)

    def group_done(self, msg: P.GroupDone) -> None:
        """A generator dropped a group it was admitted (its reward failed), or lost it with its engine (re-
        queued): the credit comes back."""
        if not msg.dropped and not msg.requeue:
            return
        if self.ledger.holds(msg.group_id, msg.name):
            if msg.requeue:
                self.ledger.requeue(msg.group_id)
            else:
                self.ledger.dropped(msg.group_id, msg.dropped)
        elif msg.group_id >= self.ledger.next_id:
            self.drops.drop("unknown_group", detail=f"{msg.name} drops group {msg.group_id}, never admitted")

    def on_buffer(self, msg: P.BufferReport) -> None:
        """Groups the buffer received (a dead generator no longer matters for them) or dropped."""
        for gid in msg.received:
            self.ledger.received(gid)
        for reason, ids in msg.dropped.items():
            for gid in ids:
                self.ledger.dropped(gid, reason)
        self.dropped_stale = msg.dropped_stale
        if isinstance(msg.stats.get("dropped_lengths"), dict):
            self.dropped_lengths = msg.stats["dropped_lengths"]

    def on_step(self, rep: P.StepReport) -> None:
        m = rep.metrics
        skipped = bool(m.get("step_skipped"))
        for gid in m.pop("group_ids", []):
            # A skipped step (non-finite gradient) trained nothing: its groups are dropped and their
            # credit comes back, so the next batch is admitted at the same version (sync never starves).
            if skipped:
                self.ledger.dropped(gid, "step_skipped")
            else:
                self.ledger.trained(gid)
        lengths = m.pop("length_hist", {})
        if not skipped:
            for bucket, n in lengths.items():
                self.trained_lengths[bucket] = self.trained_lengths.get(bucket, 0) + int(n)
            self.trained_samples += int(m.get("samples", 0))
            self.trained_tokens += int(m.get("tokens", 0))
        if "lag_mean" in m:  # the control law: S above the lag-0 floor → the async ratio
            stale = self.monitor.update(m)
            m.update(staleness_mean=stale.pop("staleness"), **stale)
            if self.cfg.adaptive_async.mode == "adaptive":  # the PID holds the root-mean-square of S
                self.admission.async_ratio = self.pid.update(rms_input(m["staleness_mean"], self.pid.target))
        gens = [g for g in self.members.values() if g.role == "generator"]
        elapsed = max(1e-6, time.time() - (self.t_first_admit or self.t_start))
        line = {
            "step": rep.step, "version": rep.version, **m,
            "async_ratio": self.admission.async_ratio,
            "staleness_ema": rms_reading(self.pid.ema, self.pid.target),
            "samples_per_s": self.trained_samples / elapsed,
            "tokens_per_s": self.trained_tokens / elapsed,
            "generator_busy_frac": sum(g.busy_frac for g in gens) / max(1, len(gens)),
            "generator_busy": {g.name: g.busy_frac for g in gens},
            "dropped_stale": self.dropped_stale,
            "trained_lengths": dict(self.trained_lengths), "dropped_lengths": dict(self.dropped_lengths),
            "started_samples": self.admission.started,
            "groups": self.ledger.summary(),
            "wall_s": time.time() - self.t_start,
            "controller": self.state(),
        }
        self.metrics.write(rep.step, line)
        self.last_step = rep.step
        if "checkpoint" in m:  # the learner saved one: the controller's half completes it
            finish_checkpoint(m["checkpoint"], self.state(), self.cfg.checkpoint.keep_last, self.log)

    def accounting(self) -> dict:
        """Where every admitted group ended: trained, dropped (by reason), re-queued, or still in flight."""
        s = self.ledger.summary()
        return {**{k: v for k, v in s.items() if k != "in_flight"}, "unfinished_at_stop": s["in_flight"],
                "by_generator": dict(self.ledger.produced_by)}

    def state(self) -> dict:
        """Everything needed to continue this run's control loop: step, version, ratio, PID, data cursor,
        and the ledger (counters, the prompts admitted but not yet trained or dropped, in admission order)."""
        return {"step": None if self.last_step is None else self.last_step + 1,
                "version": self.admission.version, "async_ratio": self.admission.async_ratio,
                "started_samples": self.admission.started, "pid": self.pid.state(),
                "staleness": self.monitor.state(),
                "cursor": self.ledger.cursor.state(), "ledger": self.ledger.state()}

    def restore(self, state: dict) -> None:
        """Continue from `state()` of a checkpoint. The groups in flight then are lost with the old run:
        their prompts go first, in their original order (so a resumed sync run trains exactly the data
        the uninterrupted one would have), and they count as re-queued."""
        self.admission.version = int(state["version"])
        self.admission.async_ratio = float(state["async_ratio"])
        # The loop's memory; gains and target come from the config. The EMA is of S²/target (`rms_input`):
        # one saved under another target is rescaled, so that it reads back the same RMS of S.
        pid, old, new = state["pid"], state["pid"]["target"], self.pid.target
        self.pid.integral, self.pid.output = pid["integral"], pid["output"]
        self.pid.ema = pid["ema"] * old / new if pid["ema"] and min(old, new) > 0 else pid["ema"]
        self.monitor.restore(state.get("staleness", {}))  # the lag-0 floor estimate
        in_flight = self.ledger.restore(state["ledger"], int(state["started_samples"]))
        self.ledger.cursor = PromptCursor.from_state(state["cursor"], first=in_flight)
        self.last_step = None if state.get("step") is None else int(state["step"]) - 1
        self.log.info("resumed at step %s, version %d (%d in-flight prompts re-queued)",
                      state.get("step"), self.admission.version, len(in_flight))

    def status(self, stopped: str | None = None) -> dict:
        """status.json, what `flux status` shows: who is alive or gone, and the control loop's numbers."""
        now = time.monotonic()
        me = {"role": "controller", "name": "controller", "pid": os.getpid(), "host": socket.gethostname(),
              "alive": not stopped, "state": "exited" if stopped else "alive", "reason": stopped or "",
              "heartbeat_age_s": 0.0, "busy_frac": None, "version": self.admission.version}
        alive = [self.member_row(m, now) for m in self.members.values()]
        depth = next((m.stats.get("depth") for m in self.members.values() if m.role == "buffer"), None)
        aa = self.cfg.adaptive_async
        return {"run_id": self.spec.run_id, "time": time.time(), "started": self.t_start,
                "heartbeat_s": self.cfg.net.heartbeat_s, "state": "stopped" if stopped else "running",
                "reason": stopped or "", "step": self.last_step, "max_steps": self.cfg.max_steps,
                "version": self.admission.version, "mode": aa.mode, "async_ratio": self.admission.async_ratio,
                "staleness_ema": rms_reading(self.pid.ema, self.pid.target), "target_staleness": aa.target_staleness,
                "groups": self.ledger.summary(), "groups_by_generator": dict(self.ledger.produced_by),
                "members": [me, *alive, *self.gone.values()], "buffer_depth": depth,
                "dropped_messages": {"controller": self.drops.counts, **self.peer_drops}}

    def member_row(self, m: Member, now: float, state: str = "alive", reason: str = "") -> dict:
        """One actor in status.json; a busy fraction only where one is measured (learner, generators)."""
        alive = state == "alive"
        return {"role": m.role, "name": m.name, "pid": m.pid, "host": m.host, "remote": m.remote,
                "alive": alive, "state": state,
                "reason": reason, "heartbeat_age_s": round(now - m.last_seen, 3) if alive else None,
                "busy_frac": m.busy_frac if m.role in ("learner", "generator") else None,
                "version": m.stats.get("version", self.admission.version if m.role == "learner" else None),
                "groups_held": self.ledger.held_by(m.name) if m.role == "generator" and alive else None}

    def forget(self, member: Member, state: str, reason: str) -> None:
        """A member `exited` (said goodbye) or is `dead` (crashed, silent); `flux status` still lists it."""
        self.gone[member.name] = self.member_row(member, time.monotonic(), state, reason)
        if self.peers is not None:
            self.peers.forget(member.name)  # no more weights for it

    def on_goodbye(self, msg: P.Goodbye) -> None:
        self.log.info("%s %s says goodbye (%s, ok=%s)", msg.role, msg.name, msg.reason, msg.ok)
        member = self.members.pop(msg.name, None)
        if member:
            self.forget(member, "exited" if msg.ok else "dead", msg.reason)
            self.reclaim(member)
        if msg.role == "learner" and msg.ok:
            self.done = msg.reason
        elif not msg.ok and (msg.role != "generator" or msg.fatal):
            self.failed = f"{msg.role} {msg.name} died: {msg.reason}"

    # ---- liveness -------------------------------------------------------------------------------
    def reclaim(self, member: Member) -> None:
        """A generator is gone: the groups it held go back to the front of the queue."""
        lost = self.ledger.lost(member.name)
        if lost:
            self.log.warning("re-queued %d groups of %s (prompts %s)", len(lost), member.name,
                             [g.prompt_index for g in lost])

    def check_liveness(self) -> None:
        if self.gate is not None:
            self.peers.cut_off(self)  # remote generators whose key was removed
        deadline = time.monotonic() - self.cfg.net.heartbeat_timeout_s
        for name, m in list(self.members.items()):
            if m.last_seen < deadline:
                self.log.warning("%s %s silent for %.1fs: declared dead", m.role, name,
                                 self.cfg.net.heartbeat_timeout_s)
                del self.members[name]
                self.forget(m, "dead", f"silent for {self.cfg.net.heartbeat_timeout_s:g}s")
                self.reclaim(m)
                if m.role != "generator":
                    self.failed = f"{m.role} {name} stopped answering"


def body(spec: RunSpec, name: str, stop, log) -> int:
    launcher = os.getppid()
    ctx = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for s in (router, pub):
        s.setsockopt(zmq.LINGER, 1000)
    router.bind(spec.controller_router)
    pub.bind(spec.controller_pub)
    ctl = Controller(spec, log)
    remote = None
    if spec.remote:  # remote generators: CURVE ROUTER and PUB, gatekeeper, weight server (integrations/remote)
        remote = hook("remote.ControllerSide")(ctx, spec, log, ctl.peers.weight_tokens)
        ctl.gate = remote.gate
    poller = zmq.Poller()
    for sock in filter(None, (router, remote and remote.router)):
        poller.register(sock, zmq.POLLIN)
    liveness, report = Rate(0.5), Rate(spec.config.net.heartbeat_s)
    log.info("controller up: ROUTER %s, PUB %s", spec.controller_router, spec.controller_pub)
    while not (stop.is_set() or ctl.done or ctl.failed):
        room, announced = ctl.admission.room(), False
        for sock in dict(poller.poll(50)):
            while True:
                try:
                    ident, msg, key = P.recv_from(sock, ctl.drops, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if msg is None:
                    continue
                out = ctl.handle(ident, msg, remote=sock is not router, key=key)
                if isinstance(out, P.NewVersion):
                    if remote is not None:
                        remote.publish(out)
                    P.send(pub, out)
                    announced = True
                elif out is not None:
                    P.send(sock, out, identity=ident)
        if not announced and (note := ctl.announce_room(room)) is not None:
            for sock in filter(None, (pub, remote and remote.pub)):
                P.send(sock, note)
        if liveness.due():
            ctl.check_liveness()
        if report.due():
            write_status(spec.run_dir, ctl.status())
    reason = ctl.done or ctl.failed or f"signal {stop.reason}"
    accounting = ctl.accounting()
    log.info("stopping: %s; groups %s", reason, accounting)
    with open(os.path.join(spec.run_dir, "groups.json"), "w") as f:
        json.dump({"reason": reason, **accounting}, f, indent=1)
    for _ in range(3):  # PUB may drop the first send to a slow joiner; Stop is idempotent
        for sock in filter(None, (pub, remote and remote.pub)):
            P.send(sock, P.Stop(reason))
        time.sleep(0.05)
    ctl.metrics.close()
    write_status(spec.run_dir, ctl.status(stopped=reason))
    router.close()
    pub.close()
    if remote is not None:
        remote.close()
    ctx.term()
    if os.getppid() != launcher and spec.socket_dir:  # the launcher was killed: nobody else will remove it
        shutil.rmtree(spec.socket_dir, ignore_errors=True)
    return 1 if ctl.failed else 0


if __name__ == "__main__":
    actor_main("controller", body)
