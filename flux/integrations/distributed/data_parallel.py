"""Data parallelism for the learner: M ranks under torch.distributed, each holding the whole model.

Why not DDP: DDP averages gradients and all-reduces them during every micro-batch's backward (unless
`no_sync`); models that would not fit one rank take `learner.sharding: fsdp` (fsdp.py, the same contract
over FSDP2). Flux needs one thing, exactness: a step on M ranks must equal the step one
process takes on the whole batch. So each rank holds the whole batch, computes the loss on its own rows
(split by `flux.control.composer.balance` on token count, so the ranks finish together), weights each
micro-batch loss by its share of the *whole batch's* response tokens, and after the backward passes one
SUM all-reduce of the flattened gradients hands every rank exactly the full-batch gradient. Gradient
clipping then sees the same norm everywhere and AdamW takes the same step, so the replicas stay
identical without weights ever being broadcast again (they are broadcast once, from rank 0, at start).

Control: rank 0 alone talks to the rest of Flux. `RankGroup.broadcast` hands rank 0's object (a step's
batch, or None = stop) to every rank: a doorbell key in the group's TCPStore, which the other ranks poll,
then a broadcast. While rank 0 waits for the buffer, evaluates or saves, the others are polling the
store, not blocked in a collective: they stay responsive to signals, and waiting for data never runs
into the collective timeout.

Liveness: every collective and the store have a timeout (`learner.dist_timeout_s`), so a hung rank
fails the run instead of hanging it; with gloo a dead peer fails a pending collective at once
("Connection closed by peer"), and the store lives in rank 0, so the others notice its death too.

Backends: gloo for a CPU learner; NCCL for CUDA tensors (gradients, log-probs), with a gloo side group
for Python objects (batches, stats). Rank and world size come from torch's usual environment variables
(`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), which `flux train` sets for each learner process.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from flux.control.composer import balance
from flux.learner.base import SingleRank, accumulate

BUCKET_ELEMENTS = 1 << 25  # gradients are all-reduced in flat fp32 buckets of at most this many elements
POLL_S = 0.02  # how often a waiting rank looks at the doorbell
STOP_GRACE_S = 5.0  # a signalled rank waits this long for rank 0 to say stop before it leaves alone
FAREWELL_S = 5.0  # rank 0 waits this long at exit for the other ranks to leave its store


def route_to(addr: str) -> str:
    """This machine's address on the route to `addr` (the local end of a connected UDP socket: nothing is
    sent), so that a rank's gloo sockets bind to the interface its peers reach, loopback included."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(addr), 9))
        return s.getsockname()[0]


