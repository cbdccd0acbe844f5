"""Loading HF models across transformers versions (the one place that knows the dtype keyword's name), and
finding a Hub id's files."""

from __future__ import annotations

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `org/name` or `name`, as the Hub spells ids


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


def hub_snapshot(repo_id: str, field: str, repo_type: str = "model") -> str:
    """The local directory of a Hub model or dataset, resolved as transformers resolves it: from the local
    HF cache, downloaded only where the environment allows it (not under HF_HUB_OFFLINE=1). ValueError
    with one line naming `field` when it cannot be found."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, repo_type=repo_type, local_files_only=constants.HF_HUB_OFFLINE)
    except LocalEntryNotFoundError:
        raise ValueError(f"{field}: {repo_id} is not a directory, nor in the local HF cache "
                         f"({constants.HF_HUB_CACHE}); HF_HUB_OFFLINE=1 forbids downloading it") from None
    except Exception as e:  # noqa: BLE001 (unknown repo, no network, gated model: one line says which)
        raise ValueError(f"{field}: {repo_id} is not a directory, and the HF Hub did not give it: "
                         f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
