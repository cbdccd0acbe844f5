"""Rollout engines behind one interface (flux/engine/base.py): `torch` (built-in) and `sglang` (HTTP server)."""

from __future__ import annotations

import re


def build_engine(cfg, model_path: str, *, name: str = "gen0", seed: int | None = None, log_dir=None):
    """The rollout engine `cfg.rollout.engine` names, for the generator `name`.

    Generator number i (the digits that end its name, `gen3` → 3) picks the i-th `rollout.sglang_url`
    or the port `rollout.sglang_port + i` of the server it starts.
    """
    r = cfg.rollout
    if r.engine == "sglang":
        from flux.plugins import hook

        build = hook("sglang.build")
        digits = re.search(r"(\d+)$", name)
        return build(cfg, model_path, index=int(digits.group(1)) if digits else 0, log_dir=log_dir)
    from flux.engine.torch_engine import TorchEngine

    return TorchEngine.from_pretrained(model_path, update_mode=r.update_mode, seed=seed)
