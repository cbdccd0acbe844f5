"""The learner interface and what its backends share: `Learner` (the one surface the learner actor uses,
with the micro-batched step, log-probs and data parallelism written once), the rank group a learner
trains in, and the one micro-batch splitter. Backends (`TorchLearner` in torch_learner.py, megatron-core
in flux/integrations/megatron/learner.py) implement loading, the forward pass, weights and checkpoints.

`SingleRank` is one learner process: the interface the torch learner calls for data parallelism, where
every collective is a no-op (or returns its input), so the learner's code is the same with one rank or
many. `learner.ranks > 1` swaps in the distributed integration's `RankGroup`
(flux/integrations/distributed/data_parallel.py), which implements the same methods over
torch.distributed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from flux.control.composer import balance

if TYPE_CHECKING:
    from flux.learner.torch_learner import TrainBatch

LossFn = Callable[..., tuple[Tensor, dict[str, float]]]


def micro_batches(lengths: Sequence[int], *, size: int = 0, tokens: int = 0, pairs: bool = False,
                  rank: int = 0, ranks: int = 1) -> list[list[int]] | None:
    """How a batch of rows (`lengths`: tokens per row) splits into micro-batches: lists of row indices.

    - `ranks` > 1: the rows are first shared across the ranks by token count (so the ranks finish
      together) and this `rank`'s share is split; a rank may get none (`[]`).
    - `tokens`: micro-batches of at most that many *padded* tokens (rows × longest row), packed
      longest-first, so rows of similar length share one and a long tail does not pad every row to it.
    - else `size`: about `size` rows each, with near-equal token counts.
    - neither (or `size` ≥ the rows): one micro-batch; with one rank, None ("the whole batch").
    With `pairs`, rows (2i, 2i+1) are a preference pair and always land in the same micro-batch.
    """
    units = [[2 * i, 2 * i + 1] for i in range(len(lengths) // 2)] if pairs else [[i] for i in range(len(lengths))]
    cost = [sum(int(lengths[r]) for r in u) for u in units]
    if ranks > 1:
        shards = balance(cost, ranks)
        mine = shards[rank] if rank < len(shards) else []
        units, cost = [units[u] for u in mine], [cost[u] for u in mine]
        if not units:
            return []
    rows = sum(len(u) for u in units)
    if tokens:
        widths = [max(int(lengths[r]) for r in u) for u in units]
        parts: list[list[int]] = [[]]
        longest = 0
        for u in sorted(range(len(units)), key=lambda u: -widths[u]):
            width = widths[u]
            if parts[-1] and max(longest, width) * (len(parts[-1]) + len(units[u])) > tokens:
                parts.append([])
                longest = 0
            parts[-1] += units[u]
            longest = max(longest, width)
        return [sorted(p) for p in parts]
    if ranks == 1 and (not size or size >= rows):
        return None
    groups = balance(cost, math.ceil(rows / max(2 if pairs else 1, size or rows)))
    return [[r for u in g for r in units[u]] for g in groups]


def accumulate(acc: dict[str, float], stats: dict[str, float], share: float) -> None:
    """Add a micro-batch's `stats`, weighted by its `share` of the batch, into `acc` ("_max" keys: max)."""
    for k, v in stats.items():
        acc[k] = max(acc.get(k, v), v) if k.endswith("_max") else acc.get(k, 0.0) + v * share


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


def decay_groups(model: torch.nn.Module, weight_decay: float, no_decay: tuple[str, ...]) -> list[dict]:
    """AdamW parameter groups: weight decay on every trainable matrix, none on 1-D parameters (biases and
    norm weights, which HF's Trainer and megatron-core exclude too) or on those whose name contains one of
    `no_decay` (case-insensitive)."""
    keys = [k.lower() for k in no_decay]
    decay, plain = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (plain if p.ndim < 2 or any(k in name.lower() for k in keys) else decay).append(p)
    return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0})
            if g["params"]]


