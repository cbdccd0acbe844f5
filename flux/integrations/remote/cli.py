"""`flux generator`, `flux learner --join` and `flux keys`: the command-line side of remote generators and
learner ranks (flux.cli adds them)."""

from __future__ import annotations

import os
import sys

import click

from flux.plugins import hook


def fail(message: str, code: int = 2):  # as flux.cli's (which imports this module, so it cannot import it)
    click.echo(f"flux: error: {message}", err=True)
    sys.exit(code)


@click.command()
@click.option("--connect", required=True, metavar="tcp://HOST:PORT",
              help="The run's remote endpoint (`flux train` prints it when net.remote is on).")
@click.option("--key", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="This generator's key pair: NAME.key_secret made by `flux keys`.")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The run's public key (default: server.key next to --key).")
@click.option("--engine", type=click.Choice(["torch", "sglang"]), default=None,
              help="Rollout engine here (default: the run's rollout.engine).")
@click.option("--name", default=None, help="Generator name (default HOSTNAME-PID; made unique in the run).")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="The run's base model on this machine, if not at the run's path.")
@click.option("--prompts", default=None, metavar="FILE",
              help="The run's prompts file on this machine, if not at the run's path (must be identical).")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory for this generator's logs (default runs/generator-NAME).")
def generator(connect, key, server_key, engine, name, model, prompts, out):
    """Attach a generator to a running job (which has net.remote on); leave with Ctrl-C or SIGTERM."""
    try:
        code = hook("remote.run_generator")(connect, key, server_key, name=name, engine=engine, model=model,
                                            prompts=prompts, out=out)
    except hook("remote.RemoteError") as e:
        fail(str(e))
    sys.exit(code)


@click.command()
@click.option("--join", "connect", required=True, metavar="tcp://HOST:PORT",
              help="The run's remote endpoint (`flux train` prints the command when learner.local_ranks is set).")
@click.option("--key", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="A client key pair made by `flux keys` (NAME.key_secret).")
@click.option("--server-key", type=click.Path(dir_okay=False), default=None, metavar="FILE",
              help="The run's public key (default: server.key next to --key).")
@click.option("--rank", type=int, default=None,
              help="This process's learner rank (default: $RANK, else $SLURM_PROCID).")
@click.option("--model", type=click.Path(file_okay=False), default=None,
              help="The run's base model on this machine, if not at the run's path.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Directory for this rank's logs (default runs/learner-RANK).")
def learner(connect, key, server_key, rank, model, out):
    """Join a running job as one of its learner ranks (learner.local_ranks < learner.ranks)."""
    try:
        code = hook("remote.run_learner")(connect, key, server_key, rank=rank, model=model, out=out)
    except hook("remote.RemoteError") as e:
        fail(str(e))
    # As an actor ends (flux.run.runtime.actor_main): its group is closed; the interpreter's teardown of torch's
    # distributed objects can abort the process (seen once under load, SIGABRT after the run had finished).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@click.command()
@click.argument("key_dir", type=click.Path(file_okay=False))
@click.option("--client", "clients", multiple=True, metavar="NAME",
              help="Make a key pair for this client (repeatable; default: one named `client`).")
def keys(key_dir, clients):
    """Make CURVE keys for remote generators: the run's pair and client pairs (existing keys are kept)."""
    try:
        made = hook("remote.make_keys")(key_dir, clients or ("client",))
    except hook("remote.KeysError") as e:
        fail(str(e))
    click.echo(f"flux: run key (public) {made.pop('server')}; train with --set net.remote=true --set "
               f"net.keys={key_dir}")
    for name, path in made.items():
        click.echo(f"flux: client {name}: copy {path} and {key_dir}/server.key to the generator machine; "
                   f"its public key is in {key_dir}/authorized/{name}.key (delete it to shut {name} out)")


COMMANDS = [generator, learner, keys]
