"""The controller's bookkeeping without sockets: admission, group fates, reclaiming a dead generator."""

import logging

import pytest

from actors.controller import Controller
from flux.run import protocol as P
from flux.config import FluxConfig
from flux.run.runtime import RunSpec


def make_controller(run_dir, **adaptive_async) -> Controller:
    """A controller of a run in `run_dir` (2 groups of 4 a step), without sockets."""
    cfg = FluxConfig(rollout={"group_size": 4}, learner={"groups_per_step": 2},
                     adaptive_async=adaptive_async).validate()
    spec = RunSpec("r1", str(run_dir), "m", "tcp://a:1", "tcp://a:2", "tcp://a:3", "tcp://a:4", 10, cfg,
                   secret="s3cret")
    return Controller(spec, logging.getLogger("test"))


@pytest.fixture
def ctl(tmp_path):
    c = make_controller(tmp_path, mode="sync")
    c.handle(None, P.Register("generator", "gen0", 1, "h"))
    c.handle(None, P.Register("generator", "gen1", 2, "h"))
    yield c
    c.metrics.close()


def test_sync_admits_exactly_one_batch_per_version(ctl):
    first = ctl.handle(None, P.AdmitRequest("gen0", 5))
    assert len(first.groups) == 2 and first.version == 0          # B = 8 samples = 2 groups of 4
    assert ctl.handle(None, P.AdmitRequest("gen1", 5)).groups == []
    ctl.handle(None, P.Published(1, {"kind": "shm", "name": "x", "version": 1, "nbytes": 1, "host": "h"}))
    again = ctl.handle(None, P.AdmitRequest("gen1", 5))
    assert len(again.groups) == 2 and again.version == 1
    assert again.weights["name"] == "x"   # where version 1 is: a generator that missed the broadcast reads it


def test_a_resumed_controller_admits_nothing_until_its_version_has_weights(ctl):
    ctl.admission.version = 4          # as restored from a checkpoint: the learner has not published yet
    assert ctl.handle(None, P.AdmitRequest("gen0", 5)).groups == []
    ctl.handle(None, P.Published(4, {"kind": "shm", "name": "w4", "version": 4, "nbytes": 1, "host": "h"}))
    admit = ctl.handle(None, P.AdmitRequest("gen0", 5))
    assert admit.groups and admit.version == 4 and admit.weights["name"] == "w4"


def test_a_dead_generators_groups_are_requeued_and_their_credit_returned(ctl):
    grants = ctl.handle(None, P.AdmitRequest("gen0", 2)).groups
    ctl.handle(None, P.BufferReport(0, 0, {}, received=[grants[0]["group_id"]]))  # the buffer has it now
    ctl.members["gen0"].last_seen -= 60                              # silent past the heartbeat timeout
    ctl.check_liveness()
    assert "gen0" not in ctl.members and ctl.failed is None           # a generator's death is survivable
    assert ctl.ledger.counts["requeued"] == 1 and ctl.admission.started == 4
    # the re-queued prompt is served first, under a new group id, to a live generator
    regrant = ctl.handle(None, P.AdmitRequest("gen1", 2)).groups
    assert regrant[0]["prompt_index"] == grants[1]["prompt_index"]
    assert regrant[0]["group_id"] not in {g["group_id"] for g in grants}
    acc = ctl.accounting()
    assert acc["admitted"] == 3 and acc["requeued"] == 1 and acc["unfinished_at_stop"] == 2


def test_dropped_groups_give_their_credit_back_once(ctl):
    grants = ctl.handle(None, P.AdmitRequest("gen0", 2)).groups
    gid = grants[0]["group_id"]
    ctl.handle(None, P.BufferReport(0, 1, {}, dropped={"stale": [gid]}))
    ctl.handle(None, P.BufferReport(0, 1, {}, dropped={"stale": [gid]}))   # reported twice: counted once
    assert ctl.ledger.counts["dropped"] == 1 and ctl.admission.started == 4
    assert ctl.accounting()["dropped_by"] == {"stale": 1}
    assert len(ctl.handle(None, P.AdmitRequest("gen1", 2)).groups) == 1   # the freed credit is reused


def test_credit_that_comes_back_is_announced_so_refused_generators_need_not_poll(ctl):
    grants = ctl.handle(None, P.AdmitRequest("gen0", 2)).groups
    before = ctl.admission.room()
    assert before == 0 and ctl.handle(None, P.AdmitRequest("gen1", 2)).groups == []   # refused
    assert ctl.announce_room(before) is None                                         # nothing changed
    ctl.handle(None, P.BufferReport(0, 1, {}, dropped={"zero_variance": [grants[0]["group_id"]]}))
    note = ctl.announce_room(before)
    assert isinstance(note, P.Control) and note.knobs == {"room": 4}
    assert P.decode(P.encode(note)) == note                                          # it goes on the wire
    ctl.admission.started += 8                                             # over the bound: less room
    assert ctl.announce_room(ctl.admission.room() - 1) is None             # still no room: silent


def step_report(step, version, group_ids, skipped=False):
    return P.StepReport(step, version, {"group_ids": group_ids, "step_skipped": float(skipped), "samples": 8})


def test_a_skipped_step_drops_its_groups_and_the_next_batch_is_still_admitted(ctl):
    """Sync mode: a step skipped for a non-finite gradient publishes nothing, so the version stays; without
    its credit coming back the next batch would never be admitted (the run hung forever)."""
    grants = ctl.handle(None, P.AdmitRequest("gen0", 5)).groups
    ids = [g["group_id"] for g in grants]
    ctl.handle(None, P.BufferReport(0, 0, {}, received=ids))
    assert ctl.handle(None, P.AdmitRequest("gen0", 5)).groups == []   # sync: one batch per version
    ctl.handle(None, step_report(0, 0, ids, skipped=True))
    again = ctl.handle(None, P.AdmitRequest("gen0", 5)).groups
    assert len(again) == 2 and again[0]["group_id"] not in ids        # the next batch, same version
    assert ctl.accounting()["dropped_by"] == {"step_skipped": 2}
    assert ctl.trained_samples == 0
    ctl.ledger.check()


