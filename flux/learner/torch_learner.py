"""The plain-PyTorch training backend: an HF causal LM, AdamW, micro-batched gradient accumulation.

One device per process. `logprobs`, `step`, `export_weights`, `save`/`load` are the whole surface the
learner actor uses. With `ranks` (a `RankGroup` of several processes) the learner is one replica of a
data-parallel group: log-probs and gradients are computed on this rank's rows and summed over the ranks
(flux/integrations/distributed/data_parallel.py explains why that is exact).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flux.hf import from_pretrained as _from_pretrained
from flux.learner.base import Learner, LossFn

# Files a tokenizer may consist of; copied next to a checkpoint so it is self-contained.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json")

@dataclass
class TrainBatch:
    """A padded batch of prompt+response sequences. All (b, L) fields are aligned to token positions.

    input_ids (b, L) long; attention_mask (b, L) long; response_mask (b, L) float, 1 on generated tokens;
    behaviour_logprobs (b, L) float32, the sampler's log-prob of each token (0 outside the response);
    advantages (b,) or (b, L) float32; versions (b, L) long, the policy version that sampled each token
    (-1 outside the response); ref_logprobs / proximal_logprobs (b, L) float32 or None; values / returns
    (b, L) float32 or None: the critic's values at the start of the step and its targets (actor-critic).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    behaviour_logprobs: Tensor
    advantages: Tensor
    versions: Tensor
    ref_logprobs: Tensor | None = None
    proximal_logprobs: Tensor | None = None
    values: Tensor | None = None
    returns: Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_tokens(self) -> int:
        """Number of response tokens (the ones the loss counts)."""
        return int(self.response_mask.sum().item())

    @classmethod
    def from_samples(cls, samples: Sequence[tuple[Any, Any, Any, Any, Any]], pad_id: int) -> TrainBatch:
        """Right-pad `(prompt_ids, response_ids, behaviour_logprobs, versions, advantage)` tuples.

        behaviour_logprobs and versions have one entry per response token; advantage is a float (one per
        sequence → advantages (b,)) or one value per response token (→ advantages (b, L)).
        """
        b = len(samples)
        p, r, lp, v = ([np.asarray(s[k]).reshape(-1) for s in samples] for k in range(4))
        n_p, n_r, n_lp, n_v = (np.array([len(x) for x in xs], np.int64) for xs in (p, r, lp, v))
        for i in np.flatnonzero((n_lp != n_r) | (n_v != n_r))[:1]:
            raise ValueError(f"sample {i}: {n_r[i]} response tokens, {n_lp[i]} logprobs, {n_v[i]} versions")
        width = int((n_p + n_r).max()) if b else 0
        # Flat positions row·width + column of every prompt token (at_p) and every response token (at_r).
        at_p, at_r = (np.repeat(np.arange(b) * width + off, n) + np.arange(n.sum())
                      - np.repeat(n.cumsum() - n, n) for off, n in ((0, n_p), (n_p, n_r)))

        def fill(value, dtype, at, parts):
            out = np.full(b * width, value, dtype)
            out[at] = np.concatenate(parts) if len(at) else []
            return torch.from_numpy(out.reshape(b, width))

        every = np.concatenate([at_p, at_r])
        ids, attn = fill(pad_id, np.int64, every, [*p, *r]), fill(0, np.int64, every, [np.ones(len(every))])
        resp, blp, ver = fill(0, np.float32, at_r, [np.ones(len(at_r))]), fill(0, np.float32, at_r, lp), \
            fill(-1, np.int64, at_r, v)
        adv_in = [np.asarray(s[4], np.float32) for s in samples]
        if any(a.ndim > 0 for a in adv_in):  # one advantage per response token
            adv = fill(0, np.float32, at_r, [np.broadcast_to(a, (n,)) for a, n in zip(adv_in, n_r)])
        else:
            adv = torch.from_numpy(np.array(adv_in, np.float32).reshape(b))
        return cls(ids, attn, resp, blp, adv, ver)

    def select(self, rows: slice | Tensor, cols: slice = slice(None)) -> TrainBatch:
        """The sub-batch of `rows`, keeping the (b, L) fields' columns `cols`."""
        def take(x: Tensor | None, per_token: bool = True) -> Tensor | None:
            if x is None:
                return None
            x = x[rows]
            return x[:, cols] if per_token and x.dim() == 2 else x
        return replace(self, **{f.name: take(getattr(self, f.name)) for f in fields(self)})

    def to(self, device: torch.device | str) -> TrainBatch:
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return replace(self, **{k: (None if v is None else v.to(device)) for k, v in moved.items()})