class Learner:
    """A policy trained with AdamW, micro-batched gradient accumulation, optionally data parallel.

    The surface the learner actor uses: `logprobs`, `ref_logprobs`, `step`, `micro_batches`,
    `export_weights`, `eval_model`, `save`/`load`, and the `optimizer` (for the learning-rate schedule).
    A backend implements `_load_model` (the policy module), `_forward` (per-token log-probs of a
    micro-batch), `export_weights` (HF names and layouts), `eval_model`, `save` and `load`.
    """

    def __init__(self, model_path: str, *, lr: float = 1e-4, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.99), eps: float = 1e-8,
                 no_decay: tuple[str, ...] = ("bias", "norm"), max_grad_norm: float | None = 1.0,
                 micro_batch_size: int | None = None, micro_batch_tokens: int | None = None,
                 temperature: float = 1.0, reference: bool = False, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 compute_dtype: torch.dtype = torch.float32, ranks: SingleRank | None = None):
        torch.manual_seed(seed)
        self.ranks = ranks or SingleRank()
        self.model_path = str(model_path)
        self.device = torch.device(device)
        self.compute_dtype = compute_dtype  # below the weights' dtype: forward passes run under autocast
        self.max_grad_norm = max_grad_norm
        self.micro_batch_size = micro_batch_size
        self.micro_batch_tokens = micro_batch_tokens
        self.temperature = temperature
        self.seed = seed
        self.step_count = 0
        self.model = self._load_model(self.model_path, dtype).to(self.device)
        self.model.train()  # RL fine-tuning configs keep dropout at 0, so train mode is deterministic
        self.ref_model = None
        if reference:
            self.ref_model = self._load_model(self.model_path, dtype).to(self.device).eval()
            self.ref_model.requires_grad_(False)
        def adamw(**kw):  # fresh parameter groups each time: a failed constructor has written into its own
            return torch.optim.AdamW(decay_groups(self.model, weight_decay, no_decay), lr=lr, betas=betas,
                                     eps=eps, **kw)

        try:  # one fused kernel for every parameter (CPU from torch 2.4, CUDA) instead of a loop over tensors
            self.optimizer = adamw(fused=True)
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = adamw()
        self.ranks.broadcast_module(self.model)
        if self.ref_model is not None:
            self.ranks.broadcast_module(self.ref_model)

    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        raise NotImplementedError

    def _forward(self, model: torch.nn.Module, mb: TrainBatch) -> Tensor:
        """Per-token log-probs of the micro-batch's response tokens (with grad when training)."""
        raise NotImplementedError

    def export_weights(self, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """The policy's weights under HF names and layouts (what engines load)."""
        raise NotImplementedError

    def eval_model(self) -> torch.nn.Module:
        """An HF causal LM holding the current weights, for evaluation with `TorchEngine`."""
        raise NotImplementedError

    def save(self, path: str | Path) -> Path:
        raise NotImplementedError

    def load(self, path: str | Path) -> dict[str, Any]:
        raise NotImplementedError

    # ---- micro-batches ----------------------------------------------------------------------------
    def micro_batches(self, batch: TrainBatch) -> list[Tensor]:
        """Row-index tensors that partition the batch according to the micro-batch setting
        (flux.learner.base.micro_batches)."""
        parts = micro_batches(batch.attention_mask.sum(-1).tolist(), size=self.micro_batch_size or 0,
                              tokens=self.micro_batch_tokens or 0)
        rows = [list(range(len(batch)))] if parts is None else parts
        return [torch.tensor(r, dtype=torch.long) for r in rows if r]

    @staticmethod
    def _trimmed(batch: TrainBatch, rows: slice | Tensor) -> tuple[TrainBatch, slice]:
        """Rows `rows` without the columns that are padding in all of them, and the kept column range."""
        mb = batch.select(rows)
        used = mb.attention_mask.any(0).nonzero()
        cols = slice(int(used[0]), int(used[-1]) + 1) if used.numel() else slice(0, 0)
        return mb.select(slice(None), cols), cols

    def _my_rows(self, batch: TrainBatch) -> Tensor:
        """The rows this rank computes (all of them in one process), balanced by token count."""
        return torch.tensor(self.ranks.rows(batch.attention_mask.sum(-1).tolist()), dtype=torch.long)

    def _logprobs_with(self, model: torch.nn.Module, batch: TrainBatch) -> Tensor:
        out = torch.zeros(batch.input_ids.shape, dtype=torch.float32)
        mine = self._my_rows(batch)
        sub = batch.select(mine) if self.ranks.world > 1 else batch
        with torch.no_grad():
            for rows in self.micro_batches(sub):
                mb, cols = self._trimmed(sub, rows)
                if mb.input_ids.shape[1] == 0:
                    self._idle(model, mb)
                    continue
                mb = mb.to(self.device)
                with self._autocast():
                    lp = self._forward(model, mb)
                out[mine[rows], cols] = lp.cpu()
        # Each row comes from exactly one rank and is 0 on the others: the sum is exact.
        return self.ranks.sum_(out).to(batch.input_ids.device)

    def logprobs(self, batch: TrainBatch) -> Tensor:
        """Current policy's per-token log-probs, no grad. Shape: (b, L) float32, 0 outside the response."""
        return self._logprobs_with(self.model, batch)

    def ref_logprobs(self, batch: TrainBatch) -> Tensor:
        """Reference policy's per-token log-probs. Shape: (b, L) float32. Needs `reference=True`."""
        if self.ref_model is None:
            raise RuntimeError("TorchLearner was built with reference=False")
        return self._logprobs_with(self.ref_model, batch)

    # ---- training ---------------------------------------------------------------------------------
    def step(self, loss_fn: LossFn, batch: TrainBatch, micro_batches: list[slice | Tensor] | None = None,
             fill_proximal: bool = False) -> dict[str, float]:
        """One optimizer step over `batch`, accumulating gradients over micro-batches.

        `fill_proximal`: the batch has no proximal log-probs yet. Before this step's update the policy
        *is* the proximal policy, so each micro-batch's forward pass gives them too (detached): the loss
        sees them, and `batch.proximal_logprobs` holds them afterwards — one forward pass fewer than
        `logprobs()` followed by `step()`, with the same result.

        With data parallelism `batch` is the whole batch on every rank and `micro_batches` this rank's
        (row indices into `batch`); the weights below are shares of the whole batch, and the gradients
        are summed over the ranks before clipping.

        For each micro-batch `loss, stats = loss_fn(logprobs=..., mask=..., batch=mb)`, where logprobs
        (with grad) and mask are (b_mb, L_mb) and mb is the micro-batch's `TrainBatch`. Each micro-batch
        loss is weighted by its share of the batch's response tokens before backward: for a token-mean
        loss the accumulated gradient then equals the gradient of one full-batch pass, whatever the
        split. (Sequence-level aggregations are weighted the same way, which is close but not exact.)

        Returns the stats averaged with the same weights (keys ending in "_max": the max), plus loss,
        grad_norm (before clipping), lr and step_skipped (1.0 when the gradient was not finite and the
        update was dropped).
        """
        self.model.train()
        self._zero_grad()
        parts = micro_batches if micro_batches is not None else self._my_micro_batches(batch)
        total = float(batch.response_mask.sum())
        acc: dict[str, float] = {}
        loss_sum = 0.0
        proximal = torch.zeros(batch.input_ids.shape, dtype=torch.float32) if fill_proximal else None
        for rows in parts:
            mb, cols = self._trimmed(batch, rows)
            n_tok = float(mb.response_mask.sum())
            if n_tok == 0:
                self._idle(self.model, mb)
                continue
            mb = mb.to(self.device)
            share = n_tok / total
            with self._autocast():
                lp = self._forward(self.model, mb)
            if proximal is not None:
                mb.proximal_logprobs = lp.detach()
                proximal[rows, cols] = mb.proximal_logprobs.float().cpu()
            loss, stats = loss_fn(logprobs=lp, mask=mb.response_mask, batch=mb)
            (loss * share).backward()
            loss_sum += float(loss.detach()) * share
            accumulate(acc, stats, share)
        if proximal is not None:  # each row came from one rank, 0 on the others: the sum is exact
            batch.proximal_logprobs = self.ranks.sum_(proximal).to(batch.input_ids.device)
        return self._finish_step(acc, loss_sum)

    def _finish_step(self, acc: dict[str, float], loss_sum: float) -> dict[str, float]:
        """After the backward passes: gradients summed over the ranks, stats merged, clip, AdamW step."""
        self.ranks.all_reduce_gradients([p for p in self.model.parameters() if p.requires_grad])
        acc, loss_sum = self.ranks.merge_stats(acc, loss_sum)
        grad_norm = self._clip_gradients()
        skipped = not torch.isfinite(torch.tensor(grad_norm))
        if skipped:
            self._zero_grad()
        else:
            self.optimizer.step()
            self.step_count += 1
        return {**acc, "loss": loss_sum, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"],
                "step_skipped": float(skipped)}

    def _autocast(self):
        """Mixed precision for a forward pass: matmuls in compute_dtype, the weights as they are."""
        weights = next(self.model.parameters()).dtype
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=self.compute_dtype != weights)

    def _idle(self, model: torch.nn.Module, mb: TrainBatch) -> None:
        """What a micro-batch without tokens costs: nothing (a sharded learner runs a pass that takes part
        in its collectives, flux/integrations/distributed/fsdp.py)."""

    def _my_micro_batches(self, batch: TrainBatch) -> list[Tensor]:
        if self.ranks.world == 1:
            return self.micro_batches(batch)
        mine = self._my_rows(batch)
        return [mine[rows] for rows in self.micro_batches(batch.select(mine))]

    def _zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _clip_gradients(self) -> float:
        """Clip the gradients to max_grad_norm; return their norm before clipping."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.max_grad_norm if self.max_grad_norm and self.max_grad_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, clip)) if params else 0.0
