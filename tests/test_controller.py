"""The controller's bookkeeping without sockets: admission, group fates, reclaiming a dead generator."""

import logging

import pytest

from actors.controller import Controller
from flux import protocol as P
from flux.config import FluxConfig
from flux.runtime import RunSpec


@pytest.fixture
def ctl(tmp_path):
    cfg = FluxConfig(rollout={"group_size": 4}, learner={"groups_per_step": 2},
                     adaptive_async={"mode": "sync"}).validate()
    spec = RunSpec("r1", str(tmp_path), "m", "tcp://a:1", "tcp://a:2", "tcp://a:3", "tcp://a:4", 10, cfg)
    c = Controller(spec, logging.getLogger("test"))
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


def test_a_dead_generators_groups_are_requeued_and_their_credit_returned(ctl):
    grants = ctl.handle(None, P.AdmitRequest("gen0", 2)).groups
    ctl.handle(None, P.GroupDone("gen0", grants[0]["group_id"], 4))  # pushed: it is the buffer's now
    ctl.members["gen0"].last_seen -= 60                              # silent past the heartbeat timeout
    ctl.check_liveness()
    assert "gen0" not in ctl.members and ctl.failed is None           # a generator's death is survivable
    assert ctl.counts["requeued"] == 1 and ctl.admission.started == 4
    # the re-queued prompt is served first, under a new group id, to a live generator
    regrant = ctl.handle(None, P.AdmitRequest("gen1", 2)).groups
    assert regrant[0]["prompt_index"] == grants[1]["prompt_index"]
    assert regrant[0]["group_id"] not in {g["group_id"] for g in grants}
    acc = ctl.accounting()
    assert acc["admitted"] == 3 and acc["requeued"] == 1 and acc["unfinished_at_stop"] == 2


def test_dropped_groups_give_their_credit_back_once(ctl):
    grants = ctl.handle(None, P.AdmitRequest("gen0", 2)).groups
    gid = grants[0]["group_id"]
    ctl.handle(None, P.BufferReport(0, 1, {"dropped_ids": [gid]}))
    ctl.handle(None, P.BufferReport(0, 1, {"dropped_ids": [gid]}))   # reported twice: counted once
    assert ctl.counts["dropped"] == 1 and ctl.admission.started == 4
    assert len(ctl.handle(None, P.AdmitRequest("gen1", 2)).groups) == 1   # the freed credit is reused


def test_a_dead_learner_fails_the_run(ctl):
    ctl.handle(None, P.Register("learner", "learner", 3, "h"))
    ctl.members["learner"].last_seen -= 60
    ctl.check_liveness()
    assert ctl.failed and "learner" in ctl.failed
