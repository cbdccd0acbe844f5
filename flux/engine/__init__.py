"""Rollout engines behind one interface (flux/engine/base.py): `torch` (built-in), `sglang` (HTTP server),
or a user's own, named by a dotted path `pkg.module:factory` (docs/contributing.md)."""

from __future__ import annotations

import re


def build_engine(cfg, model_path: str, *, name: str = "gen0", seed: int | None = None, log_dir=None):
    """The rollout engine `cfg.rollout.engine` names, for the generator `name`.

    A dotted path `pkg.module:factory` is called as `factory(cfg, model_path, name=, seed=, log_dir=)`.

    Generator number i (the digits that end its name, `gen3` → 3) picks the i-th `rollout.sglang_url`
    or the port `rollout.sglang_port + i` of the server it starts.
    """
    r = cfg.rollout
    if ":" in r.engine:  # a user's engine: factory(cfg, model_path, name=, seed=, log_dir=) -> Engine
        from flux.plugins import resolve

        return resolve(r.engine, "engine factory")(cfg, model_path, name=name, seed=seed, log_dir=log_dir)
    if r.engine == "sglang":
        from flux.plugins import hook

        build = hook("sglang.build")
        digits = re.search(r"(\d+)$", name)
        return build(cfg, model_path, index=int(digits.group(1)) if digits else 0, log_dir=log_dir)
    from flux.engine.torch_engine import TorchEngine
    from flux.hf import device_and_dtype

    device, dtype = device_and_dtype(r.device, r.dtype)
    return TorchEngine.from_pretrained(model_path, device=device, dtype=dtype, update_mode=r.update_mode, seed=seed)
