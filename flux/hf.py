"""Loading HF models across transformers versions (the one place that knows the dtype keyword's name)."""

from __future__ import annotations

import torch


def from_pretrained(path: str, dtype: torch.dtype, auto_class: str = "AutoModelForCausalLM") -> torch.nn.Module:
    """`transformers.<auto_class>.from_pretrained(path)` in `dtype`, from a local directory."""
    import transformers

    # transformers ≥ 4.56 renamed torch_dtype to dtype; an unknown kwarg would silently land in the config.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return getattr(transformers, auto_class).from_pretrained(path, **{key: dtype})
