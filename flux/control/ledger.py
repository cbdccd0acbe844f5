"""The group ledger: every prompt group's life, and the admission credits it holds.

A group is one prompt's n samples. Its life, each arrow a named method:

    admit ─▶ ADMITTED ──received──▶ RECEIVED ──trained──▶ TRAINED            (terminal)
                │                      │
                │                      └────dropped(reason)──▶ DROPPED       (terminal, counted by reason)
                ├──dropped(reason)──▶ DROPPED
                └──lost / requeue──▶ REQUEUED ──trained──▶ TRAINED  (its generator was declared dead, yet
                                       │            the group reached the buffer: the credit is taken again)
                                       └──dropped──▶ DROPPED

- ADMITTED: a generator holds the credit; RECEIVED: the buffer holds the group (from then on a dead
  generator does not matter).
- A group in ADMITTED, RECEIVED or TRAINED holds its n samples of credit (`Admission.started`); DROPPED
  and REQUEUED groups have given it back, so the learner can always get a full batch. A re-queued group's
  prompt goes to the front of the data cursor and is admitted again under a new id.
- Every event on a terminal group, or on an id never issued, is ignored (and returns False): a report
  that arrives twice counts once.

Invariant, for any sequence of events (tests/test_ledger.py):
    admitted == trained + dropped + requeued + in flight,   started == credit held by the live groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from flux.control.admission import Admission, PromptCursor

ADMITTED, RECEIVED, TRAINED, DROPPED, REQUEUED = "admitted", "received", "trained", "dropped", "requeued"
HOLDS_CREDIT = (ADMITTED, RECEIVED, TRAINED)


@dataclass
class Group:
    group_id: int
    prompt_index: int
    generator: str
    n: int
    state: str = ADMITTED


class Ledger:
    """Owns the groups, the admission credits (`admission`) and the data cursor (`cursor`)."""

    def __init__(self, admission: Admission, cursor: PromptCursor, group_size: int):
        self.admission, self.cursor, self.group_size = admission, cursor, group_size
        self.groups: dict[int, Group] = {}  # live ones: ADMITTED, RECEIVED, REQUEUED (terminal ones leave)
        self.next_id = 0
        self.counts = {"admitted": 0, "trained": 0, "dropped": 0, "requeued": 0}
        self.dropped_by: dict[str, int] = {}  # reason -> groups
        self.produced_by: dict[str, int] = {}  # generator -> groups the buffer received from it
        self.settled = 0  # credit of trained groups no longer in `groups`
        self.requeued_before = 0  # re-queued groups of the run this one resumed (gone with it)

    # ---- transitions ----------------------------------------------------------------------------
    def admit(self, generator: str, max_groups: int) -> list[Group]:
        """Up to `max_groups` new groups for `generator`, as far as the credits allow."""
        out = []
        while len(out) < max_groups and self.admission.try_admit(self.group_size):
            g = Group(self.next_id, self.cursor.next(), generator, self.group_size)
            self.next_id += 1
            self.groups[g.group_id] = g
            out.append(g)
        self.counts["admitted"] += len(out)
        return out

    def received(self, gid: int) -> bool:
        """The buffer holds the group."""
        g = self.groups.get(gid)
        if g is None or g.state == RECEIVED:
            return False
        self.produced_by[g.generator] = self.produced_by.get(g.generator, 0) + 1
        if g.state == ADMITTED:
            g.state = RECEIVED
        return True

    def trained(self, gid: int) -> bool:
        g = self.groups.pop(gid, None)
        if g is None:
            return False
        if g.state == REQUEUED:  # trained after all: its prompt runs twice, nothing is lost
            self.counts["requeued"] -= 1
            self.admission.charge(g.n)
        self.counts["trained"] += 1
        self.settled += g.n
        return True

    def dropped(self, gid: int, reason: str) -> bool:
        """Dropped (too stale, zero variance, a failed reward, a skipped step...): the credit comes back."""
        g = self.groups.pop(gid, None)
        if g is None:
            return False
        if g.state == REQUEUED:
            self.counts["requeued"] -= 1
        else:
            self.admission.give_back(g.n)
        self.counts["dropped"] += 1
        self.dropped_by[reason] = self.dropped_by.get(reason, 0) + 1
        return True

    def lost(self, generator: str) -> list[Group]:
        """`generator` is gone: the groups it held (not yet in the buffer) are re-queued."""
        out = [g for g in self.groups.values() if g.generator == generator and g.state == ADMITTED]
        for g in out:
            self.requeue(g.group_id)
        return out

    def requeue(self, gid: int) -> bool:
        """An admitted group will not reach the buffer (its generator, or its generator's engine, is gone):
        its credit comes back and its prompt goes to the front of the queue."""
        g = self.groups.get(gid)
        if g is None or g.state != ADMITTED:
            return False
        g.state = REQUEUED
        self.counts["requeued"] += 1
        self.admission.give_back(g.n)
        self.cursor.requeue(g.prompt_index)
        return True

    # ---- views ----------------------------------------------------------------------------------
    def holds(self, gid: int, generator: str) -> bool:
        """`generator` was admitted group `gid`, and it is still live."""
        g = self.groups.get(gid)
        return g is not None and g.generator == generator

    def held_by(self, generator: str) -> int:
        """Groups `generator` holds: admitted to it, not yet in the buffer."""
        return sum(g.generator == generator and g.state == ADMITTED for g in self.groups.values())

    def in_flight(self) -> list[Group]:
        """Admitted or in the buffer, not yet trained or dropped, in admission order."""
        return [g for _, g in sorted(self.groups.items()) if g.state in (ADMITTED, RECEIVED)]

    def summary(self) -> dict:
        return {**self.counts, "produced": sum(self.produced_by.values()), "dropped_by": dict(self.dropped_by),
                "in_flight": len(self.in_flight())}

    def check(self) -> None:
        """Raise AssertionError if a group or a credit went missing."""
        c = self.counts
        requeued = sum(g.state == REQUEUED for g in self.groups.values())
        assert c["requeued"] == self.requeued_before + requeued, (c, requeued)
        assert c["admitted"] == c["trained"] + c["dropped"] + c["requeued"] + len(self.in_flight()), c
        assert sum(self.dropped_by.values()) == c["dropped"], (self.dropped_by, c)
        held = self.settled + sum(g.n for g in self.groups.values() if g.state in HOLDS_CREDIT)
        assert self.admission.started == held, (self.admission.started, held)

    # ---- checkpoints ----------------------------------------------------------------------------
    def state(self) -> dict:
        return {"counts": dict(self.counts), "dropped_by": dict(self.dropped_by),
                "produced_by": dict(self.produced_by), "next_id": self.next_id,
                "in_flight": [g.prompt_index for g in self.in_flight()]}

    def restore(self, state: dict, started: int) -> list[int]:
        """Continue a checkpoint's ledger. Its groups in flight died with the old run: they count as
        re-queued, and their prompts go first, in their order. Returns those prompts."""
        in_flight = list(state["in_flight"])
        self.counts.update(state["counts"])
        self.counts["requeued"] += len(in_flight)
        self.dropped_by.update(state["dropped_by"])
        self.produced_by.update(state["produced_by"])
        self.next_id = int(state["next_id"])
        self.admission.started = self.settled = started - self.group_size * len(in_flight)
        self.requeued_before = self.counts["requeued"]
        return in_flight
