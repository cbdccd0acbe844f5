"""A generator: a rollout engine plus a reward function, fed by admission credits.

    loop:
        ask the controller for credits (whole prompt groups)
        make sure the engine holds weights at least as new as the controller's version
        generate n samples per prompt (tokens, behaviour log-probs, per-token versions)
        hand them to the reward pool, which scores them while the engine generates the next ones
        push each scored group to the buffer (in generation order); a failed reward drops its group
    (offline preference data: no sampling; the given (chosen, rejected) pair is scored by the engine's
    current weights and sent as a two-sample group with rewards (1, 0))

An I/O thread owns the SUB socket and the heartbeat: new weights are queued on the engine the moment
they are announced (the engine swaps them in between decode steps), and Stop ends the loop. A remote
generator (`flux generator --connect`, flux/integrations/remote/side.py) runs this same actor over CURVE
sockets; its new weights come over the weight stream, handed to the engine only once whole and verified.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import queue
import socket
import threading
import time
import zlib

import numpy as np
import zmq

from flux.engine.base import CallBatch, EngineLost
from flux.plugins import hook
from flux.run import protocol as P
from flux.run.runtime import TIMELINE, RunSpec, StopFlag, actor_main, actor_threads, connect, set_threads


RETRY_S = 0.25  # a refused generator asks again at the latest after this long (a lost announcement)


class ControllerLink:
    """The generator's side of the controller: requests on a DEALER, broadcasts and heartbeats on a thread."""

    def __init__(self, ctx, spec: RunSpec, name: str, engine, stop: StopFlag, log):
        self.spec, self.name, self.engine, self.stop, self.log = spec, name, engine, stop, log
        self.drops = P.DropCounter(name)
        self.req = ctx.socket(zmq.DEALER)
        self.req.setsockopt(zmq.LINGER, 0)
        connect(self.req, spec.controller_router, spec)
        self.newest = 0  # newest version announced (engine.version lags until it swaps)
        self.newest_handle: dict | None = None  # where its weights are (to reload an engine that restarted)
        self.run_over = False  # the controller said Stop: the buffer is going too
        self.wake = threading.Event()  # set by a new version, admission room (Control) or Stop
        self._ctx = ctx
        self._io = threading.Thread(target=self._io_loop, name="gen-io", daemon=True)
        # remote: versions arrive over the weight stream (integrations/remote)
        self.fetcher = hook("remote.start_fetcher")(ctx, spec, self._deliver, log) if spec.remote.get("weights") else None

    def _deliver(self, version: int, state: dict) -> None:
        self.engine.load_weights(version, state)
        self.wake.set()

    def request(self, msg, timeout_s: float = 10.0):
        P.send(self.req, msg)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not self.stop.is_set():
            if self.req.poll(100):
                _, reply = P.recv(self.req, self.drops)
                if isinstance(reply, P.Stop):  # e.g. this generator's key was removed from the run
                    self.stop.set(reply.reason)
                    return None
                if reply is not None:
                    return reply
        if not self.stop.is_set():
            self.stop.set("controller did not answer")
        return None

    def start(self) -> int:
        welcome = self.request(P.Register("generator", self.name, os.getpid(), socket.gethostname()))
        if welcome is None:
            return 0
        if welcome.weights:
            self.queue_weights(welcome.version, welcome.weights)
        self._io.start()
        return welcome.version

    def queue_weights(self, version: int, handle: dict) -> None:
        if version >= self.newest:
            self.newest, self.newest_handle = version, handle
        if handle["kind"] == "stream" and self.fetcher is not None:
            self.fetcher.want(version)  # the engine gets it once every chunk is in and the checksum holds
            return
        from flux.run.weights import StaleWeights, load_weights

        def source():
            try:
                return load_weights(handle)
            except StaleWeights:  # overwritten by a newer version, which is announced right after
                return None

        self.engine.load_weights(version, source)
        self.wake.set()

    def _io_loop(self) -> None:
        sub, hb = self._ctx.socket(zmq.SUB), self._ctx.socket(zmq.DEALER)
        for s in (sub, hb):
            s.setsockopt(zmq.LINGER, 0)
        connect(sub, self.spec.controller_pub, self.spec)
        for topic in (b"NewVersion", b"Control", b"Stop"):
            sub.subscribe(topic)
        connect(hb, self.spec.controller_router, self.spec)
        period = self.spec.config.net.heartbeat_s
        t0, last = time.monotonic(), 0.0
        while not self.stop.is_set():
            if sub.poll(int(period * 250)):
                _, msg = P.recv(sub, self.drops)
                if isinstance(msg, P.NewVersion):
                    self.queue_weights(msg.version, msg.weights)
                elif isinstance(msg, P.Control):
                    self.wake.set()
                elif isinstance(msg, P.Stop):
                    self.run_over = True
                    self.stop.set(msg.reason)
                    self.wake.set()
            if time.monotonic() - last >= period:
                last = time.monotonic()
                busy = min(1.0, self.engine.busy_seconds / max(1e-6, last - t0))
                stats = {"version": self.engine.version, "tokens": self.engine.tokens_generated,
                         "drops": self.drops.counts}
                if self.fetcher is not None:
                    stats["weight_stream"] = dict(self.fetcher.stats)
                P.send(hb, P.Heartbeat("generator", self.name, busy, stats))
        sub.close()
        hb.close()

    def wait_for_version(self, version: int) -> bool:
        """Block until the engine runs weights ≥ version (sync mode needs the newest weights)."""
        while self.engine.version < version and not self.stop.is_set():
            self.engine.apply_pending()
            if self.engine.version >= version:
                break
            self.wake.wait(0.05)
            self.wake.clear()
        return self.engine.version >= version


