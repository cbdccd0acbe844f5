"""Models and datasets named by a Hub id (`Qwen/Qwen2.5-0.5B`): their local snapshot, found as
transformers finds it (`model_path`, and `prompts` through hf_datasets.py)."""

from __future__ import annotations

import re

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # `org/name` or `name`, as the Hub spells ids


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


def model_dir(model_path: str) -> str:
    """`model_path` as it is when it is no Hub id, else its snapshot (ValueError naming `model_path`)."""
    return hub_snapshot(model_path, "model_path") if HUB_ID.match(model_path) else model_path
