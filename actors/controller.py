"""The controller: the run's clock. Policy version, PID loop, admission credits, membership, stop.

    loop:
        serve requests on ROUTER (register, admit, heartbeats, group done, published, step reports),
            and remote generators' on the CURVE ROUTER (net.remote, flux/remote.py)
        declare silent actors dead; re-queue a dead generator's unfinished groups
        on every learner step: update the async ratio, send one metrics line to the sinks (metrics.jsonl, ...)
        about once per heartbeat period: rewrite status.json (membership and the control loop's numbers)
        when the learner says it is done (or a signal arrives): broadcast Stop, exit
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from flux import protocol as P
from flux.admission import Admission, PromptCursor
from flux.pid import PID
from flux.runtime import Rate, RunSpec, actor_main
from flux.sinks import open_sinks
from flux.status import write_status


@dataclass
class Member:
    role: str
    name: str
    pid: int
    last_seen: float
    host: str = ""
    busy_frac: float = 0.0
    stats: dict = field(default_factory=dict)
    outstanding: dict = field(default_factory=dict)  # group_id -> (prompt_index, n_samples)
    remote: bool = False  # attached over the CURVE endpoint (`flux generator --connect`)


# What a remote peer may say: a generator's part of the conversation, nothing of the learner's or buffer's.
REMOTE_TYPES = (P.RunInfoRequest, P.Register, P.Heartbeat, P.AdmitRequest, P.GroupDone, P.Goodbye)


class Controller:
    def __init__(self, spec: RunSpec, log):
        cfg = spec.config
        self.spec, self.cfg, self.log = spec, cfg, log
        aa = cfg.adaptive_async
        ratio = {"sync": 0.0, "async": aa.max_async_ratio, "adaptive": aa.initial_async_ratio}[aa.mode]
        self.admission = Admission(cfg.batch_samples, aa.eta_max, ratio)
        self.pid = PID(aa.target_staleness, aa.kp, aa.ki, aa.kd, aa.min_async_ratio, aa.max_async_ratio,
                       bias=aa.initial_async_ratio, ema_horizon=aa.ema_horizon)
        self.cursor = PromptCursor(spec.num_prompts, cfg.seed)
        self.members: dict[str, Member] = {}
        self.gone: dict[str, dict] = {}  # name -> its last status row, for `flux status`
        self.weights: dict | None = None
        self.next_group_id = 0
        self.counts = {"admitted": 0, "produced": 0, "trained": 0, "dropped": 0, "requeued": 0}
        self.group_fate: dict[int, str] = {}
        self.group_prompt: dict[int, int] = {}  # group id -> prompt index, to re-queue it on resume
        self.peer_drops: dict[str, dict] = {}  # actor -> malformed messages it dropped, by reason
        self.produced_by: dict[str, int] = {}  # generator -> groups it pushed to the buffer
        self.handed_out: set[str] = set()  # names given to remote generators in a RunInfo
        # net.weight_stream=plain: the weight server serves these tokens only (one per remote generator)
        self.weight_tokens: set[str] = set()
        self.token_of: dict[str, str] = {}
        self.prompts_digest = ""
        if spec.remote:
            from flux.data import load_prompts
            from flux.remote import prompts_digest

            self.prompts_digest = prompts_digest(load_prompts(cfg.prompts))
        self.trained_samples = self.trained_tokens = 0
        self.dropped_stale = 0
        self.t_start = time.time()
        self.t_first_admit: float | None = None
        self.done: str | None = None
        self.failed: str | None = None
        self.drops = P.DropCounter("controller")
        self.last_step: int | None = None
        self.metrics = open_sinks(spec.run_dir, cfg)
        if spec.resume_from:
            self.restore(json.loads(Path(spec.resume_from, "controller_state.json").read_text()))

    # ---- requests -------------------------------------------------------------------------------
    def handle(self, ident, msg, remote: bool = False) -> P.Message | None:
        """One request → an optional reply. `remote`: it came in on the CURVE endpoint."""
        if remote and not self.remote_may_send(msg):
            return None
        now = time.monotonic()
        name = getattr(msg, "name", None)
        if name in self.members:
            self.members[name].last_seen = now
        if isinstance(msg, P.RunInfoRequest):
            return self.run_info(msg)
        if isinstance(msg, P.Register):
            self.members[msg.name] = Member(msg.role, msg.name, msg.pid, now, msg.host, remote=remote)
            self.gone.pop(msg.name, None)
            self.log.info("%s %s registered (pid %d%s)", msg.role, msg.name, msg.pid,
                          f" on {msg.host}, remote" if remote else "")
            if remote:
                from flux.remote import stream_handle

                return P.Welcome(self.spec.run_id, self.admission.version, stream_handle(self.weights))
            return P.Welcome(self.spec.run_id, self.admission.version, self.weights)
        if isinstance(msg, P.Heartbeat):
            m = self.members.get(msg.name)
            if m:
                m.busy_frac, m.stats = msg.busy_frac, msg.stats
                if msg.stats.get("drops"):
                    self.peer_drops[m.name] = dict(msg.stats["drops"])
        elif isinstance(msg, P.AdmitRequest):
            return self.admit(msg)
        elif isinstance(msg, P.GroupDone):
            m = self.members.get(msg.name)
            if m and m.outstanding.pop(msg.group_id, None) is not None:
                self.counts["produced"] += 1
                self.produced_by[m.name] = self.produced_by.get(m.name, 0) + 1
        elif isinstance(msg, P.Published):
            self.admission.version = msg.version
            self.weights = msg.weights
            return P.NewVersion(msg.version, msg.weights)  # broadcast, not a reply (see loop)
        elif isinstance(msg, P.StepReport):
            self.on_step(msg)
        elif isinstance(msg, P.BufferReport):
            self.on_dropped(msg.stats.get("dropped_ids", []))
            self.dropped_stale = msg.dropped_stale
        elif isinstance(msg, P.Goodbye):
            self.on_goodbye(msg)
        return None

    def remote_may_send(self, msg) -> bool:
        """A remote peer speaks for remote generators only: never as the learner or buffer, never in the
        name of a local actor. Anything else is counted and dropped."""
        name = getattr(msg, "name", "")
        if not isinstance(msg, REMOTE_TYPES) or getattr(msg, "role", "generator") != "generator":
            self.drops.drop("remote_not_allowed", detail=msg.TYPE)
            return False
        member = self.members.get(name)
        if member is not None and not member.remote and not isinstance(msg, P.RunInfoRequest):
            self.drops.drop("remote_not_allowed", detail=f"{msg.TYPE} in the name of local {name}")
            return False
        return True

    def run_info(self, req: P.RunInfoRequest) -> P.RunInfo:
        """What a remote generator needs to join: the config, model path, prompts digest, the other ports."""
        from flux.remote import port_of

        name, k = req.name, 1
        while name in self.members or name in self.handed_out:
            k += 1
            name = f"{req.name}-{k}"
        self.handed_out.add(name)
        token = ""
        if self.cfg.net.weight_stream == "plain":
            import secrets

            token = self.token_of[name] = secrets.token_hex(16)
            self.weight_tokens.add(token)
        r = self.spec.remote
        self.log.info("remote generator %s on %s asks to join", name, req.host)
        return P.RunInfo(self.spec.run_id, name, self.admission.version, self.spec.model_path, self.spec.num_prompts,
                         self.prompts_digest, self.cfg.to_dict(),
                         {k: port_of(r[k]) for k in ("pub", "pull", "weights")}, token)

    def admit(self, req: P.AdmitRequest) -> P.Admit:
        member = self.members.get(req.name)
        grants = []
        if member is not None and self.done is None:
            n = self.cfg.rollout.group_size
            while len(grants) < req.max_groups and self.admission.try_admit(n):
                gid, idx = self.next_group_id, self.cursor.next()
                self.next_group_id += 1
                member.outstanding[gid] = (idx, n)
                self.group_fate[gid] = "admitted"
                self.group_prompt[gid] = idx
                grants.append({"group_id": gid, "prompt_index": idx})
            if grants:
                self.counts["admitted"] += len(grants)
                self.t_first_admit = self.t_first_admit or time.time()
        return P.Admit(grants, self.admission.version)

    def on_dropped(self, group_ids) -> None:
        """The buffer dropped these groups (too stale, or zero reward variance): their credit comes back."""
        n = self.cfg.rollout.group_size
        for gid in group_ids:
            fate = self.group_fate.get(gid)
            if fate not in ("trained", "dropped"):
                self.group_fate[gid] = "dropped"
                self.counts["dropped"] += 1
                if fate == "requeued":  # its generator died after sending it; the credit came back then
                    self.counts["requeued"] -= 1
                else:
                    self.admission.give_back(n)

    def on_step(self, rep: P.StepReport) -> None:
        m = rep.metrics
        for gid in m.pop("group_ids", []):
            if self.group_fate.get(gid) == "requeued":
                # Its generator was declared dead after pushing it: it trained after all. One fate per
                # group, and its samples count against admission again (its prompt runs twice; none lost).
                self.counts["requeued"] -= 1
                self.admission.charge(self.cfg.rollout.group_size)
            self.group_fate[gid] = "trained"
            self.counts["trained"] += 1
        self.trained_samples += int(m.get("samples", 0))
        self.trained_tokens += int(m.get("tokens", 0))
        if self.cfg.adaptive_async.mode == "adaptive" and "staleness_mean" in m:
            self.admission.async_ratio = self.pid.update(float(m["staleness_mean"]))
        gens = [g for g in self.members.values() if g.role == "generator"]
        elapsed = max(1e-6, time.time() - (self.t_first_admit or self.t_start))
        line = {
            "step": rep.step, "version": rep.version, **m,
            "async_ratio": self.admission.async_ratio,
            "staleness_ema": self.pid.ema,
            "samples_per_s": self.trained_samples / elapsed,
            "tokens_per_s": self.trained_tokens / elapsed,
            "generator_busy_frac": sum(g.busy_frac for g in gens) / max(1, len(gens)),
            "generator_busy": {g.name: g.busy_frac for g in gens},
            "dropped_stale": self.dropped_stale,
            "started_samples": self.admission.started,
            "groups": dict(self.counts),
            "wall_s": time.time() - self.t_start,
            "controller": self.state(),
        }
        self.metrics.write(rep.step, line)
        self.last_step = rep.step
        if "checkpoint" in m:  # the learner saved one: the controller's half of the state goes beside it
            with open(os.path.join(m["checkpoint"], "controller_state.json"), "w") as f:
                json.dump(self.state(), f, indent=1)

    def accounting(self) -> dict:
        """Where every admitted group ended: trained, dropped (counted), re-queued, or still in flight."""
        fates = {"admitted": 0, "trained": 0, "dropped": 0, "requeued": 0}
        for fate in self.group_fate.values():
            fates[fate] += 1
        # re-queued prompts are admitted again as new groups, so each admission has exactly one fate
        return {**self.counts, "unfinished_at_stop": fates["admitted"], "by_generator": dict(self.produced_by)}

    def state(self) -> dict:
        """Everything needed to continue this run's control loop: step, version, ratio, PID, data cursor,
        counters, and the prompts admitted but not yet trained or dropped (in admission order)."""
        in_flight = [self.group_prompt[gid] for gid, fate in sorted(self.group_fate.items()) if fate == "admitted"]
        return {"step": None if self.last_step is None else self.last_step + 1,
                "version": self.admission.version, "async_ratio": self.admission.async_ratio,
                "started_samples": self.admission.started, "pid": self.pid.state(),
                "cursor": self.cursor.state(), "in_flight": in_flight, "groups": dict(self.counts),
                "next_group_id": self.next_group_id}

    def restore(self, state: dict) -> None:
        """Continue from `state()` of a checkpoint. The groups in flight then are lost with the old run:
        their prompts go first, in their original order (so a resumed sync run trains exactly the data
        the uninterrupted one would have), and they count as re-queued."""
        in_flight = list(state.get("in_flight", []))
        n = self.cfg.rollout.group_size
        self.admission.version = int(state["version"])
        self.admission.async_ratio = float(state["async_ratio"])
        self.admission.started = int(state["started_samples"]) - n * len(in_flight)
        for key in ("integral", "ema", "output"):  # the loop's memory; gains and target come from the config
            setattr(self.pid, key, state["pid"][key])
        self.cursor = PromptCursor.from_state(state["cursor"], first=in_flight)
        self.counts.update(state["groups"])
        self.counts["requeued"] += len(in_flight)
        self.next_group_id = int(state["next_group_id"])
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
                "staleness_ema": self.pid.ema, "target_staleness": aa.target_staleness, "buffer_depth": depth,
                "groups": dict(self.counts), "groups_by_generator": dict(self.produced_by),
                "members": [me, *alive, *self.gone.values()],
                "dropped_messages": {"controller": self.drops.counts, **self.peer_drops}}

    def member_row(self, m: Member, now: float, state: str = "alive", reason: str = "") -> dict:
        """One actor in status.json; a busy fraction only where one is measured (learner, generators)."""
        alive = state == "alive"
        return {"role": m.role, "name": m.name, "pid": m.pid, "host": m.host, "remote": m.remote,
                "alive": alive, "state": state,
                "reason": reason, "heartbeat_age_s": round(now - m.last_seen, 3) if alive else None,
                "busy_frac": m.busy_frac if m.role in ("learner", "generator") else None,
                "version": m.stats.get("version", self.admission.version if m.role == "learner" else None)}

    def forget(self, member: Member, state: str, reason: str) -> None:
        """A member `exited` (said goodbye) or is `dead` (crashed, silent); `flux status` still lists it."""
        self.gone[member.name] = self.member_row(member, time.monotonic(), state, reason)
        self.weight_tokens.discard(self.token_of.pop(member.name, ""))  # no more weights for it

    def on_goodbye(self, msg: P.Goodbye) -> None:
        self.log.info("%s %s says goodbye (%s, ok=%s)", msg.role, msg.name, msg.reason, msg.ok)
        member = self.members.pop(msg.name, None)
        if member:
            self.forget(member, "exited" if msg.ok else "dead", msg.reason)
            self.reclaim(member)
        if msg.role == "learner" and msg.ok:
            self.done = msg.reason
        elif not msg.ok and msg.role != "generator":
            self.failed = f"{msg.role} {msg.name} died: {msg.reason}"

    # ---- liveness -------------------------------------------------------------------------------
    def reclaim(self, member: Member) -> None:
        """A generator is gone: its unfinished groups go back to the front of the queue."""
        for gid, (idx, n) in member.outstanding.items():
            self.group_fate[gid] = "requeued"
            self.counts["requeued"] += 1
            self.admission.give_back(n)
            self.cursor.requeue(idx)
        if member.outstanding:
            self.log.warning("re-queued %d groups of %s", len(member.outstanding), member.name)
        member.outstanding.clear()

    def check_liveness(self) -> None:
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
    ctx = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    for s in (router, pub):
        s.setsockopt(zmq.LINGER, 1000)
    router.bind(spec.controller_router)
    pub.bind(spec.controller_pub)
    ctl = Controller(spec, log)
    remote = None
    if spec.remote:  # remote generators: CURVE ROUTER and PUB, gatekeeper, weight server (flux/remote.py)
        from flux.remote import RemoteSide

        remote = RemoteSide(ctx, spec, log, ctl.weight_tokens)
    poller = zmq.Poller()
    for sock in (router, remote and remote.router):
        if sock is not None:
            poller.register(sock, zmq.POLLIN)
    liveness, report = Rate(0.5), Rate(spec.config.net.heartbeat_s)
    log.info("controller up: ROUTER %s, PUB %s", spec.controller_router, spec.controller_pub)
    while not (stop.is_set() or ctl.done or ctl.failed):
        for sock in dict(poller.poll(50)):
            while True:
                try:
                    ident, msg = P.recv(sock, ctl.drops, zmq.NOBLOCK)
                except zmq.Again:
                    break
                if msg is None:
                    continue
                out = ctl.handle(ident, msg, remote=sock is not router)
                if isinstance(out, P.NewVersion):
                    if remote is not None:
                        remote.publish(out)
                    P.send(pub, out)
                elif out is not None:
                    P.send(sock, out, identity=ident)
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
        for sock in (pub, remote and remote.pub):
            if sock is not None:
                P.send(sock, P.Stop(reason))
        time.sleep(0.05)
    ctl.metrics.close()
    write_status(spec.run_dir, ctl.status(stopped=reason))
    router.close()
    pub.close()
    if remote is not None:
        remote.close()
    ctx.term()
    return 1 if ctl.failed else 0


if __name__ == "__main__":
    actor_main("controller", body)