def slowdown_at(version: int, schedule: list, default: float) -> float:
    """Seconds of simulated work per generated token at a policy version (`rollout.slowdown_schedule`).

    The last `[from_version, seconds_per_token]` pair with from_version ≤ version wins; before the first
    pair, `default` (`rollout.slowdown`) applies. The schedule replaces the constant, it does not add to it.
    """
    reached = [float(per_token) for from_version, per_token in schedule if from_version <= version]
    return reached[-1] if reached else default


def recover_engine(engine, link: ControllerLink, lost: list[tuple[int, int]], error: Exception, log) -> None:
    """The engine's backend died mid-call: hand its groups back (re-queued), then bring it back with the
    newest weights, or re-raise `error` (the generator exits; the launcher reports the line)."""
    for gid, n in lost:
        P.send(link.req, P.GroupDone(link.name, gid, n, requeue=True))
    recover = getattr(engine, "recover", None)
    line = f"{link.name}: {error}; {len(lost)} groups re-queued"
    if link.stop.is_set():  # lost as the run stops (after its last step): nothing left to generate for
        return log.info("%s while stopping", line)
    if recover is None or not recover():
        log.error("%s; no restart left", line)
        raise error
    log.warning("%s; engine restarted (%d so far)", line, getattr(engine, "restarts", 1))  # on stderr too
    if link.newest_handle is not None and link.newest > engine.version:
        link.queue_weights(link.newest, link.newest_handle)


class Sender(threading.Thread):
    """Sends each group once the reward pool has scored it, in generation order, on sockets of its own: a
    group leaves the moment it is scored, not when the engine's next call returns. A group whose reward
    failed is dropped (counted) instead."""

    def __init__(self, ctx, spec: RunSpec, name: str):
        super().__init__(name="gen-send", daemon=True)
        self.ctx, self.spec, self.gen = ctx, spec, name
        self.queue: queue.SimpleQueue = queue.SimpleQueue()  # (TrajectoryGroup, future of its scores) | None
        self.halt = threading.Event()
        self.linger_ms = 2000

    def run(self) -> None:
        push, req = self.ctx.socket(zmq.PUSH), self.ctx.socket(zmq.DEALER)
        connect(push, self.spec.buffer_pull, self.spec)
        connect(req, self.spec.controller_router, self.spec)
        while (item := self.queue.get()) is not None:
            group, future = item
            while not future.done() and not self.halt.is_set():
                concurrent.futures.wait([future], timeout=0.1)
            if not future.done():
                break  # stopping: this group and the ones after it are unfinished
            results = future.result()
            if any(score is None for score, _ in results):  # a reward call failed (counted, logged once)
                P.send(req, P.GroupDone(self.gen, group.group_id, group.sample_count, dropped="reward_failed"))
                continue
            group.rewards = np.array([score for score, _ in results], np.float32)
            keys = {k for _, extra in results for k in extra}  # numbers a reward returned besides its score
            if keys:
                group.meta["rewards"] = {k: float(np.mean([e[k] for _, e in results if k in e])) for k in keys}
            P.send(push, group)
            TIMELINE.mark("first_group")
        # Leaving a running run, groups still queued for the buffer get 2 s to reach it; once the run is over
        # the buffer is gone and they are counted as unfinished: waiting for them would only delay the exit.
        push.close(linger=self.linger_ms)
        req.close(linger=self.linger_ms)

    def finish(self, wait_s: float) -> None:
        """Send what is scored within `wait_s`, then stop."""
        self.linger_ms = int(wait_s * 1000)
        self.queue.put(None)
        self.join(wait_s)
        self.halt.set()
        self.join(2)


