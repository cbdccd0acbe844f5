"""A test rollout engine whose behaviour log-probs disagree with the learner's by a constant: the
divergence floor a GPU engine/learner pair shows at lag 0 (other kernels, other precision), made large
and exact. Named in a config as `rollout.engine: tests.offset_engine:build` (a dotted-path engine)."""

from __future__ import annotations

import os

from flux.engine.torch_engine import TorchEngine

OFFSET = float(os.environ.get("FLUX_TEST_LOGPROB_OFFSET", "0.3"))


class OffsetEngine(TorchEngine):
    """The built-in engine, reporting log μ(y) − OFFSET for every sampled token (samples unchanged)."""

    def step(self):  # generate() runs through step() too
        done = super().step()
        for _, outs in done:
            for c in outs:
                c.logprobs = c.logprobs - OFFSET
        return done


def build(cfg, model_path, *, name="gen0", seed=None, log_dir=None):
    return OffsetEngine.from_pretrained(model_path, update_mode=cfg.rollout.update_mode, seed=seed)
