"""Session-wide test environment: no hub, no writes into ~/.cache, one tiny default model per session."""

import os

import pytest


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Point XDG_CACHE_HOME at a session tmp dir and forbid hub access, here and in every subprocess.

    `flux.integrations.builtin.tiny.default_model_dir()` reads XDG_CACHE_HOME, so the embedded default model is built at most
    once per session, inside that dir, and `flux train` subprocesses (which inherit os.environ) reuse it.
    """
    cache = tmp_path_factory.mktemp("xdg-cache")
    saved = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    os.environ.update(XDG_CACHE_HOME=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def default_model(isolated_cache):
    """Directory of the embedded default model (`builtin:tiny`), built on first use (~15 s on 1 core)."""
    import torch

    from flux.integrations.builtin.tiny import ensure_default_model

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        path = ensure_default_model()
    finally:
        torch.set_num_threads(threads)
    assert str(path).startswith(str(isolated_cache)), path
    return path