class RankGroup(SingleRank):
    """This process's place among the learner's data-parallel ranks, and the few collectives Flux uses.

    `RankGroup()` is the single process: every method is then a no-op (or returns its input), so the
    learner's code is the same with one rank or many.
    """

    def __init__(self, rank: int = 0, world: int = 1, store: dist.Store | None = None,
                 cpu_group: dist.ProcessGroup | None = None, device: torch.device | str = "cpu",
                 group: dist.ProcessGroup | None = None):
        self.rank, self.world, self.store = rank, world, store
        self.cpu_group = cpu_group  # gloo group for Python objects (None: the default group is gloo)
        self.device = torch.device(device)
        self.group = group  # the ranks' group for tensors (None: every process; megatron: its data-parallel group)
        self._calls = 0

    # ---- setup ------------------------------------------------------------------------------------
    @classmethod
    def join(cls, rank: int, world: int, addr: str, port: int, *, device: torch.device | str = "cpu",
             timeout_s: float = 300.0) -> RankGroup:
        """Create (rank 0) or join the group's TCPStore at addr:port, then the process group.

        Every socket binds to one address: rank 0's to `addr` (127.0.0.1 under `flux train`, or the
        address other machines reach with learner.local_ranks), the others' to this machine's address on
        the route to it. Rank 0 hands the store a listening socket of its own, since TCPStore alone would
        listen on every interface. The backend follows the learner's device:
        gloo on CPU, NCCL on CUDA (plus a gloo side group for objects).
        """
        device = torch.device(device)
        if world == 1:
            return cls(device=device)
        timeout = timedelta(seconds=timeout_s)
        listen_fd = None
        if rank == 0:
            listen_fd = socket.create_server((addr, port), backlog=max(64, world)).detach()  # the store owns it
        store = dist.TCPStore(addr, port, world, is_master=rank == 0, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=listen_fd)
        gloo = dist.ProcessGroupGloo._Options()
        gloo._devices = [dist.ProcessGroupGloo.create_device(hostname=addr if rank == 0 else route_to(addr))]
        gloo._timeout = timeout
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                                timeout=timeout, pg_options=gloo if backend == "gloo" else None)
        cpu_group = None
        if backend == "nccl":
            cpu_group = dist.new_group(backend="gloo", timeout=timeout, pg_options=gloo)
        return cls(rank, world, store, cpu_group, device)

    @classmethod
    def from_env(cls, *, device: torch.device | str = "cpu", timeout_s: float = 300.0) -> RankGroup:
        """Join the group torch's environment variables describe; without WORLD_SIZE (or 1): one process."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=device)
        return cls.join(int(os.environ["RANK"]), world, os.environ.get("MASTER_ADDR", "127.0.0.1"),
                        int(os.environ["MASTER_PORT"]), device=device, timeout_s=timeout_s)

    def close(self) -> None:
        """Leave the group. Rank 0 tells the others to stop (if it has not yet: it may be leaving on an
        error) and, as it hosts the store, waits for them to leave it (a few seconds at most)."""
        if self.world == 1:
            return
        try:
            if self.rank == 0:
                self.broadcast(None)
                end = time.monotonic() + FAREWELL_S
                while self.store.add("flux/left", 0) < self.world - 1 and time.monotonic() < end:
                    time.sleep(POLL_S)
            else:
                self.store.add("flux/left", 1)
        except dist.DistError:
            pass  # rank 0 is gone already: nothing left to tell it
        try:
            dist.destroy_process_group()
        except (dist.DistError, RuntimeError):
            pass  # a broken group (a rank died): the process is leaving anyway
        self.store = None

    # ---- control: rank 0 → the others -------------------------------------------------------------
    def broadcast(self, obj, stop=None):
        """Rank 0's `obj` on every rank; the other ranks pass None. None from rank 0 means stop.

        The others wait on a store key, not in a collective (see the module docstring). `stop` is the
        caller's StopFlag: a signalled rank still waits for rank 0's word (it was most likely signalled
        too and is finishing its step), but for STOP_GRACE_S at most; then it returns None.
        """
        if self.world == 1:
            return obj
        self._calls += 1
        key = f"flux/bcast/{self._calls}"  # a few bytes per step; kept (deleting one safely needs a round trip)
        if self.rank == 0:
            self.store.set(key, "stop" if obj is None else "go")
            if obj is None:
                return None
        else:
            give_up = None
            while not self.store.check([key]):
                if stop is not None and stop.is_set():
                    give_up = give_up or time.monotonic() + STOP_GRACE_S
                    if time.monotonic() > give_up:
                        return None
                time.sleep(POLL_S)
            if self.store.get(key) == b"stop":
                return None
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.cpu_group)
        return box[0]

    # ---- training collectives ---------------------------------------------------------------------
    def rows(self, lengths: Sequence[int]) -> list[int]:
        """This rank's share of a batch's rows, balanced by token count (`lengths`, one per row)."""
        if self.world == 1:
            return list(range(len(lengths)))
        shards = balance(lengths, self.world)  # fewer rows than ranks: the last ranks get none
        return shards[self.rank] if self.rank < len(shards) else []

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Rank 0's parameters and buffers everywhere (replicas start identical, whatever their init)."""
        if self.world == 1:
            return
        with torch.no_grad():
            for t in list(module.parameters()) + list(module.buffers()):
                dist.broadcast(t.data, group=self.group, group_src=0)

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce `t` in place (SUM) and return it; a CPU tensor stays on the CPU."""
        if self.world == 1:
            return t
        if t.device == self.device:
            dist.all_reduce(t, group=self.group)
            return t
        moved = t.to(self.device)
        dist.all_reduce(moved, group=self.group)
        return t.copy_(moved.cpu())

    def all_reduce_gradients(self, params: Sequence[Tensor]) -> None:
        """Sum every parameter's gradient over the ranks, in place, in flat fp32 buckets.

        As in one process, a parameter that no rank computed a gradient for keeps `grad = None` (AdamW
        then leaves it alone); one that only some ranks did (a rank with no rows) gets the others' sum.
        """
        if self.world == 1 or not params:
            return
        flags = torch.tensor([float(p.grad is not None) for p in params], device=self.device)
        dist.all_reduce(flags, group=self.group)
        bucket: list[Tensor] = []
        size = 0
        for i, p in enumerate(params):
            bucket.append(p)
            size += p.numel()
            if size >= BUCKET_ELEMENTS or i == len(params) - 1:
                self._reduce_bucket(bucket)
                bucket, size = [], 0
        for p, has in zip(params, flags.tolist()):
            if not has:
                p.grad = None

    def _reduce_bucket(self, params: list[Tensor]) -> None:
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float()
                          .to(self.device) for p in params])
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p in params:
            chunk = flat[offset:offset + p.numel()].view_as(p).to(p.device, p.dtype)
            offset += p.numel()
            if p.grad is None:
                p.grad = chunk.clone()
            else:
                p.grad.copy_(chunk)

    def merge_stats(self, stats: dict[str, float], loss: float) -> tuple[dict[str, float], float]:
        """Each rank's share-weighted step stats and loss → the whole batch's: summed over ranks (in rank
        order, so every rank gets the same numbers); keys ending in "_max" take the max."""
        if self.world == 1:
            return stats, loss
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, (stats, loss), group=self.cpu_group)
        merged: dict[str, float] = {}
        for part, _ in gathered:
            accumulate(merged, part, 1.0)  # (each part is already weighted by its rows' share)
        return merged, sum(x for _, x in gathered)
