"""The group ledger: named transitions, and no sequence of events loses a group or a credit."""

from hypothesis import given, settings
from hypothesis import strategies as st

from flux.control.admission import Admission, PromptCursor
from flux.control.ledger import ADMITTED, RECEIVED, REQUEUED, Ledger


def ledger(ratio=1.0, n=4, groups_per_step=2):
    return Ledger(Admission(n * groups_per_step, eta_max=2, async_ratio=ratio), PromptCursor(10, 0), n)


def test_the_life_of_a_group():
    lg = ledger()
    a, b, c = lg.admit("gen0", 3)
    assert a.state == ADMITTED and lg.admission.started == 12
    assert lg.received(a.group_id) and lg.groups[a.group_id].state == RECEIVED
    assert not lg.received(a.group_id)                      # twice: once
    assert lg.trained(a.group_id) and not lg.trained(a.group_id)
    assert lg.dropped(b.group_id, "stale") and lg.admission.started == 8
    lost = lg.lost("gen0")
    assert [g.group_id for g in lost] == [c.group_id] and lg.groups[c.group_id].state == REQUEUED
    assert lg.admission.started == 4 and lg.cursor.next() == c.prompt_index   # its prompt goes first
    assert lg.trained(c.group_id)                           # it reached the buffer after all: charged again
    assert lg.admission.started == 8
    assert lg.summary() == {"admitted": 3, "trained": 2, "dropped": 1, "requeued": 0, "produced": 1,
                            "dropped_by": {"stale": 1}, "in_flight": 0}
    lg.check()


def test_a_received_group_survives_its_generator():
    lg = ledger()
    g, = lg.admit("gen0", 1)
    lg.received(g.group_id)
    assert lg.lost("gen0") == [] and lg.in_flight()[0].group_id == g.group_id


def test_restore_requeues_what_was_in_flight():
    lg = ledger()
    groups = lg.admit("gen0", 3)
    lg.trained(groups[0].group_id)
    state, started = lg.state(), lg.admission.started
    again = ledger()
    assert again.restore(state, started) == [g.prompt_index for g in groups[1:]]
    assert again.counts["requeued"] == 2 and again.admission.started == 4
    again.check()
    more = again.admit("gen1", 1)
    assert more[0].group_id == 3
    again.check()


EVENTS = st.lists(st.tuples(st.sampled_from(["admit", "received", "trained", "dropped", "lost", "requeue",
                                             "publish"]),
                            st.integers(0, 2), st.integers(0, 12)), max_size=120)


@settings(max_examples=300, deadline=None)
@given(EVENTS, st.sampled_from([0.0, 0.5, 1.0]))
def test_no_sequence_of_events_loses_a_group_or_a_credit(events, ratio):
    lg = ledger(ratio)
    for kind, gen, gid in events:
        name = f"gen{gen}"
        if kind == "admit":
            lg.admit(name, 2)
        elif kind == "received":
            lg.received(gid)
        elif kind == "trained":
            lg.trained(gid)
        elif kind == "dropped":
            lg.dropped(gid, "stale" if gid % 2 else "reward_failed")
        elif kind == "lost":
            lg.lost(name)
        elif kind == "requeue":
            lg.requeue(gid)
        else:
            lg.admission.version += 1
        lg.check()
        assert lg.admission.started >= 0
    # Settle everything still live: each admitted group ends with exactly one fate, every credit is accounted.
    for g in list(lg.groups.values()):
        lg.trained(g.group_id) if g.group_id % 2 else lg.dropped(g.group_id, "stale")
    lg.check()
    c = lg.counts
    assert c["admitted"] == c["trained"] + c["dropped"] and c["requeued"] == 0
    assert lg.admission.started == lg.group_size * c["trained"]
