"""Loading HF models across transformers versions (the one place that knows the dtype keyword's name); a
Hub id's files are found by flux/integrations/data/hub.py."""

from __future__ import annotations


def from_pretrained(path: str, dtype: torch.dtype, auto_class: str = "AutoModelForCausalLM") -> torch.nn.Module:
    """`transformers.<auto_class>.from_pretrained(path)` in `dtype`, from a local directory."""
    import transformers

    # transformers ≥ 4.56 renamed torch_dtype to dtype; an unknown kwarg would silently land in the config.
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    return getattr(transformers, auto_class).from_pretrained(path, **{key: dtype})


def device_and_dtype(device: str, dtype: str, rank: int | None = None):
    """(`auto` resolved: CUDA when present, else CPU; the torch dtype, `auto` = bf16 on CUDA, fp32 on CPU).
    With a data-parallel `rank`, plain `cuda` is that rank's GPU (round robin over the visible ones)."""
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if device == "cuda" and rank is not None:
        device = f"cuda:{rank % torch.cuda.device_count()}"
    name = ("bf16" if device.startswith("cuda") else "fp32") if dtype == "auto" else dtype
    return device, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
