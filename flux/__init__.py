"""Flux: post-training for language models with adaptive asynchrony."""

__version__ = "0.1.0"

from flux.config import FluxConfig, load_config  # noqa: E402
from flux.trainer import FluxTrainer  # noqa: E402

__all__ = ["FluxConfig", "FluxTrainer", "load_config"]
