"""The built-in rollout engine: batched KV-cache sampling on any HF causal LM, in plain PyTorch.

Runs on CPU (and CUDA when the model is there). New weights can arrive from another thread while
`generate` runs; they are swapped in between decode steps (in-flight updating, as in PipelineRL
[Piche et al., 2025] and AReaL [Fu et al., 2025]) or only between `generate` calls.
"""

from __future__ import annotations

import dataclasses
import inspect
import threading
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from flux.engine.base import Completion, SamplingParams, WeightSource

UPDATE_MODES = ("inflight", "between_sequences")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / nucleus (top-p, Holtzman et al., 2020) set to -inf.

    Shape: logits (b, V) -> (b, V). At least the most likely token always survives.
    """
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token once the mass strictly before it already reaches top_p (keeps the top-1).
        drop = (probs.cumsum(dim=-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def sample_tokens(
    logits: torch.Tensor, sampling: SamplingParams, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row and return its behaviour log-prob.

    Shape: logits (b, V) -> tokens (b,) int64, logprobs (b,) float32.
    The recorded log-prob is log_softmax(logits / T)[token] over the FULL tempered distribution:
    that is what the learner recomputes with teacher forcing, so the importance ratio pi/mu compares
    like with like. top-k / top-p only narrow which token may be drawn; they are not renormalised
    into the recorded log-prob. Temperature 0 is greedy, and its log-prob is taken at T = 1.
    """
    logits = logits.float()
    if sampling.temperature == 0:
        tokens = logits.argmax(dim=-1)
        logp = logits.log_softmax(dim=-1)
    else:
        scaled = logits / sampling.temperature
        logp = scaled.log_softmax(dim=-1)
        probs = filter_logits(scaled, sampling.top_k, sampling.top_p).softmax(dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logp.gather(-1, tokens[:, None]).squeeze(-1)


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts into (b, t) input ids and a (b, t) 0/1 attention mask."""
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, width - len(p):] = 1
    return ids.to(device), mask.to(device)


def _forward_kwarg_names(model: torch.nn.Module) -> tuple[str, str | None]:
    """The KV-cache and last-logits-only kwarg names this transformers version accepts.

    transformers 5.x renamed `past_key_values` to `cache` (the old name warns); 4.45-4.49 spell
    `logits_to_keep` as `num_logits_to_keep`.
    """
    params = inspect.signature(model.forward).parameters
    cache_kw = "cache" if "cache" in params else "past_key_values"
    keep_kw = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    return cache_kw, keep_kw


class TorchEngine:
    """Plain-PyTorch rollout engine over a HF causal LM (`AutoModelForCausalLM`).

    `generate` is not re-entrant: one call at a time. `load_weights`, `pause`, `resume` and
    `apply_pending` are safe to call from other threads while it runs.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        version: int = 0,
        update_mode: str = "inflight",
        device: torch.device | str | None = None,
        seed: int | None = None,
    ) -> None:
        if update_mode not in UPDATE_MODES:
            raise ValueError(f"update_mode must be one of {UPDATE_MODES}, got {update_mode!r}")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model: torch.nn.Module | None = model.to(self.device).eval()
        self.version, self.update_mode = version, update_mode
        self.generator = torch.Generator(device=self.device)
        self.generator.seed() if seed is None else self.generator.manual_seed(seed)
        self.tokens_generated, self.busy_seconds = 0, 0.0
        self.load_seconds, self.loads = 0.0, 0  # applying new weights: fetch (shared memory) + copy in
        self._cache_kw, self._keep_kw = _forward_kwarg_names(model)
        self._pending: tuple[int, WeightSource] | None = None
        self._pending_lock = threading.Lock()
        self._model_lock = threading.Lock()  # held around each forward pass and each weight swap
        self._running, self._closed = threading.Event(), False
        self._running.set()
        self._queued: list[tuple[Any, list[list[int]], SamplingParams]] = []  # requests waiting to join
        self._rows: list = []  # running sequences: [request, index in it, tokens, log-probs, versions]
        self._ver: list[int] = []  # per running row: the weights' version its next logits came from
        self._sampling = self._stop = self._cache = self._logits = self._mask = self._pos = None

    @classmethod
    def from_pretrained(
        cls, path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None, **kw: Any
    ) -> "TorchEngine":
        """Load a HF checkpoint; dtype defaults to float32 on CPU and bfloat16 on CUDA."""
        from flux.hf import from_pretrained

        device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = from_pretrained(path, dtype)
        model.requires_grad_(False)
        return cls(model, device=device, **kw)

    # ---- weights -------------------------------------------------------------------------------

    def load_weights(self, version: int, source: WeightSource) -> None:
        """Queue weights `version` (a state dict or a zero-arg callable returning one); returns at once.

        Only the newest queued version is kept; it is applied at the next safe point (see update_mode).
        """
        with self._pending_lock:
            if self._pending is None or version > self._pending[0]:
                self._pending = (version, source)

    def apply_pending(self) -> bool:
        """Swap the queued weights in now; True if the model changed. Never goes back to an older version."""
        with self._pending_lock:
            pending, self._pending = self._pending, None
        if pending is None or pending[0] <= self.version or self.model is None:
            return False
        version, source = pending
        t0 = time.perf_counter()
        state = source() if callable(source) else source
        if state is None:  # the source gave up on this version (overwritten); a newer one is on its way
            return False
        with self._model_lock, torch.no_grad():
            # Copies in place: parameter storage (and so the KV cache layout) is unchanged.
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            # Tied weights (lm_head = embed_tokens) are exported once; anything else missing is an error.
            untied = set(missing) - _tied_names(self.model)
            if untied or unexpected:
                raise RuntimeError(f"weights v{version} do not fit the model: missing {sorted(untied)}, "
                                   f"unexpected {sorted(unexpected)}")
            self.version = version
        self.load_seconds += time.perf_counter() - t0
        self.loads += 1
        return True

    # ---- flow control --------------------------------------------------------------------------

    def pause(self) -> None:
        """Make `generate` wait at its next step boundary until `resume()`."""
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    def close(self) -> None:
        """Release the model; a `generate` that is running (or paused) raises at its next boundary."""
        self._closed = True
        self._running.set()
        with self._model_lock:
            self.model = None
        with self._pending_lock:
            self._pending = None

    def _wait_if_paused(self) -> float:
        """Block while paused; return the seconds spent waiting."""
        start = time.perf_counter()
        self._running.wait()
        if self._closed:
            raise RuntimeError("TorchEngine was closed during generate")
        return time.perf_counter() - start

    # ---- sampling ------------------------------------------------------------------------------

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Any
    ) -> tuple[torch.Tensor, Any, int]:
        """One forward pass. Returns last-position logits (b, V), the KV cache, and the weights' version."""
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._keep_kw is not None:
            kwargs[self._keep_kw] = 1
        with self._model_lock:
            if self.model is None:
                raise RuntimeError("TorchEngine was closed during generate")
            version = self.version
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kwargs)
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        if isinstance(cache, tuple):  # transformers 4.x may hand back the legacy tuple format
            from transformers import DynamicCache

            cache = DynamicCache.from_legacy_cache(cache)
        return out.logits[:, -1, :], cache, version

    # ---- continuous batching: requests join and leave the running batch between decode steps -------

    def add(self, key: Any, prompts: list[list[int]], sampling: SamplingParams) -> None:
        """Queue one request (e.g. a prompt group): its prompts join the running batch at the next `step`.

        Every request in the batch shares one sampling setup (all but the seed; a batch that starts empty
        is re-seeded from its first request's seed). Call `add` and `step` from one thread.
        """
        sampling.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("a request needs at least one prompt, and no empty prompt")
        same = self._sampling if self._rows else self._queued[0][2] if self._queued else None
        if same is not None and dataclasses.replace(same, seed=None) != dataclasses.replace(sampling, seed=None):
            raise ValueError("requests in one batch must share their sampling parameters (all but the seed)")
        self._queued.append((key, prompts, sampling))

    @property
    def rows_in_flight(self) -> int:
        """Sequences being sampled or queued to join."""
        return len(self._rows) + sum(len(p) for _, p, _ in self._queued)

    @torch.inference_mode()
    def step(self) -> list[tuple[Any, list[Completion]]]:
        """Let queued requests join (one prefill), then sample one token for every running sequence.
        Returns the requests whose every sequence has finished, as (key, completions in prompt order)."""
        if self._closed:
            raise RuntimeError("TorchEngine is closed")
        start = time.perf_counter()
        paused = self._wait_if_paused()
        if not self._rows or self.update_mode == "inflight":
            # Step boundary: the only place weights change while sequences run (an empty batch always
            # starts on the newest weights). The KV cache of earlier tokens (computed by the old weights) is
            # kept, as in PipelineRL / AReaL: the learner corrects the drift through the per-token versions
            # and behaviour log-probs.
            self.apply_pending()
        if self._queued and not (self._rows and self.update_mode != "inflight" and self._pending is not None):
            self._join()  # (between_sequences: while an update waits, the batch drains before anyone joins)
        done = self._decode() if self._rows else []
        self.busy_seconds += time.perf_counter() - start - paused
        return done

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Sample one completion per prompt (batched, KV-cached); returns them in prompt order."""
        if self.rows_in_flight:
            raise RuntimeError("generate while a continuous batch is running: use add/step")
        self.add(None, prompts, sampling)
        while not (done := self.step()):
            pass
        return done[0][1]

    def _join(self) -> None:
        """Prefill the queued requests and merge them into the running batch (left-padded to one width)."""
        queued, self._queued = self._queued, []
        if not self._rows:
            self._sampling = queued[0][2]
            self._stop = torch.tensor(sorted(set(self._sampling.stop_token_ids)), dtype=torch.long,
                                      device=self.device)
            if self._sampling.seed is not None:
                self.generator.manual_seed(self._sampling.seed)
        ids, mask = _left_pad([p for _, ps, _ in queued for p in ps], self.device)
        # Left padding: HF derives positions from a plain arange, which would count the pads; the
        # positions must restart at 0 on each row's first real token, as in an unpadded forward.
        logits, cache, version = self._forward(ids, mask, (mask.cumsum(dim=-1) - 1).clamp(min=0), None)
        # A request is [key, its completions, rows still running]; a row [request, index in it, tokens, ...].
        rows = [(q, j, [], [], []) for q in ([k, [None] * len(ps), len(ps)] for k, ps, _ in queued) for j in range(q[2])]
        if self._rows:
            width = max(mask.shape[1], self._mask.shape[1])
            kv = [(torch.cat([_pad_left(k0, width), _pad_left(k1, width)]),
                   torch.cat([_pad_left(v0, width), _pad_left(v1, width)]))
                  for (k0, v0), (k1, v1) in zip(_kv(self._cache), _kv(cache))]
            _set_kv(self._cache, kv)
            mask = torch.cat([F.pad(self._mask, (width - self._mask.shape[1], 0)),
                              F.pad(mask, (width - mask.shape[1], 0))])
            logits, positions = torch.cat([self._logits, logits]), torch.cat([self._pos, mask[-len(rows):].sum(-1)])
        else:
            self._cache, positions = cache, mask.sum(dim=-1)
        self._rows += rows
        self._ver += [version] * len(rows)
        self._logits, self._mask, self._pos = logits, mask, positions

    def _decode(self) -> list[tuple[Any, list[Completion]]]:
        """Sample a token for every running row; finished rows leave; the rest take one forward pass."""
        if not bool(torch.isfinite(self._logits).all()):
            from flux.run.runtime import FluxRunError

            version = max(self._ver)
            raise FluxRunError(f"the policy's weights became non-finite at step {version - 1}: "
                               f"version {version} gives NaN/inf logits")
        tokens, logp = sample_tokens(self._logits, self._sampling, self.generator)
        ended = torch.isin(tokens, self._stop).tolist()
        keep, done = [], []
        for i, (row, token, lp) in enumerate(zip(self._rows, tokens.tolist(), logp.tolist())):
            request, j, toks, lps, vers = row
            toks.append(token), lps.append(lp), vers.append(self._ver[i])
            if not ended[i] and len(toks) < self._sampling.max_new_tokens:
                keep.append(i)
                continue
            request[1][j] = Completion(np.asarray(toks, np.int32), np.asarray(lps, np.float32),
                                       np.asarray(vers, np.int32), bool(ended[i]))
            request[2] -= 1
            if request[2] == 0:
                done.append((request[0], request[1]))
        self.tokens_generated += len(self._rows)
        if len(keep) < len(self._rows):  # finished rows leave the batch, and its cache
            idx = torch.tensor(keep, dtype=torch.long, device=self.device)
            self._rows, self._ver = [self._rows[i] for i in keep], [self._ver[i] for i in keep]
            if not keep:
                self._cache = self._logits = self._mask = self._pos = None
                return done
            self._mask, self._pos, tokens = self._mask[idx], self._pos[idx], tokens[idx]
            first = int(self._mask.any(dim=0).nonzero()[0])  # columns that are padding in every row go
            _set_kv(self._cache, [(k[idx, :, first:], v[idx, :, first:]) for k, v in _kv(self._cache)])
            self._mask = self._mask[:, first:]
        self._mask = F.pad(self._mask, (0, 1), value=1)
        self._logits, self._cache, version = self._forward(tokens[:, None], self._mask, self._pos[:, None],
                                                           self._cache)
        self._ver = [version] * len(self._rows)
        self._pos = self._pos + 1
        return done

    @torch.inference_mode()
    def score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0
              ) -> list[Completion]:
        """Teacher-forced log-probs of given responses (e.g. offline preference pairs) under the current
        weights, as `Completion`s whose versions are the engine's version and `finished` is True.

        Log-probs use the same tempered distribution as sampling: log_softmax(logits / T)[token].
        """
        if len(prompts) != len(responses) or any(not p or not r for p, r in zip(prompts, responses)):
            raise ValueError("score needs one non-empty response per non-empty prompt")
        start = time.perf_counter()
        self.apply_pending()
        ids, mask = _left_pad([p + r for p, r in zip(prompts, responses)], self.device)
        positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
        with self._model_lock:
            if self.model is None:
                raise RuntimeError("TorchEngine is closed")
            version = self.version
            logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        logp = torch.log_softmax(logits[:, :-1].float() / max(temperature, 1e-6), -1)
        logp = logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
        out = []
        for row, r in enumerate(responses):
            lp = logp[row, logp.shape[1] - len(r):].cpu().numpy().astype(np.float32)
            out.append(Completion(np.asarray(r, np.int32), lp, np.full(len(r), version, np.int32), True))
        self.busy_seconds += time.perf_counter() - start
        return out


def _tied_names(model: torch.nn.Module) -> set[str]:
    """State-dict names whose tensor shares storage with an earlier name (e.g. a tied lm_head)."""
    seen, tied = set(), set()
    for name, t in model.state_dict(keep_vars=True).items():
        key = (t.data_ptr(), t.shape)
        if key in seen:
            tied.add(name)
        seen.add(key)
    return tied


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad a (b, heads, t, d) key/value tensor on the left of its sequence axis to `width`."""
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def _kv(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(keys, values) of each layer of a HF DynamicCache (transformers 5: `layers`; 4.x: two lists)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def _set_kv(cache: Any, kv: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    if hasattr(cache, "layers"):
        for layer, (k, v) in zip(cache.layers, kv):
            layer.keys, layer.values = k, v
    else:
        cache.key_cache, cache.value_cache = [k for k, _ in kv], [v for _, v in kv]
