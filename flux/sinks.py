"""Where the controller sends each step's metrics: metrics.jsonl always, TensorBoard and others on request.

A sink is any object with `write(step, metrics)` and `close()`. The controller holds one `Sinks`, which
fans every step out to all of them:

    logging:
      tensorboard: true                      # RUN_DIR/tensorboard, if the `tensorboard` package is there
      wandb: {project: my-proj, mode: offline}   # Weights & Biases, if the `wandb` package is there
      sinks: [mypkg.tracking:make_sink]      # make_sink(run_dir, config) -> sink

The TensorBoard and wandb sinks are integrations (flux/integrations/sinks), imported only when asked for.
They show each metric under its group (`grouped` in flux/integrations/sinks): `rollout/`, `train/`,
`staleness/`, `timing/`, `eval/`, followed by its metrics.jsonl name (`staleness/lag_mean`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable
from typing import Protocol

from flux.config import FluxConfig

log = logging.getLogger("flux.sinks")


class Sink(Protocol):
    def write(self, step: int, metrics: dict) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """RUN_DIR/metrics.jsonl: one JSON object per step, line-buffered so readers see whole lines."""

    def __init__(self, path: str):
        self.file = open(path, "a", buffering=1)  # noqa: SIM115  (open for the whole run)

    def write(self, step: int, metrics: dict) -> None:
        self.file.write(json.dumps(metrics) + "\n")

    def close(self) -> None:
        self.file.close()


def scalars(metrics: dict, prefix: str = "") -> dict[str, float]:
    """Flatten to {tag: float}: finite numbers only (bools count as 0/1), nested dicts joined with `/`."""
    out = {}
    for key, value in metrics.items():
        tag = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{tag}/"))
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[tag] = float(value)
    return out


class Sinks:
    """All of a run's sinks as one. metrics.jsonl (the first) must work; a failing extra sink is
    logged and dropped, so a broken dashboard never stops training."""

    def __init__(self, primary: Sink, extras: list[Sink] = ()):
        self.primary, self.extras = primary, list(extras)

    def write(self, step: int, metrics: dict) -> None:
        self.primary.write(step, metrics)
        for sink in list(self.extras):
            try:
                sink.write(step, metrics)
            except Exception:
                log.exception("metrics sink %s failed; dropping it", type(sink).__name__)
                self.extras.remove(sink)

    def close(self) -> None:
        for sink in self.extras:
            try:
                sink.close()
            except Exception:
                log.exception("metrics sink %s failed to close", type(sink).__name__)
        self.primary.close()


def load_factory(dotted: str) -> Callable:
    """`module:factory` → the factory; ValueError with a one-line reason otherwise."""
    from flux.rewards import load_function

    return load_function(dotted)


def open_sinks(run_dir: str, config: FluxConfig) -> Sinks:
    """metrics.jsonl, plus TensorBoard, wandb and the `logging.sinks` factories when the config asks."""
    extras: list[Sink] = []
    if config.logging.tensorboard:
        try:
            from flux.plugins import hook

            extras.append(hook("sinks.tensorboard")(os.path.join(run_dir, "tensorboard")))
        except ImportError as e:
            log.warning("logging.tensorboard is on but TensorBoard is not available (%s); "
                        "pip install tensorboard. Going on without it.", e)
    if config.logging.wandb:
        try:
            from flux.plugins import hook

            extras.append(hook("sinks.wandb")(run_dir, config))
        except ImportError as e:
            log.warning("logging.wandb is set but wandb is not available (%s); pip install 'flux-rlhf[wandb]'. "
                        "Going on without it.", e)
    for dotted in config.logging.sinks:
        extras.append(load_factory(dotted)(run_dir, config))
    return Sinks(JsonlSink(os.path.join(run_dir, "metrics.jsonl")), extras)
