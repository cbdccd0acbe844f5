"""The Weights & Biases metrics sink (`logging.wandb: {project, name, mode}`).

One wandb run per Flux run, its files under RUN_DIR/wandb; the run's whole config as the wandb config;
every numeric metric under its group (flux.integrations.sinks.grouped), at the step's number. `mode: offline` writes
the run for a later `wandb sync RUN_DIR/wandb/offline-run-*`, with no network and no account.
"""

from __future__ import annotations

from flux.integrations.sinks import grouped


class WandbSink:
    def __init__(self, run_dir: str, config):
        import wandb

        opts = dict(config.logging.wandb)
        self.run = wandb.init(project=opts.pop("project", "flux"), name=opts.pop("name", None) or None,
                              mode=opts.pop("mode", "online"), dir=run_dir, config=config.to_dict(),
                              reinit="create_new", **opts)

    def write(self, step: int, metrics: dict) -> None:
        self.run.log(grouped(metrics), step=step)

    def close(self) -> None:
        self.run.finish()
