"""Threads that follow who computes: the cores of one host shared by the run's local compute actors.

In the overlapped modes (async, adaptive) the learner and the generators run at once, so each starts
with its share of the cores (`flux.run.runtime.actor_threads`: on 2 cores, one thread each). But they
do not always compute at once: at a low async ratio the generator mostly waits for the learner's next
version and the learner for its next batch, and a static split leaves a core idle in every such wait
(the phase that runs alone is 1.3-1.5x slower on one core than on two). A static "every core each"
instead oversubscribes whenever they overlap: on 2 cores a 2-thread learner beside a 1-thread generator
ran 3.4x slower.

`CoreShare`: each learner rank and generator on the host owns one byte of a file in the run's socket
directory, 1 while it computes (`working(True)`: a batch being trained, sequences being decoded), 0 while
it waits. Before every linear layer's forward and backward (`follow(model)`) an actor with automatic
threads takes cores // (actors computing): the phase that runs alone has every core, and the moment
another starts both narrow, within one layer. Switching costs nothing measurable (a training step that
toggles 1 <-> 2 threads at every layer runs at the mean of the two speeds).

It needs a short OpenMP spin (`flux.run.runtime.OMP_SPIN`): with GNU OpenMP's default the idle actor's
worker thread went on spinning on the core the other had just been given, and sharing lost 5-15 %;
with it the default adaptive run gained 23 % and async η 1 3 % (bench/results/core_share_ab.json).
Not used in sync mode (the phases take turns, and each already has every core), for a model not on the
CPU, for an actor with a fixed thread count (it still marks when it computes, so the others leave it its
cores), or without a socket directory (a remote generator: its host is its own).

Known limits: an actor killed while computing leaves its byte at 1 (the others then keep to their
static share, as before this existed, until a restarted actor of that name clears it); an actor with a
fixed thread count counts as one share whatever its count; cores // n leaves the remainder idle
(3 actors computing on 4 cores get one thread each).
"""

from __future__ import annotations

import mmap
import os

from flux.run.runtime import host_cores


class CoreShare:
    def __init__(self, spec, role: str, name: str):
        cfg = spec.config
        ranks, digits = cfg.learner.ranks, name[len(name.rstrip("0123456789")):]
        self.slot = (0 if role == "learner" else ranks) + int(digits or 0)
        self.size = ranks + cfg.rollout.num_generators
        self.path = f"{spec.socket_dir}/cores" if spec.socket_dir and cfg.adaptive_async.mode != "sync" else ""
        self.fixed = bool(cfg.learner.threads if role == "learner" else cfg.rollout.threads)
        self.cores = host_cores()
        self.mem, self.threads = None, 0

    def follow(self, model) -> None:
        """Take part, for a torch model on the CPU (anything else: not): re-fit before each linear layer's
        forward and, through a hook on its output, its backward."""
        import torch

        if not (self.path and self.slot < self.size and isinstance(model, torch.nn.Module)
                and next(model.parameters()).device.type == "cpu"):
            return
        with open(self.path, "a+b") as f:  # whoever comes first creates it: one byte per actor
            if os.fstat(f.fileno()).st_size < self.size:
                f.truncate(self.size)
            self.mem = mmap.mmap(f.fileno(), self.size)

        def after(_module, _inputs, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(self.fit)

        for m in () if self.fixed else model.modules():
            if isinstance(m, torch.nn.Linear):
                m.register_forward_pre_hook(self.fit)
                m.register_forward_hook(after)

    def working(self, on: bool) -> None:
        if self.mem is not None:
            self.mem[self.slot] = int(on)
            if on:
                self.fit()

    def fit(self, *_) -> None:
        """Take cores // (actors computing now) threads (returns None: a hook that changes nothing)."""
        if not self.fixed and (n := max(1, self.cores // max(1, sum(self.mem[:])))) != self.threads:
            import torch

            torch.set_num_threads(n)
            self.threads = n
