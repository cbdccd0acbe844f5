"""`flux` command line.

    flux train [CONFIG.yaml] [--set key=value ...] [--max-steps N] [--out DIR]
    flux train --resume RUN_DIR [--set key=value ...] [--max-steps N]
    flux generator --connect tcp://HOST:PORT --key FILE [--engine E] [--name N] [--model DIR] [--prompts FILE]
    flux keys DIR [--client NAME ...]
    flux status RUN_DIR [--follow/--once]
    flux plot RUN_DIR [--out FILE.png]
    flux config
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from flux.config import ConfigError, load_config


def fail(message: str, code: int = 2):
    click.echo(f"flux: error: {message}", err=True)
    sys.exit(code)


@click.group()
@click.version_option(package_name="flux-rlhf")
def main():
    """Flux: RL post-training with adaptive asynchrony."""
    # Dotted paths (rewards, algorithms, engines, learners, sinks) resolve from the working directory, as
    # under `python -m flux.cli` and in the actors (started with `python -m` in this directory).
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    from flux.run.runtime import OMP_SPIN

    os.environ.setdefault(*OMP_SPIN)  # before torch loads here: forked actors inherit its OpenMP


@main.command()
@click.argument("config", required=False, type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set rollout.group_size=8 (repeatable).")
@click.option("--max-steps", type=int, default=None, help="Optimizer steps to run.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Run directory.")
@click.option("--resume", "resume", type=click.Path(file_okay=False), default=None, metavar="RUN_DIR",
              help="Continue RUN_DIR from its latest checkpoint (its config.yaml, plus any --set/--max-steps).")
def train(config, overrides, max_steps, out, resume):
    """Run a job; with no CONFIG, the built-in example on the embedded tiny model."""
    from flux.run.launcher import SetupError, flux_is_the_program, latest_checkpoint, run

    try:
        checkpoint = ""
        if resume:
            if config or out:
                raise SetupError("--resume takes the run's own config.yaml and directory; drop CONFIG/--out")
            if not Path(resume, "config.yaml").is_file():
                raise SetupError(f"--resume {resume}: not a run directory (no config.yaml)")
            checkpoint = latest_checkpoint(resume, sys.stdout)
            config, out = str(Path(resume, "config.yaml")), resume
        cfg = load_config(config, list(overrides), max_steps=max_steps, out=out)
        code, _ = run(cfg, resume_from=checkpoint)
    except (ConfigError, SetupError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # before the actors exist (e.g. while the default model is built)
        fail("interrupted", 130)
    # The run is over and everything it opened is closed. As the `flux` program, skip the interpreter's
    # teardown (about a second with torch and transformers imported); a caller's own program goes on.
    if not flux_is_the_program():
        sys.exit(code)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--follow/--once", default=None,
              help="Redraw until the run ends, or print once (default: follow on a terminal).")
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds between refreshes.")
def status(run_dir, follow, interval):
    """What a run is doing: actors, versions, async ratio, staleness, throughput, reward."""
    from flux.plugins import hook

    try:
        sys.exit(hook("tools.watch")(run_dir, follow, interval))
    except hook("tools.StatusError") as e:
        fail(str(e))
    except KeyboardInterrupt:  # the way to stop following
        sys.exit(0)


@main.command()
@click.argument("run_dir", type=click.Path())
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="PNG path (default RUN_DIR/plot.png).")
def plot(run_dir, out):
    """One PNG of a run: reward, eval, staleness, async ratio, lag, throughput, busy fractions."""
    from flux.plugins import hook

    try:
        click.echo(f"flux: wrote {hook('tools.plot_run_dir')(run_dir, out)}")
    except hook("tools.PlotError") as e:
        fail(str(e))


@main.command("config")
def show_config():
    """Print every config key with its default and meaning."""
    from flux.config import config_fields

    for key, typ, default, doc in config_fields():
        click.echo(f"{key} ({typ}, default {default!r}): {doc}")


def _remote_commands() -> None:
    from flux.plugins import hook

    for command in hook("remote.commands"):  # `flux generator`, `flux keys` (flux/integrations/remote/cli.py)
        main.add_command(command)


_remote_commands()

if __name__ == "__main__":
    main()
