"""Sharded data parallelism for the torch learner: FSDP2 (`torch.distributed.fsdp.fully_shard`),
`learner.sharding: fsdp`.

Each of the M ranks keeps 1/M of every parameter, gradient and AdamW state (each decoder layer and the
root are their own FSDP units, as HF's `_no_split_modules` name them), so a model M times larger than one
rank's memory trains. The exactness contract is the replicated ranks' (data_parallel.py): a step on M
ranks equals the one-process step on the whole batch. Each rank computes the loss on its own rows,
weighted by their share of the whole batch's response tokens, and FSDP's reduce-scatter *sums* the
gradients (a divide factor of 1 with sum-only collectives; gloo has no pre-multiplied sum).

What sharding changes for the rest of the learner:
- Lockstep. Every forward pass all-gathers each unit's parameters, so every rank must run as many
  forward (and backward) passes as the others, though token-balanced rows give ranks different numbers
  of micro-batches, or none. The rank with fewer pads its list with empty micro-batches; the learner's
  loops run an idle pass for each (a two-token forward, and a backward of zero), which takes part in the
  collectives and changes nothing.
- Weights leave through collectives. `export_weights` gathers the full HF state dict on rank 0 (the CPU,
  so a model larger than one GPU can be published) and every rank must call it; so must `save`, which
  writes an HF checkpoint and the full (unsharded, name-keyed) AdamW state on rank 0: a checkpoint is
  resumed on any number of ranks. The learner actor runs these calls on every rank (`collective`).
- Evaluation on rank 0 alone uses an unsharded twin of the model holding the last exported weights (the
  weights just published), so the other ranks are not needed for it.

Mixed precision is FSDP's own: with `learner.dtype: bf16` parameters are all-gathered and computed in bf16,
gradients reduced in fp32, and the sharded master weights and AdamW state stay fp32.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from flux.integrations.distributed.data_parallel import RankGroup
from flux.learner.torch_learner import TorchCritic, TorchLearner, TrainBatch

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)  # gathered on rank 0, in CPU memory


class ShardedRanks(RankGroup):
    """The rank group as a sharded learner uses it: rows, log-probs and stats as for replicas; no weight
    broadcast at start (each rank keeps its own shard of the same checkpoint) and no gradient all-reduce
    (FSDP's reduce-scatter in backward does it)."""

    @classmethod
    def of(cls, ranks: RankGroup) -> ShardedRanks:
        return cls(ranks.rank, ranks.world, ranks.store, ranks.cpu_group, ranks.device)

    def broadcast_module(self, module: torch.nn.Module) -> None:
        """Nothing: the shards come from one checkpoint."""

    def all_reduce_gradients(self, params) -> None:
        """Nothing: FSDP summed them in backward."""


def shard(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """`model` as FSDP units: every module HF marks as unsplittable (a decoder layer), then the root.
    Gradients are summed over the ranks (not averaged: the loss weights are shares of the whole batch)."""
    layers = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
    mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) \
        if compute_dtype != torch.float32 else MixedPrecisionPolicy()
    for m in list(model.modules()):
        if type(m).__name__ in layers:
            fully_shard(m, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_force_sum_reduction_for_comms(True)
            m.set_gradient_divide_factor(1.0)
    return model


class Sharded:
    """What turns a `TorchLearner` (or the critic) into its FSDP version; see the module docstring."""

    collective = True  # export_weights and save are collectives: every rank calls them

    def __init__(self, model_path: str, *, ranks: RankGroup, **kwargs):
        self._twin: torch.nn.Module | None = None
        self._latest: dict[str, Tensor] | None = None
        super().__init__(model_path, ranks=ShardedRanks.of(ranks), **kwargs)

    # ---- the model ----------------------------------------------------------------------------------
    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        return shard(self._unsharded(path, dtype).to(self.device), self.compute_dtype)

    def _unsharded(self, path: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        return super()._load_model(path, dtype)

    def _autocast(self):
        """FSDP's mixed-precision policy casts the parameters; no autocast on top."""
        return torch.autocast(self.device.type, enabled=False)

    # ---- lockstep -------------------------------------------------------------------------------------
    def _lockstep(self, parts: list[Tensor]) -> list[Tensor]:
        """`parts` padded with empty micro-batches to the most any rank runs."""
        n = torch.tensor([len(parts)])
        dist.all_reduce(n, op=dist.ReduceOp.MAX, group=self.ranks.cpu_group)
        return list(parts) + [torch.zeros(0, dtype=torch.long)] * (int(n) - len(parts))

    def micro_batches(self, batch: TrainBatch) -> list[Tensor]:
        return self._lockstep(super().micro_batches(batch))

    def step(self, loss_fn, batch: TrainBatch, micro_batches=None, fill_proximal: bool = False):
        parts = micro_batches if micro_batches is not None else self._my_micro_batches(batch)
        return super().step(loss_fn, batch, self._lockstep(parts), fill_proximal)

    def _idle(self, model: torch.nn.Module, mb: TrainBatch) -> None:
        """A pass that takes part in the collectives and changes nothing: a two-token forward, and in a
        training loop a backward of zero."""
        ids = torch.zeros((1, 2), dtype=torch.long, device=self.device)
        dummy = TrainBatch(ids, torch.ones_like(ids), torch.tensor([[0.0, 1.0]], device=self.device),
                           torch.zeros(1, 2, device=self.device), torch.zeros(1, device=self.device), ids)
        out = self._forward(model, dummy)
        if torch.is_grad_enabled():
            (out.sum() * 0.0).backward()

    def _clip_gradients(self) -> float:
        """The norm of the whole (sharded) gradient, clipped as in one process."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.max_grad_norm if self.max_grad_norm and self.max_grad_norm > 0 else float("inf")
        if not params:
            return 0.0
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    # ---- weights and checkpoints (collectives) --------------------------------------------------------
    def export_weights(self, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """The full weights under HF names on rank 0 ({} on the others), tied tensors once. Collective."""
        full = get_model_state_dict(self.model, options=FULL)
        if self.ranks.rank != 0:
            return {}
        seen: set[int] = set()
        out = {}
        for name, t in self.model.state_dict(keep_vars=True).items():  # the first name of a tied tensor
            if id(t) not in seen:
                seen.add(id(t))
                out[name] = full[name].to(device) if device is not None else full[name]
        self._latest = out
        return out

    def eval_model(self) -> torch.nn.Module:
        """Rank 0: an unsharded fp32 twin holding the last exported weights (the base model's before any);
        `save` writes it, so a checkpoint keeps the fp32 master weights."""
        if self._twin is None:
            self._twin = self._unsharded(self.model_path).to(self.device)
            self._twin.requires_grad_(False)
        if self._latest is not None:
            self._twin.load_state_dict(self._latest, strict=False)
            self._latest = None  # loaded: later calls reuse the twin until the next export
        return self._twin

    def _savable(self):
        """(An unsharded model holding the current weights, the full AdamW state), on rank 0. Collective."""
        self.export_weights()
        optimizer = get_optimizer_state_dict(self.model, self.optimizer, options=FULL)
        return (self.eval_model() if self.ranks.rank == 0 else None), optimizer

    def save(self, path: str | Path) -> Path:
        """An HF checkpoint, the full AdamW state (by parameter name) and the trainer state, written by
        rank 0. Collective."""
        path = Path(path)
        if self.ranks.rank == 0:
            super().save(path)  # (which calls _savable, as the other ranks do here)
        else:
            self._savable()
        dist.barrier(group=self.ranks.cpu_group)
        return path

    def load(self, path: str | Path) -> dict[str, Any]:
        """Rank 0 reads the checkpoint and the AdamW state as `save` wrote them (on any number of ranks) and
        hands every rank its shards. Collective."""
        path = Path(path)
        first = self.ranks.rank == 0
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        model = self._unsharded(str(path)).state_dict() if first else {}
        set_model_state_dict(self.model, model, options=options)
        del model
        if (path / "optimizer.pt").exists():
            state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True, mmap=True) if first else {}
            set_optimizer_state_dict(self.model, self.optimizer, state, options=options)
        state_file = path / "trainer_state.json"
        trainer_state = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.step_count = int(trainer_state.get("step", 0))
        self._latest = None
        return trainer_state


class FSDPLearner(Sharded, TorchLearner):
    """`TorchLearner` with its policy (and reference model) sharded over the ranks."""


class FSDPCritic(Sharded, TorchCritic):
    """The critic (PPO), sharded like the policy."""

    def export_weights(self, device=None) -> dict[str, Tensor]:
        full = get_model_state_dict(self.model, options=FULL)  # (for `save`: never published)
        self._latest = full if self.ranks.rank == 0 else None
        return self._latest or {}
