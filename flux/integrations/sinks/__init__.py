"""Metrics sinks beyond metrics.jsonl: TensorBoard (`logging.tensorboard`), Weights & Biases (`logging.wandb`),
and the metric names both show (`grouped`)."""

from __future__ import annotations

from flux.sinks import scalars

# A metric's group by the start of its name (the first that matches); anything else is `train/`.
GROUPS = (("eval_", "eval"), ("time_", "timing"), ("wall_s", "timing"), ("step_s", "timing"),
          ("batch_wait_s", "timing"), ("lag", "staleness"), ("div_", "staleness"), ("sig_", "staleness"),
          ("staleness", "staleness"), ("async_ratio", "staleness"), ("controller/", "staleness"),
          ("reward", "rollout"), ("response_len", "rollout"), ("samples", "rollout"), ("tokens", "rollout"),
          ("generator_", "rollout"), ("dropped", "rollout"), ("trained_lengths", "rollout"),
          ("groups/", "rollout"), ("started_samples", "rollout"))


def grouped(metrics: dict) -> dict[str, float]:
    """`scalars(metrics)` named as dashboards show them: `<group>/<name>` (GROUPS), without `step`."""
    return {f"{next((g for p, g in GROUPS if tag.startswith(p)), 'train')}/{tag}": v
            for tag, v in scalars(metrics).items() if tag != "step"}
