"""The smart batch composer (docs/concepts.md, "The batch composer"): whole groups, freshest first, stale ones dropped.

Pure bookkeeping over `TrajectoryGroup`s, no sockets: the buffer actor feeds it and serves batches.
"""

from __future__ import annotations

import hmac
import itertools

import numpy as np


class Composer:
    """Holds whole prompt groups and composes batches of them.

    - A group whose newest token is more than `eta_max` versions behind the version it would be
      trained at has nothing left to train on: it is dropped and counted (`dropped_stale`). The
      off-policy correction is only trusted up to that lag, so the learner masks out every older token
      of the groups it trains (`to_train_batch`): a long completion that spans several versions keeps
      its fresh tokens instead of being dropped whole (with continuous batching, short groups finish
      first, and dropping by the oldest token would bias training against long completions).
    - With `skip_zero_variance` (DAPO dynamic sampling), a group whose rewards are all equal carries no
      GRPO/RLOO signal: it is dropped on arrival and counted (`dropped_zero_variance`); giving its
      credit back makes the controller admit a replacement.
    - Batches take the freshest groups first (highest mean token version, then arrival order), with
      one exception: a group that is still usable now but would be too stale at the next version goes
      before all others. Otherwise a steady inflow of fresher groups keeps it waiting until it is
      dropped, and the generator time spent on it is lost (in `async` mode, a third of all samples
      on the built-in workload).
    """

    def __init__(self, eta_max: int, skip_zero_variance: bool = False):
        self.eta_max = eta_max
        self.skip_zero_variance = skip_zero_variance
        self.groups: list[tuple[float, int, object]] = []
        self._arrival = itertools.count()
        self._dropped: dict[str, list[int]] = {}
        self.dropped_stale = 0
        self.dropped_zero_variance = 0
        self.dropped_lengths: dict[str, int] = {}  # completion-length histogram of dropped samples

    @property
    def depth(self) -> int:
        return len(self.groups)

    def drop(self, group_id: int, reason: str, group=None) -> None:
        self._dropped.setdefault(reason, []).append(group_id)
        if group is not None:  # which lengths are dropped (a long tail must not be starved unseen)
            add_lengths(self.dropped_lengths, group.response_lens)

    def add(self, group) -> None:
        if self.skip_zero_variance and group.sample_count > 1 and np.ptp(group.rewards) == 0:
            self.dropped_zero_variance += 1
            self.drop(group.group_id, "zero_variance", group)
            return
        self.groups.append((float(group.versions.mean()), next(self._arrival), group))

    def take(self, k: int, version: int):
        """k whole groups for training at `version`, or None if fewer than k usable groups are held.

        A group with a token sampled by a version newer than `version` (the learner's own) cannot be real:
        it is dropped as `future_version` (a lag below 0 would read as perfectly fresh)."""
        fresh = []
        for item in self.groups:
            versions = item[2].versions
            if version - int(versions.max()) > self.eta_max:
                self.dropped_stale += 1
                self.drop(item[2].group_id, "stale", item[2])
            elif len(versions) and int(versions.max()) > version:
                self.drop(item[2].group_id, "future_version")
            else:
                fresh.append(item)
        self.groups = fresh
        if len(fresh) < k:
            return None
        # Expiring first (their last chance), then freshest, then arrival order.
        fresh.sort(key=lambda it: (version + 1 - int(it[2].versions.min()) <= self.eta_max, -it[0], it[1]))
        chosen, self.groups = fresh[:k], fresh[k:]
        return [it[2] for it in chosen]

    def pop_dropped(self) -> dict[str, list[int]]:
        """{reason: ids} of the groups dropped since the last call (each reported exactly once)."""
        out, self._dropped = self._dropped, {}
        return out

    def stats(self) -> dict:
        return {"depth": self.depth, "dropped_stale": self.dropped_stale,
                "dropped_zero_variance": self.dropped_zero_variance, "dropped_lengths": dict(self.dropped_lengths)}


def length_bucket(n: int) -> str:
    """A completion length's power-of-two bucket: 1 → "1", 2..3 → "2-3", 4..7 → "4-7", ..."""
    lo = 1 << max(0, int(n).bit_length() - 1)
    return str(lo) if lo == 1 or n == 0 else f"{lo}-{2 * lo - 1}"


def add_lengths(hist: dict[str, int], lengths) -> dict[str, int]:
    """Count `lengths` into the histogram `hist` (in place, and returned)."""
    n = np.asarray(lengths, np.int64).reshape(-1)
    # frexp's exponent of n > 0 is its bit length: one bucket per exponent.
    for bits, count in zip(*np.unique(np.frexp(n.astype(np.float64))[1], return_counts=True)):
        b = length_bucket(1 << (int(bits) - 1) if bits > 0 else 0)
        hist[b] = hist.get(b, 0) + int(count)
    return hist


WINDOW = 16384  # admissions the buffer remembers ids for (far more than any legitimate lateness)


class Gate:
    """The buffer's door: a group gets in only if it was admitted, once, and its tokens fit the model.

    `check` returns "" (let in), a message-level reason (`not_admitted`, `duplicate_group`: counted as a
    dropped message, nothing was admitted), or `bad_tokens` (admitted, but unusable: the group is dropped
    and its credit comes back). Group ids are issued in increasing order, so the door remembers only the
    newest `window` ids it let in; an id older than those counts as a duplicate (a group that late would
    be far too stale to train anyway). Forgetting goes by count, not by id, so no single id, however
    large, makes the door forget the ids of groups still in flight.
    """

    def __init__(self, secret: str, vocab_size: int, window: int = WINDOW):
        self.secret, self.vocab_size, self.window = secret, vocab_size, window
        self.seen: set[int] = set()
        self.floor = 0  # ids below it are refused: older than the oldest id remembered

    def check(self, group) -> str:
        from flux.control.admission import admission_token

        want = admission_token(self.secret, group.group_id, group.generator, group.prompt_index, group.sample_count)
        if not hmac.compare_digest(want, group.token):
            return "not_admitted"
        if group.group_id in self.seen or group.group_id < self.floor:
            return "duplicate_group"
        self.seen.add(group.group_id)
        if len(self.seen) > self.window:  # forget the oldest half now and then: memory stays bounded
            keep = sorted(self.seen)[len(self.seen) // 2:]
            self.floor, self.seen = keep[0], set(keep)
        if self.vocab_size and max(int(group.prompt_ids.max()), int(group.response_ids.max(initial=0))) >= self.vocab_size:
            return "bad_tokens"
        return ""


def balance(lengths, parts: int) -> list[list[int]]:
    """Split sample indices into `parts` lists of near-equal total token count (longest first, greedy).

    Used for micro-batches and learner ranks, so they finish together. Shape: lengths (N,).
    """
    bins: list[list[int]] = [[] for _ in range(max(1, parts))]
    load = [0] * len(bins)
    for i in sorted(range(len(lengths)), key=lambda i: -int(lengths[i])):
        j = load.index(min(load))
        bins[j].append(i)
        load[j] += int(lengths[i])
    return [sorted(b) for b in bins if b]