def token_logprobs(model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, response_mask: Tensor,
                   temperature: float = 1.0) -> Tensor:
    """log p(input_ids[:, t] | input_ids[:, <t]) at position t; 0 at position 0 and outside the response.

    The logits are divided by the sampling temperature so the value matches what the sampler computed.
    Positions come from the attention mask, so left padding gives the same values as right padding.

    Shape: input_ids, attention_mask, response_mask (b, L) → (b, L) float32.
    """
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits
    logits = logits[:, :-1].float() / temperature
    targets = input_ids[:, 1:, None]
    # gather − logsumexp instead of log_softmax: no second (b, L, V) tensor kept for backward.
    lp = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    lp = F.pad(lp, (1, 0))
    return torch.where(response_mask > 0, lp, torch.zeros_like(lp))


class TorchLearner(Learner):
    """An HF causal LM trained with AdamW on one device (the `Learner` of flux/learner/base.py).

    Micro-batches (for `logprobs` and the default of `step`) hold at most `micro_batch_size` sequences,
    or, with `micro_batch_tokens`, at most that many padded tokens (rows × longest row), packed
    longest-first so similar lengths share a micro-batch. Neither: the whole batch at once.

    Data parallel (`ranks` with world > 1): every rank builds the learner with the same arguments and
    calls the same methods on the same whole batch, in the same order. Weights start as rank 0's;
    `logprobs` computes this rank's rows and returns the whole batch's; `step` trains on this rank's
    micro-batches (default: its share of the rows, balanced by token count) and every rank ends with the
    single-process full-batch step. Saving is the caller's choice (one rank is enough: replicas are equal).
    """

    def __init__(self, model_path: str, *, gradient_checkpointing: bool = False, **kwargs):
        super().__init__(model_path, **kwargs)
        if gradient_checkpointing:  # renamed in transformers 5
            enable = getattr(self.model, "activation_checkpointing_enable", None)
            (enable or self.model.gradient_checkpointing_enable)()

    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        return _from_pretrained(path, dtype)

    def _forward(self, model: torch.nn.Module, mb: TrainBatch) -> Tensor:
        return token_logprobs(model, mb.input_ids, mb.attention_mask, mb.response_mask, self.temperature)

    # ---- weights and checkpoints ------------------------------------------------------------------
    def export_weights(self, device: str | torch.device | None = None) -> dict[str, Tensor]:
        """The model's weights under their HF names, detached, contiguous, on `device` (default: the model's).

        Tied tensors (e.g. lm_head.weight = model.embed_tokens.weight) appear once, under the first key
        of `state_dict()`, which is the key `save_pretrained` writes.
        """
        out: dict[str, Tensor] = {}
        seen: set[tuple[int, int]] = set()
        for name, t in self.model.state_dict().items():
            key = (t.untyped_storage().data_ptr(), t.storage_offset())
            if key in seen:
                continue
            seen.add(key)
            t = t.detach()
            out[name] = (t.to(device) if device is not None else t).contiguous()
        return out

    def eval_model(self) -> torch.nn.Module:
        """An HF causal LM holding the current weights, for evaluation with `TorchEngine`: the model itself."""
        return self.model

    def save(self, path: str | Path) -> Path:
        """HF checkpoint (+ tokenizer files found at model_path) + optimizer.pt + trainer_state.json."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        model, optimizer = self._savable()
        model.save_pretrained(path, safe_serialization=True)
        src = Path(self.model_path)
        for name in TOKENIZER_FILES:
            if (src / name).is_file() and not (path / name).exists():
                shutil.copy2(src / name, path / name)
        torch.save(optimizer, path / "optimizer.pt")
        state = {"step": self.step_count, "model_path": self.model_path, "seed": self.seed,
                 "lr": self.optimizer.param_groups[0]["lr"], "temperature": self.temperature}
        (path / "trainer_state.json").write_text(json.dumps(state, indent=2))
        return path

    def _savable(self) -> tuple[torch.nn.Module, dict]:
        """(The model `save` writes, the optimizer state it writes.)"""
        return self.model, self.optimizer.state_dict()

    def load(self, path: str | Path) -> dict[str, Any]:
        """Restore weights, optimizer state and step count from a `save` directory; returns its state."""
        path = Path(path)
        loaded = self._load_model(str(path), next(self.model.parameters()).dtype)
        self.model.load_state_dict(loaded.state_dict())
        del loaded
        if (path / "optimizer.pt").exists():
            self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=self.device))
        state_file = path / "trainer_state.json"
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        self.step_count = int(state.get("step", 0))
        return state


class ValueModel(torch.nn.Module):
    """A causal LM's backbone with a scalar value head: the critic of actor-critic algorithms (PPO).

    The backbone is loaded with `AutoModel` from the policy's checkpoint (the LM head is not used), the
    head is a zero-initialised linear layer, so every value starts at 0 and the first advantages are
    the plain returns. Saved as the backbone's HF files plus `value_head.pt`.
    """

    def __init__(self, backbone: torch.nn.Module):
        super().__init__()
        self.backbone = backbone
        self.value_head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype) -> ValueModel:
        model = cls(_from_pretrained(path, dtype, "AutoModel"))
        head = Path(path) / "value_head.pt"
        if head.is_file():
            model.value_head.load_state_dict(torch.load(head, map_location="cpu"))
        return model.to(dtype)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor) -> Tensor:
        """Value of the state before each token: position t reads the hidden state at t − 1.

        Shape: (b, L) → (b, L) float32, 0 at position 0.
        """
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               use_cache=False).last_hidden_state
        values = self.value_head(hidden).squeeze(-1).float()
        return F.pad(values[:, :-1], (1, 0))

    def save_pretrained(self, path: str | Path, safe_serialization: bool = True) -> None:
        self.backbone.save_pretrained(path, safe_serialization=safe_serialization)
        torch.save(self.value_head.state_dict(), Path(path) / "value_head.pt")


class TorchCritic(TorchLearner):
    """The critic: a `ValueModel` trained like the policy (same micro-batching, AdamW, checkpoints).

    `values(batch)` gives the per-token values, and `step(loss_fn, batch)` hands the loss `logprobs=values`
    (with grad): the learner's machinery, reused for a per-token scalar instead of a log-prob.
    """

    def __init__(self, model_path: str, **kwargs):
        kwargs["reference"] = False
        super().__init__(model_path, **kwargs)

    def values(self, batch: TrainBatch) -> Tensor:
        """The critic's per-token values, no grad. Shape: (b, L) float32, 0 outside the response."""
        return self._logprobs_with(self.model, batch)

    def _load_model(self, path: str, dtype: torch.dtype) -> torch.nn.Module:
        return ValueModel.from_pretrained(path, dtype)

    def _forward(self, model: torch.nn.Module, mb: TrainBatch) -> Tensor:
        position_ids = (mb.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        values = model(mb.input_ids, mb.attention_mask, position_ids)
        return torch.where(mb.response_mask > 0, values, torch.zeros_like(values))

    def export_weights(self, device: str | torch.device | None = None) -> dict[str, Tensor]:
        raise NotImplementedError("the critic's weights are not published to generators")
