"""Admission credits: the actuator of adaptive asynchrony (docs/concepts.md, "Admission"), and the data cursor.

A generator must hold a credit to start a prompt group. With B samples per optimizer step, policy
version v, async ratio a and largest lead η_max (steps), a group of n samples is admitted only while

    started + n ≤ (v + 1 + L) · B,      L = a · η_max rounded to the nearest whole step

where `started` counts every sample admitted so far that was not given back: samples that end dropped
(too stale, zero-variance) or re-queued (their generator died) return their credit, so the learner
can always get a full batch. a = 0 is strictly synchronous: the batch for step v+1 is admitted only
after version v+1 exists. The lead is whole steps because a batch is cheapest made in one wave: a decode
step costs nearly the same for half the rows, so half a step of lead overlapped nothing measurable
(bench/results/whole_step_leads.json). The spectrum stays continuous in time: the controller moves a
every step, and the share of steps spent at each lead sets the mean lag.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import random
from collections import deque
from dataclasses import dataclass, field


@dataclass
class Admission:
    batch_samples: int
    eta_max: int
    async_ratio: float = 0.0
    version: int = 0
    started: int = 0

    def bound(self) -> int:
        """Most samples that may have been started at the current version and ratio."""
        return (self.version + 1 + self.lead()) * self.batch_samples

    def lead(self) -> int:
        """Steps generation may run ahead: a · η_max to the nearest whole step (a batch in one wave)."""
        return math.floor(self.async_ratio * self.eta_max + 0.5)

    def room(self) -> int:
        """Samples that may still be started now."""
        return self.bound() - self.started

    def try_admit(self, n: int) -> bool:
        if n <= self.room():
            self.started += n
            return True
        return False

    def give_back(self, n: int) -> None:
        """Credit returned: the samples were dropped or will be re-queued."""
        self.started -= n
        assert self.started >= 0, "gave back more credit than was admitted"

    def charge(self, n: int) -> None:
        """Credit taken again without asking: samples given back earlier turned out to be used after all."""
        self.started += n


def admission_token(secret: str, group_id: int, generator: str, prompt_index: int, n: int) -> str:
    """What proves a pushed group was admitted: an HMAC, under the run's secret, of the group id, its
    generator, prompt and sample count. The buffer recomputes it, so a peer can push only what it was
    given (and a remote generator, which never sees the secret, cannot forge one)."""
    text = f"{group_id}:{generator}:{prompt_index}:{n}".encode()
    return hmac.new(secret.encode(), text, hashlib.sha256).hexdigest()[:32]


@dataclass
class PromptCursor:
    """Which prompt comes next: an epoch-wise seeded shuffle, with re-queued prompts served first."""

    num_prompts: int
    seed: int
    epoch: int = 0
    position: int = 0
    requeued: deque = field(default_factory=deque)

    def __post_init__(self):
        self.requeued = deque(self.requeued)
        self._order = self._shuffle(self.epoch)

    def _shuffle(self, epoch: int) -> list[int]:
        order = list(range(self.num_prompts))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def next(self) -> int:
        if self.requeued:
            return self.requeued.popleft()
        if self.position == self.num_prompts:
            self.epoch, self.position = self.epoch + 1, 0
            self._order = self._shuffle(self.epoch)
        self.position += 1
        return self._order[self.position - 1]

    def requeue(self, prompt_index: int) -> None:
        self.requeued.append(prompt_index)

    def state(self) -> dict:
        return {"num_prompts": self.num_prompts, "seed": self.seed, "epoch": self.epoch,
                "position": self.position, "requeued": list(self.requeued)}

    @classmethod
    def from_state(cls, state: dict, first: list[int] = ()) -> "PromptCursor":
        """The cursor of `state()`, with the prompts `first` served before its own re-queued ones."""
        return cls(state["num_prompts"], state["seed"], state["epoch"], state["position"],
                   deque([*first, *state["requeued"]]))
