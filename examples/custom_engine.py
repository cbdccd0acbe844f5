"""A rollout engine in one file: HF `generate()` instead of Flux's own decode loop.

    flux train --set rollout.engine=examples.custom_engine:build

(run from the repository root, or put this file's folder on PYTHONPATH and drop the `examples.`). The
factory gets the run's config and model directory and returns an object with the `RolloutEngine`
surface of flux/engine/base.py. This one takes new weights between `generate` calls only (the built-in
engine swaps them between decode steps), so every token of a completion has the same version.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from flux.engine.base import Completion


class HFGenerateEngine:
    def __init__(self, model_path: str, seed: int | None = None):
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
        self.version, self.tokens_generated, self.busy_seconds = 0, 0, 0.0
        self.seed = seed or 0
        self._pending, self._lock = None, threading.Lock()

    def load_weights(self, version, source) -> None:  # any thread: queue the newest, apply later
        with self._lock:
            if self._pending is None or version > self._pending[0]:
                self._pending = (version, source)

    def apply_pending(self) -> bool:
        with self._lock:
            pending, self._pending = self._pending, None
        if pending is None or pending[0] <= self.version:
            return False
        state = pending[1]() if callable(pending[1]) else pending[1]
        if state is None:  # overwritten by a newer version, which is on its way
            return False
        self.model.load_state_dict(state, strict=False)  # tied weights are exported once
        self.version = pending[0]
        return True

    def generate(self, prompts, sampling) -> list[Completion]:
        start = time.perf_counter()
        self.apply_pending()
        torch.manual_seed(sampling.seed if sampling.seed is not None else self.seed)
        width = max(map(len, prompts))
        pad = self.model.config.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])  # left-padded
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        greedy = sampling.temperature == 0
        with torch.no_grad():
            out = self.model.generate(
                ids, attention_mask=mask, max_new_tokens=sampling.max_new_tokens, do_sample=not greedy,
                temperature=None if greedy else sampling.temperature, top_p=sampling.top_p,
                top_k=sampling.top_k or None, eos_token_id=list(sampling.stop_token_ids) or None,
                pad_token_id=pad, output_logits=True, return_dict_in_generate=True)
        new = out.sequences[:, width:]
        # behaviour log-probs of the full tempered distribution: log_softmax(logits / T)[token]
        logits = torch.stack(out.logits, 1) / (1.0 if greedy else sampling.temperature)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, new[..., None])[..., 0]
        completions = []
        for row in range(len(prompts)):
            toks = new[row].tolist()
            stop = next((i for i, t in enumerate(toks) if t in sampling.stop_token_ids), None)
            n = len(toks) if stop is None else stop + 1
            completions.append(Completion(np.asarray(toks[:n], np.int32), logp[row, :n].numpy().astype(np.float32),
                                          np.full(n, self.version, np.int32), stop is not None))
            self.tokens_generated += n
        self.busy_seconds += time.perf_counter() - start
        return completions

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None:
        self.model = None


def build(cfg, model_path, *, name="gen0", seed=None, log_dir=None) -> HFGenerateEngine:
    """`rollout.engine: examples.custom_engine:build` calls this once per generator."""
    return HFGenerateEngine(model_path, seed)
