"""The TensorBoard metrics sink (`logging.tensorboard: true`): RUN_DIR/tensorboard event files."""

from __future__ import annotations

from flux.integrations.sinks import grouped


class TensorBoardSink:
    """Every numeric metric as a scalar, under its group (flux.integrations.sinks.grouped: `staleness/lag_mean`,
    `rollout/groups/trained`)."""

    def __init__(self, logdir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(logdir)

    def write(self, step: int, metrics: dict) -> None:
        for tag, value in grouped(metrics).items():
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self.writer.close()