def _given(results: list) -> concurrent.futures.Future:
    done: concurrent.futures.Future = concurrent.futures.Future()
    done.set_result(results)
    return done


def body(spec: RunSpec, name: str, stop, log) -> int:
    cfg = spec.config
    set_threads(actor_threads(cfg, "generator"))

    from transformers import AutoTokenizer

    from flux.data import is_preference, render_prompt, training_records
    from flux.engine import build_engine
    from flux.engine.base import SamplingParams
    from flux.rewards import Sample, reward_pool

    TIMELINE.mark("libraries")  # torch and transformers
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    records = training_records(cfg, tokenizer)
    rewards = reward_pool(cfg, log)
    seed = cfg.seed * 7919 + int.from_bytes(name.encode()[-4:], "little")
    engine = build_engine(cfg, spec.model_path, name=name, seed=seed, log_dir=f"{spec.run_dir}/logs")
    cores = hook("cpu.CoreShare")(spec, "generator", name)
    cores.follow(getattr(engine, "model", None))  # the built-in engine's threads follow who computes
    TIMELINE.mark("model")
    r = cfg.rollout
    stops = tuple(t for t in {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")}
                  if isinstance(t, int) and t >= 0)
    sampling = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, stops)
    offline = is_preference(records[0])

    def pair(record: dict) -> list[list[int]]:  # offline: the (chosen, rejected) responses
        return [tokenizer(record[k], add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
                for k in ("chosen", "rejected")]

    ctx = zmq.Context()
    link = ControllerLink(ctx, spec, name, engine, stop, log)
    link.start()
    log.info("%s up: %d prompts, engine %s", name, len(records), r.engine)
    sender = Sender(ctx, spec, name)
    sender.start()
    TIMELINE.mark("ready", save=True)
    per_group = 2 if offline else r.group_size
    if offline:
        batch = CallBatch(lambda pairs, _: engine.score([p for p, _ in pairs], [q for _, q in pairs], r.temperature))
    else:  # continuous batching where the engine has it (the built-in one), else one generate call per step
        batch = engine if hasattr(engine, "step") else CallBatch(engine.generate)
    # Sequences in flight: groups_per_call groups, or by default (0) this generator's share of a step, made in
    # one wave as a synchronous trainer makes its batch: a decode step costs nearly the same for half the rows,
    # so a batch made in two waves takes almost twice as long (bench/results/whole_step_leads.json).
    share = -(-cfg.learner.groups_per_step // max(1, r.num_generators))  # (0 local: a remote generator's run)
    capacity = (r.groups_per_call or share) * per_group
    flying: dict[int, tuple] = {}  # group id -> (prompt index, admission token, prompt ids, time admitted)
    refused = 0.0  # when the last admission was refused
    while not stop.is_set():
        try:  # a backend lost while admitting (its weight update) or stepping: its groups are re-queued
            # Ask for credits while there is room for a group, but after a refusal only once the controller
            # announces a new version or room (credit given back, a higher ratio), or RETRY_S have passed.
            while (room := capacity - batch.rows_in_flight) >= per_group and not stop.is_set() and not (
                    flying and not link.wake.is_set() and time.monotonic() - refused < RETRY_S):
                link.wake.clear()  # (what sets it from now on may mean room this request does not see)
                admit = link.request(P.AdmitRequest(name, room // per_group))
                if admit is None or not admit.groups:
                    refused = time.monotonic()
                    break
                if admit.version > link.newest and admit.weights:  # its NewVersion broadcast never reached us
                    link.queue_weights(admit.version, admit.weights)
                for g in admit.groups:
                    idx = g["prompt_index"]
                    flying[g["group_id"]] = (idx, g["token"], render_prompt(records[idx], tokenizer), time.monotonic())
                if not batch.rows_in_flight and not link.wait_for_version(admit.version):
                    break  # (a batch that starts takes the admitted weights; running sequences pick them up)
                # Seeded by what is sampled (prompts, policy version, generator): a resumed run, or a sync run
                # repeated, draws the same completions (a batch that starts empty takes its first request's).
                seed = zlib.crc32(repr((cfg.seed, name, admit.version, [g["prompt_index"] for g in admit.groups])).encode())
                for g in admit.groups:
                    idx, _, ids, _ = flying[g["group_id"]]
                    batch.add(g["group_id"], [(ids, q) for q in pair(records[idx])] if offline else [ids] * per_group,
                              dataclasses.replace(sampling, seed=seed))
            if not batch.rows_in_flight:  # (groups admitted as the run stops are its unfinished ones)
                cores.working(False)
                link.wake.wait(RETRY_S)  # no credit: wait for a new version or room (Control)
                link.wake.clear()
                continue
            tokens = engine.tokens_generated
            cores.working(True)
            done = batch.step()
        except EngineLost as e:
            recover_engine(engine, link, [(gid, per_group) for gid in flying], e, log)
            flying.clear()
            continue
        per_token = slowdown_at(engine.version, r.slowdown_schedule, r.slowdown)
        if per_token:
            extra_s = per_token * (engine.tokens_generated - tokens)
            cores.working(False)  # (a simulated slower engine sleeps: it leaves the cores to the others)
            time.sleep(extra_s)
            engine.busy_seconds += extra_s  # a simulated slower engine is busy, not idle, while it "generates"
        for gid, comps in done:
            idx, token, prompt_ids, t0 = flying.pop(gid)
            texts = tokenizer.batch_decode([c.token_ids for c in comps], skip_special_tokens=True)
            group = P.TrajectoryGroup(
                group_id=gid, prompt_index=idx, generator=name, sample_count=len(comps), token=token,
                prompt_ids=np.asarray(prompt_ids, np.int32),
                response_ids=np.concatenate([c.token_ids for c in comps]),
                response_lens=np.array([len(c.token_ids) for c in comps], np.int32),
                logprobs=np.concatenate([c.logprobs for c in comps]),
                versions=np.concatenate([c.versions for c in comps]),
                rewards=np.zeros(len(comps), np.float32), finish=np.array([c.finished for c in comps], np.uint8),
                gen_seconds=time.monotonic() - t0, meta={"sample": texts[0][:64]})
            if offline:  # the pair's rewards are given
                sender.queue.put((group, _given([(1.0, {}), (0.0, {})])))
            else:
                sender.queue.put((group, rewards.submit([
                    Sample(t, records[idx], c.token_ids.tolist(), "stop" if c.finished else "length")
                    for t, c in zip(texts, comps)])))
        rewards.check()  # a reward that keeps failing stops the run, in one line
    log.info("%s stopping (%s)", name, stop.reason)
    TIMELINE.mark("stopping")
    TIMELINE.totals.update(busy_s=engine.busy_seconds, tokens=engine.tokens_generated,
                           weight_load_s=getattr(engine, "load_seconds", 0.0), weight_loads=getattr(engine, "loads", 0))
    sender.finish(wait_s=0 if link.run_over else 2.0)
    P.send(link.req, P.Goodbye("generator", name, stop.reason or "stopped", True))
    rewards.close()  # groups still being scored are the ledger's unfinished_at_stop (or a leaver's, re-queued)
    engine.close()
    if link._io.ident is not None:  # started (a Stop can come before registration finished)
        link._io.join(2)
    if link.fetcher is not None:
        link.fetcher.stop()
        log.info("%s: weight stream %s", name, link.fetcher.stats)
    link.req.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    actor_main("generator", body)
