"""A learner backend in one file: the built-in one with the embeddings frozen.

    flux train --set learner.backend=examples.custom_learner:FrozenEmbeddingLearner

A backend is a subclass of `flux.learner.base.Learner`, which already holds the micro-batched step, the
log-probs, the reference model and data parallelism. A new one implements `_load_model` (the policy
module), `_forward` (per-token log-probs of a micro-batch), `export_weights`, `eval_model`, `save` and
`load`, as flux/integrations/megatron/learner.py does for megatron-core; the smallest change is to
subclass `TorchLearner` and override one of them, as here. The optimizer is built from the parameters
that still require a gradient after `_load_model`, so freezing there is enough.
"""

from __future__ import annotations

from flux.learner.torch_learner import TorchLearner


class FrozenEmbeddingLearner(TorchLearner):
    def _load_model(self, path, dtype):
        model = super()._load_model(path, dtype)
        model.get_input_embeddings().requires_grad_(False)  # (tied: the output head stays as it is too)
        return model
