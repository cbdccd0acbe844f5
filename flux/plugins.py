"""Where the core finds the optional integrations: one table of named hooks → dotted paths.

The core (actors/, flux/ outside flux/integrations/) never imports an integration module: it asks for a
hook by name, and `hook(name)` resolves the dotted path below on first use (`pkgutil.resolve_name`). So
each integration can be read, changed or removed alone, and this table is the whole list of places where
the core reaches one (tests/test_layout.py checks that no core module imports `flux.integrations`).
"""

from __future__ import annotations

import pkgutil
from typing import Any

HOOKS = {
    # rollout.engine: sglang (flux/integrations/sglang)
    "sglang.build": "flux.integrations.sglang.engine:build",
    "sglang.check_setup": "flux.integrations.sglang.engine:check_setup",
    "sglang.SGLangError": "flux.integrations.sglang.engine:SGLangError",
    "sglang.config_checks": "flux.integrations.sglang.checks:config_checks",
    # learner.backend: megatron (flux/integrations/megatron)
    "megatron.Learner": "flux.integrations.megatron.learner:MegatronLearner",
    "megatron.check_setup": "flux.integrations.megatron.learner:check_setup",
    # CUDA IPC buckets of the shared-memory weight path (flux/integrations/cuda)
    "cuda.share_bucket": "flux.integrations.cuda.ipc:share_bucket",
    "cuda.open_bucket": "flux.integrations.cuda.ipc:open_bucket",
    # learner.ranks > 1 (flux/integrations/distributed)
    "distributed.RankGroup": "flux.integrations.distributed.data_parallel:RankGroup",
    "distributed.FSDPLearner": "flux.integrations.distributed.fsdp:FSDPLearner",  # learner.sharding: fsdp
    "distributed.FSDPCritic": "flux.integrations.distributed.fsdp:FSDPCritic",
    # net.remote and `flux generator` / `flux keys` (flux/integrations/remote)
    "remote.commands": "flux.integrations.remote.cli:COMMANDS",
    "remote.may_send": "flux.integrations.remote.side:may_send",
    "remote.handlers": "flux.integrations.remote.side:handlers",
    "remote.endpoints": "flux.integrations.remote.side:remote_endpoints",
    "remote.ControllerSide": "flux.integrations.remote.side:RemoteSide",
    "remote.Peers": "flux.integrations.remote.side:Peers",
    "remote.config_checks": "flux.integrations.remote.checks:config_checks",
    "remote.open_curve_pull": "flux.integrations.remote.side:open_curve_pull",
    "remote.stream_handle": "flux.integrations.remote.side:stream_handle",
    "remote.port_of": "flux.integrations.remote.side:port_of",
    "remote.run_generator": "flux.integrations.remote.side:run_generator",
    "remote.run_learner": "flux.integrations.remote.side:run_learner",
    "remote.RemoteError": "flux.integrations.remote.side:RemoteError",
    "remote.start_fetcher": "flux.integrations.remote.weight_stream:start_fetcher",
    "remote.secure_client": "flux.integrations.remote.auth:secure_client",
    "remote.make_keys": "flux.integrations.remote.auth:make_keys",
    "remote.KeysError": "flux.integrations.remote.auth:KeysError",
    # reward_url, rewards: [{url: ...}] (flux/integrations/rewards)
    "rewards.HttpReward": "flux.integrations.rewards.http:HttpReward",
    "rewards.adapt_foreign": "flux.integrations.rewards.styles:adapt_foreign",
    # prompts that are not JSONL (flux/integrations/data)
    "data.read_rows": "flux.integrations.data.hf_datasets:read_rows",
    "data.model_dir": "flux.integrations.data.hub:model_dir",  # model_path: a Hub id
    # logging.tensorboard, logging.wandb (flux/integrations/sinks)
    "sinks.tensorboard": "flux.integrations.sinks.tensorboard:TensorBoardSink",
    "sinks.wandb": "flux.integrations.sinks.wandb:WandbSink",
    # `flux status`, `flux plot`, the progress bar of `flux train` (flux/integrations/tools)
    "tools.Progress": "flux.integrations.tools.progress:Progress",
    "tools.watch": "flux.integrations.tools.status:watch",
    "tools.StatusError": "flux.integrations.tools.status:StatusError",
    "tools.plot_run_dir": "flux.integrations.tools.plot:plot_run_dir",
    "tools.PlotError": "flux.integrations.tools.plot:PlotError",
    # the built-in engine and torch learner on a CPU: threads that follow who computes (flux/integrations/cpu)
    "cpu.CoreShare": "flux.integrations.cpu.cores:CoreShare",
    # actors forked from the launcher where no GPU driver is (flux/integrations/cpu/fork.py)
    "cpu.preload": "flux.integrations.cpu.fork:preload",
    "cpu.Forked": "flux.integrations.cpu.fork:Forked",
    # model_path: builtin:tiny, prompts: builtin:<task> (flux/integrations/builtin)
    "builtin.resolve_model_path": "flux.integrations.builtin.tiny:resolve_model_path",
    "builtin.records": "flux.integrations.builtin.tasks:builtin_records",
    "builtin.eval_records": "flux.integrations.builtin.tasks:eval_records",
}


def hook(name: str) -> Any:
    """The object behind hook `name` (imported on first use)."""
    try:
        path = HOOKS[name]
    except KeyError:
        raise KeyError(f"no integration hook {name!r} (known: {', '.join(sorted(HOOKS))})") from None
    return pkgutil.resolve_name(path)


def resolve(dotted: str, what: str = "object") -> Any:
    """A user's `package.module:name` (a reward, a sink factory, an engine) → the object; ValueError with
    a one-line reason otherwise (`pkgutil.resolve_name`, as `hook` uses)."""
    module, sep, attr = dotted.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{dotted!r}: expected `module:{what}`")
    try:
        return pkgutil.resolve_name(dotted)
    except ImportError as e:
        raise ValueError(f"{dotted!r}: cannot import {module} ({e})") from None
    except AttributeError:
        raise ValueError(f"{dotted!r}: {module} has no {what} {attr}") from None