def test_a_failed_reward_gives_the_credit_back_and_a_stranger_is_counted(ctl):
    grants = ctl.handle(None, P.AdmitRequest("gen0", 1)).groups
    gid = grants[0]["group_id"]
    ctl.handle(None, P.GroupDone("gen1", gid, 4, dropped="reward_failed"))   # not gen1's group: ignored
    assert ctl.admission.started == 4
    ctl.handle(None, P.GroupDone("gen0", 99, 4, dropped="reward_failed"))    # never admitted: counted
    assert ctl.drops.counts == {"unknown_group": 1}
    ctl.handle(None, P.GroupDone("gen0", gid, 4, dropped="reward_failed"))
    assert ctl.admission.started == 0 and ctl.accounting()["dropped_by"] == {"reward_failed": 1}
    ctl.ledger.check()


def test_a_group_lost_with_its_engine_is_requeued_and_its_prompt_goes_first(ctl):
    grants = ctl.handle(None, P.AdmitRequest("gen0", 2)).groups
    lost = grants[1]
    ctl.handle(None, P.GroupDone("gen1", lost["group_id"], 4, requeue=True))  # not gen1's: ignored
    assert ctl.admission.started == 8
    ctl.handle(None, P.GroupDone("gen0", lost["group_id"], 4, requeue=True))
    ctl.handle(None, P.GroupDone("gen0", lost["group_id"], 4, requeue=True))  # twice: once
    assert ctl.admission.started == 4 and ctl.accounting()["requeued"] == 1
    again = ctl.handle(None, P.AdmitRequest("gen0", 1)).groups[0]
    assert again["prompt_index"] == lost["prompt_index"] and again["group_id"] != lost["group_id"]
    ctl.ledger.check()


def test_admissions_carry_a_token_the_buffer_can_check(ctl):
    from flux.control.admission import admission_token

    g = ctl.handle(None, P.AdmitRequest("gen0", 1)).groups[0]
    assert g["token"] == admission_token(ctl.spec.secret, g["group_id"], "gen0", g["prompt_index"], 4)
    assert g["token"] != admission_token(ctl.spec.secret, g["group_id"], "gen1", g["prompt_index"], 4)


def test_a_dead_learner_fails_the_run(ctl):
    ctl.handle(None, P.Register("learner", "learner", 3, "h"))
    ctl.members["learner"].last_seen -= 60
    ctl.check_liveness()
    assert ctl.failed and "learner" in ctl.failed


def test_a_refused_generator_wakes_on_the_room_announcement(tmp_path):
    """The generator's half of `announce_room`: its I/O thread turns a `Control` broadcast into a wake-up
    (without it a refused generator would wait out RETRY_S before asking again)."""
    import threading
    import types

    import zmq

    from actors.generator import ControllerLink
    from flux.run.runtime import StopFlag

    ctx = zmq.Context()
    router, pub = ctx.socket(zmq.ROUTER), ctx.socket(zmq.PUB)
    router.bind(f"ipc://{tmp_path}/r")
    pub.bind(f"ipc://{tmp_path}/p")
    cfg = FluxConfig(adaptive_async={"mode": "sync"}).validate()
    spec = RunSpec("r1", str(tmp_path), "m", f"ipc://{tmp_path}/r", f"ipc://{tmp_path}/p", "ipc://x",
                   "ipc://y", 10, cfg)
    stop, engine = StopFlag(), types.SimpleNamespace(busy_seconds=0.0, version=0, tokens_generated=0)
    link = ControllerLink(ctx, spec, "gen0", engine, stop, logging.getLogger("test"))
    starting = threading.Thread(target=link.start)
    starting.start()
    assert router.poll(5000)
    ident, msg, _ = P.recv_from(router, P.DropCounter("test"))
    assert isinstance(msg, P.Register)
    P.send(router, P.Welcome("r1", 0, None), identity=ident)
    starting.join(5)
    try:
        link.wake.clear()
        assert not link.wake.wait(0.3)             # nothing announced: no wake-up
        for _ in range(40):                        # (a PUB drops what it sends before the SUB has joined)
            P.send(pub, P.Control(0.0, {"room": 4}))
            if link.wake.wait(0.05):
                break
        assert link.wake.is_set()
    finally:
        stop.set("test over")
        link._io.join(5)
        link.req.close()
        router.close()
        pub.close()
        ctx.term()


def test_a_run_resumed_with_another_target_reads_back_the_same_rms(tmp_path):
    """The PID's EMA is of S²/target: restored under another target it is rescaled, so that the smoothed
    staleness (its RMS read-back) and the loop's integral continue unchanged."""
    from flux.control.pid import rms_input, rms_reading

    def controller(target, name):
        (tmp_path / name).mkdir()
        return make_controller(tmp_path / name, target_staleness=target)

    before, after = controller(0.1, "a"), controller(0.2, "b")
    for s in (0.3, 0.05, 0.2):
        before.pid.update(rms_input(s, 0.1))
    after.restore(before.state())
    assert after.pid.ema != before.pid.ema
    assert abs(rms_reading(after.pid.ema, 0.2) - rms_reading(before.pid.ema, 0.1)) < 1e-12
    assert (after.pid.integral, after.pid.output) == (before.pid.integral, before.pid.output)
    same = controller(0.1, "c")
    same.restore(before.state())
    assert same.pid.ema == before.pid.ema
    for c in (before, after, same):
        c.metrics.close()
