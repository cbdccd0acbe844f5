"""What the learner backends share: the rank group a learner trains in.

`SingleRank` is one learner process: the interface the torch learner calls for data parallelism, where
every collective is a no-op (or returns its input), so the learner's code is the same with one rank or
many. `learner.ranks > 1` swaps in the distributed integration's `RankGroup`
(flux/integrations/distributed/data_parallel.py), which implements the same methods over
torch.distributed.
"""

from __future__ import annotations

from collections.abc import Sequence


class SingleRank:
    """Rank 0 of a world of 1."""

    rank, world = 0, 1

    def close(self) -> None:
        """Leave the group (nothing to leave)."""

    def broadcast(self, obj, stop=None):
        """Rank 0's `obj` on every rank: here, `obj`."""
        return obj

    def rows(self, lengths: Sequence[int]) -> list[int]:
        """This rank's share of a batch's rows: all of them."""
        return list(range(len(lengths)))

    def broadcast_module(self, module) -> None:
        """Rank 0's parameters everywhere: they are."""

    def sum_(self, t):
        """`t` summed over the ranks, in place: `t`."""
        return t

    def all_reduce_gradients(self, params) -> None:
        """Gradients summed over the ranks: they are."""

    def merge_stats(self, stats: dict[str, float], loss: float) -> tuple[dict[str, float], float]:
        """The whole batch's stats: this rank's."""
        return stats, loss
