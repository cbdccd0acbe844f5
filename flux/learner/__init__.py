"""Training backends behind one interface, `Learner` (flux/learner/base.py): `logprobs`, `ref_logprobs`,
`step`, `export_weights`, `eval_model`, `save`/`load`. `torch` is plain PyTorch (torch_learner.py);
`megatron` is megatron-core (flux/integrations/megatron/learner.py, the one module that imports it);
`fsdp` is the torch learner sharded over its ranks (flux/integrations/distributed/fsdp.py)."""

from __future__ import annotations

BACKENDS = ("torch", "megatron")
HOOKED = {"megatron": "megatron.Learner", "fsdp": "distributed.FSDPLearner"}  # fsdp: learner.sharding


def build_learner(backend: str, model_path: str, **kwargs):
    """The learner `learner.backend` names, built with `Learner`'s keyword arguments; a dotted path
    `pkg.module:Class` names a user's `Learner` subclass (docs/contributing.md)."""
    if ":" in backend:
        from flux.plugins import resolve

        return resolve(backend, "learner class")(model_path, **kwargs)
    if backend in HOOKED:  # an integration's
        from flux.plugins import hook

        return hook(HOOKED[backend])(model_path, **kwargs)
    if backend == "torch":
        from flux.learner.torch_learner import TorchLearner

        return TorchLearner(model_path, **kwargs)
    raise ValueError(f"unknown learner backend {backend!r} (known: {', '.join(BACKENDS)})")
