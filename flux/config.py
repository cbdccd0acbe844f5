"""One config tree of dataclasses: a docstring per field, one `validate()`.

`FluxConfig` is what `flux train CONFIG.yaml --set key=value` and `FluxTrainer(FluxConfig(...))` build.
Nested sections accept plain dicts (`FluxConfig(adaptive_async={"target_staleness": 0.1})`), so the
Python API, YAML and `--set rollout.group_size=8` all go through the same typed conversion. Any bad
key or value raises `ConfigError` naming the field.
"""

from __future__ import annotations

import dataclasses
import operator
import os
import re
import types
import typing
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flux.plugins import hook


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the field (and file)."""


MOVED = {"learner.checkpoint_every": "checkpoint.every", "staleness.metric": "staleness.signal"}  # renamed keys: the error says where they went


def _resolves(dotted: str) -> bool:
    """Whether `pkg.module:name` names something importable (flux.plugins.resolve); a module that fails
    to import is a config error naming why."""
    from flux.plugins import resolve

    try:
        resolve(dotted)
    except ValueError:
        return False
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(f"{dotted}: importing it raised {type(e).__name__}: {e}") from None
    return True


def _doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING, **limits):
    """A dataclass field whose docstring lives in its metadata (the docs page is generated from it), with
    the `limits` checked with the types: `low` (>=), `gt` (>), `high` (<=), `lt` (<), `choices`."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text, **limits})
    return field(default=default, metadata={"doc": text, **limits})


LIMITS = {"low": (operator.ge, ">="), "gt": (operator.gt, ">"), "high": (operator.le, "<="), "lt": (operator.lt, "<")}


@dataclass
class RolloutConfig:
    """Generators: how many, which engine, how they sample."""

    engine: str = _doc("Rollout engine: `torch` (built-in, CPU or GPU), `sglang` (an SGLang server "
                       "per generator, GPU; see docs/engines.md) or `pkg.module:factory` (your own).", "torch")
    num_generators: int = _doc("Generator processes started on this machine.", 1)
    group_size: int = _doc("Samples per prompt (n); GRPO/RLOO advantages are computed within a group.", 16, low=1)
    groups_per_call: int = _doc("Prompt groups a generator keeps in flight (the built-in engine's rows, a new group joining as "
                                "soon as rows are free: continuous batching; other engines: groups per `generate` call). "
                                "0 = the generator's share of a step, learner.groups_per_step / rollout.num_generators, made "
                                "in one wave; set it (e.g. that share) with several remote generators, or to cap memory.", 0, low=0)
    max_new_tokens: int = _doc("Completion length cap in tokens.", 8, low=1)
    temperature: float = _doc("Sampling temperature (the learner scores log-probs at the same one).", 1.0, gt=0)
    top_p: float = _doc("Nucleus sampling threshold (1.0 = off).", 1.0, gt=0, high=1)
    top_k: int = _doc("Top-k sampling (0 = off).", 0, low=0)
    update_mode: str = _doc("When new weights reach a busy engine: `inflight` (between decode steps, a "
                            "sequence may span versions) or `between_sequences`.", "inflight",
                            choices=("inflight", "between_sequences"))
    device: str = _doc("Where the built-in engine runs: `auto` (CUDA if present, else CPU), `cpu`, `cuda`, `cuda:N`.", "auto")
    dtype: str = _doc("Built-in engine weights: `auto` (bf16 on CUDA, fp32 on CPU), `bf16`, `fp16`, `fp32`. "
                      "Sampling always takes its log-softmax in fp32.", "auto",
                      choices=("auto", "bf16", "fp16", "fp32"))
    threads: int = _doc("torch intra-op threads per generator process; 0 = by mode and cores: in sync mode the "
                        "generators share every core (they and the learner take turns); otherwise each process "
                        "starts with an equal share, and on a CPU the actors computing at the moment share the "
                        "cores between them (flux/integrations/cpu/cores.py).", 0, low=0)
    slowdown: float = _doc("Extra seconds of sleep per generated token (a slower generator, for benchmarks).", 0.0, low=0)
    slowdown_schedule: list = _doc("Simulated slower/faster generation from a policy version on, used by "
                                   "benchmarks: `[[from_version, seconds_per_token], ...]` sorted by "
                                   "version. From the first listed version on, the entry for the engine's "
                                   "current version replaces `slowdown`; before it, `slowdown` applies.",
                                   factory=list)
    sglang_url: str = _doc("`engine: sglang`: URL of a running SGLang server (`http://HOST:PORT`), or a "
                           "comma-separated list with one per generator. It must serve `model_path`'s weights "
                           "when the run starts. Empty = each generator starts its own server.", "")
    sglang_port: int = _doc("`engine: sglang`: port of the server a generator starts (generator i uses "
                            "sglang_port + i); 0 = a free port.", 0)
    sglang_args: list = _doc("`engine: sglang`: more `sglang.launch_server` arguments for a started server, "
                             "e.g. [--mem-fraction-static, 0.5, --tp-size, 2].", factory=list)
    sglang_module: str = _doc("`engine: sglang`: the module a generator runs as the server, with `--model-path "
                              "--host --port` and sglang_args (change it only to wrap SGLang).",
                              "sglang.launch_server")
    sglang_startup_timeout_s: float = _doc("`engine: sglang`: seconds a started server may take to answer /health.", 900.0)
    sglang_restarts: int = _doc("`engine: sglang`: how many times a generator starts its own server again "
                                "after it died mid-run (the lost call's groups are re-queued, the new server "
                                "gets the newest weights); an external `sglang_url` is never restarted.", 2)
    sglang_pause_mode: str = _doc("`engine: sglang`: how new weights interrupt generation (/pause_generation "
                                  "mode): `abort` (requests end and are resubmitted with their tokens so far), "
                                  "`retract` (requests wait in the queue; the cache is flushed, so their KV is "
                                  "recomputed with the new weights) or `in_place` (requests keep running on "
                                  "their old KV; the cache is flushed once none is held).", "abort")
    sglang_weight_sync: str = _doc("`engine: sglang`: how weights reach the server: `tensor` "
                                   "(/update_weights_from_tensor; CUDA IPC handles on the same node, CPU tensors "
                                   "by value) or `distributed` (/update_weights_from_distributed, a broadcast "
                                   "from the generator to the server's ranks).", "tensor")
    sglang_bucket_mb: int = _doc("`engine: sglang`: size cap of one flattened weight bucket (MiB).", 512)
    sglang_group_backend: str = _doc("`engine: sglang`, `weight_sync: distributed`: backend of the weight-update "
                                     "group, `nccl` (GPU) or `gloo`.", "nccl")
    sglang_group_host: str = _doc("`engine: sglang`, `weight_sync: distributed`: this machine's address as the "
                                  "server reaches it (empty = net.host).", "")


# transformers.get_scheduler names Flux takes (`cosine` is its cosine_with_min_lr; the others by name)
LR_SCHEDULES = ("cosine", "linear", "constant", "polynomial", "cosine_with_restarts", "inverse_sqrt",
                "warmup_stable_decay")

@dataclass
class LearnerConfig:
    """The learner: optimisation and checkpoints."""

    backend: str = _doc("Training backend: `torch` (plain PyTorch) or `megatron` (megatron-core: Llama, "
                        "Qwen2, Qwen3; tensor, pipeline and data parallel; needs `flux-rlhf[megatron]`; "
                        "docs/megatron.md), or `pkg.module:LearnerClass` (your own `flux.learner.base.Learner`).",
                        "torch")
    groups_per_step: int = _doc("Prompt groups per optimizer step; B = groups_per_step * group_size.", 8, low=1)
    lr: float = _doc("AdamW learning rate.", 1e-3, gt=0)
    critic_lr: float = _doc("Learning rate of the critic (PPO's value model; 0 = same as lr).", 0.0, low=0)
    lr_schedule: str = _doc("Learning-rate schedule over max_steps, by `transformers.get_scheduler`: `cosine` "
                            "(to min_lr_ratio * lr at the last step), `linear` (towards 0), `constant`, or "
                            "`polynomial`, `cosine_with_restarts`, `inverse_sqrt`, `warmup_stable_decay` (decay over "
                            "the last 10%); each after warmup_steps of linear warmup from 0 (transformers' "
                            "curves exactly: the first warmup step has lr 0).", "cosine", choices=LR_SCHEDULES)
    warmup_steps: int = _doc("Optimizer steps of linear warmup from 0 to lr before the schedule.", 0, low=0)
    min_lr_ratio: float = _doc("Final learning rate as a fraction of lr (cosine schedule).", 0.1, low=0, high=1)
    weight_decay: float = _doc("AdamW weight decay (decoupled), on weight matrices only: never on 1-D parameters "
                               "(biases, norm weights) nor on the no_decay ones.", 0.0)
    no_decay: list = _doc("Parameters whose name contains one of these (case-insensitive) get no weight decay "
                          "either (e.g. embed_tokens).", factory=lambda: ["bias", "norm"])
    adam_betas: list = _doc("AdamW (beta1, beta2).", factory=lambda: [0.9, 0.99])
    adam_eps: float = _doc("AdamW epsilon.", 1e-8, gt=0)
    max_grad_norm: float = _doc("Gradient clipping norm.", 1.0)
    micro_batch_size: int = _doc("About this many samples per forward/backward, the batch split into "
                                 "ceil(rows / N) micro-batches of near-equal token counts (0 = whole batch).", 0, low=0)
    micro_batch_tokens: int = _doc("Padded tokens per forward/backward, rows packed longest-first so a long "
                                   "tail does not pad every row to it (0 = off; overrides micro_batch_size).", 0, low=0)
    device: str = _doc("Where the learner trains (`backend: torch`, `megatron`): `auto` (CUDA when present, "
                       "else CPU), `cpu`, `cuda`, `cuda:N`.", "auto")
    dtype: str = _doc("Compute precision: `fp32`, or `bf16` (autocast: bf16 matmuls; master weights, gradients, "
                      "AdamW state and the log-softmax stay fp32); `auto` = bf16 on CUDA, fp32 on CPU.", "auto",
                      choices=("auto", "bf16", "fp32"))
    gradient_checkpointing: bool = _doc("Recompute activations in backward instead of keeping them "
                                        "(`backend: torch`): less memory, about a third more compute.", False)
    threads: int = _doc("torch intra-op threads per learner process; 0 = by mode and cores (see "
                        "rollout.threads).", 0, low=0)
    max_skipped_steps: int = _doc("Stop the run with an error after this many consecutive optimizer steps "
                                  "skipped for a non-finite gradient (a skipped step's groups are dropped and "
                                  "counted as `step_skipped`).", 3, low=1)
    ranks: int = _doc("Learner processes. Data parallel: each rank (megatron: each tensor-parallel group) "
                      "holds the whole model (see `sharding`), trains on its share of every batch (rows split by "
                      "token count) and the gradients are summed over the ranks (gloo on CPU), so a step equals "
                      "the one-process step on the whole batch. Rank 0 talks to the buffer and controller, "
                      "publishes weights, evaluates and saves. micro_batch_size applies per rank.", 1, low=1)
    local_ranks: int = _doc("Learner ranks `flux train` starts on this machine (0 = all `ranks`): ranks "
                            "local_ranks..ranks-1 join from other machines with `flux learner --join` over the "
                            "run's CURVE endpoint (needs net.remote; docs/remote.md).", 0, low=0)
    tensor_parallel: int = _doc("`backend: megatron`: ranks that split every layer (megatron-core tensor "
                                "parallelism); the `ranks` are tensor_parallel x pipeline_parallel x data "
                                "parallel.", 1, low=1)
    pipeline_parallel: int = _doc("`backend: megatron`: pipeline stages, each holding an even share of the "
                                  "layers (megatron-core's 1F1B schedule over the micro-batches).", 1, low=1)
    sharding: str = _doc("How `ranks > 1` hold the model: `replicate` (each rank the whole model and AdamW "
                         "state; gradients all-reduced) or `fsdp` (FSDP2: each rank 1/ranks of every parameter, "
                         "gradient and AdamW state; weights gathered on rank 0 to publish and save). Both take "
                         "the one-process step on the whole batch.", "replicate", choices=("replicate", "fsdp"))
    dist_timeout_s: float = _doc("`ranks > 1`: seconds a learner rank waits in a torch.distributed collective "
                                 "(or to join the group) before failing the run; bounds a hung rank.", 300.0, gt=0)


@dataclass
class CheckpointConfig:
    """Checkpoints: RUN_DIR/checkpoints/step_N, each written whole or not at all (flux/run/checkpoints.py)."""

    every: int = _doc("Save a checkpoint (HF model, optimizer, controller state) every N steps (0 = only at "
                      "the end).", 0, low=0)
    keep_last: int = _doc("Keep only the newest N checkpoints (0 = keep all).", 0, low=0)


@dataclass
class AdaptiveAsyncConfig:
    """How far generation may run ahead of training (docs/concepts.md, "Admission")."""

    mode: str = _doc("`sync` (a = 0), `async` (a = max_async_ratio) or `adaptive` (PID on staleness).",
                     "adaptive", choices=("sync", "async", "adaptive"))
    target_staleness: float = _doc("Staleness S the adaptive controller holds (its recent RMS; 0..1).", 0.1, low=0, high=1)
    min_async_ratio: float = _doc("Lower clamp of the async ratio a.", 0.0)
    max_async_ratio: float = _doc("Upper clamp of the async ratio a.", 1.0)
    initial_async_ratio: float = _doc("a at the start of an adaptive run. 0: synchronous until the batches show "
                                      "that a lead is harmless (from 0, full lead takes ~45 steps of fresh batches).", 0.0)
    eta_max: int = _doc("Largest allowed lead in optimizer steps: tokens sampled more than eta_max versions "
                        "before the step that trains them are masked out of the loss, a group with none left "
                        "is dropped.", 4, low=0)
    kp: float = _doc("PID proportional gain (per unit of error in its input, S²/target). Small: S is noisy and "
                     "spiky, and a steady lead trains faster than one that swings at the same staleness.", 0.3)
    ki: float = _doc("PID integral gain (per step).", 0.2)
    kd: float = _doc("PID derivative gain (on the measurement).", 0.0)
    ema_horizon: float = _doc("EMA horizon in steps for the measured staleness.", 5.0, low=1)


@dataclass
class StalenessConfig:
    """S = w_lag*min(1, lag/eta_max) + (1-w_lag)*min(1, excess/d_ref), excess = signal above its lag-0 floor."""

    signal: str = _doc("What S measures: `k3` (KL(behaviour || current) estimate, nats/token), `ess_loss` "
                       "(1 - ESS/N of the importance weights) or `is_cap` (tokens over the IS cap).", "k3",
                       choices=("k3", "ess_loss", "is_cap"))
    w_lag: float = _doc("Weight of the version-lag term in S (the signal's term gets 1 - w_lag). The lag "
                        "is set by admission, i.e. by the controller itself: 0 keeps it out of the loop.", 0.0,
                        low=0, high=1)
    d_ref: float = _doc("Signal excess (above the lag-0 floor) at which S saturates at 1.", 0.1, gt=0)
    floor_window: int = _doc("Recent batches with lag-0 tokens that estimate the floor.", 20, low=1)


@dataclass
class EvalConfig:
    """Held-out evaluation by the learner."""

    prompts: str = _doc("What to evaluate on: a prompts JSONL, `builtin:<task>` (the task's own held-out split), "
                        "`auto` (the training task's held-out split when `prompts` is a built-in task, else "
                        "the eval.split_fraction held out of the training prompts, else nothing; never another "
                        "task), or empty (no evaluation). The run prints what it evaluates on.", "auto")
    split_fraction: float = _doc("With eval.prompts `auto` and a prompts file: this fraction of its records is held "
                                 "out (by a seeded hash of the record index) and evaluated on, never trained on; "
                                 "0 = no evaluation.", 0.0, low=0, lt=1)
    every: int = _doc("Evaluate every N steps (0 = only before the first and after the last step).", 0, low=0)
    num_prompts: int = _doc("Held-out prompts per evaluation.", 200, low=1)
    temperature: float = _doc("Sampling temperature for evaluation (0 = greedy).", 0.0)


@dataclass
class DataConfig:
    """How the rows of `prompts` become records (column names, length limit)."""

    prompt_key: str = _doc("Column holding the prompt: a string, or a chat list of {role, content} (TRL's "
                           "conversational format, verl's parquet `prompt`).", "prompt")
    messages_key: str = _doc("Column holding a chat list of {role, content}, used when a row has no prompt_key.",
                             "messages")
    answer_key: str = _doc("Column holding the reference answer (`a.b` reaches into a nested column); a row "
                           "without it falls back to verl's `reward_model.ground_truth`. Rewards see it as "
                           "`answer`; every column stays in the record.", "answer")
    split: str = _doc("Split of a saved dataset directory or a Hub dataset to train on.", "train")
    max_prompt_length: int = _doc("Prompts longer than this many tokens (as rendered for the model) are left "
                                  "out of training and evaluation, counted in data.json and the start-up line "
                                  "(0 = no limit).", 0, low=0)


@dataclass
class NetConfig:
    """Sockets and liveness."""

    host: str = _doc("Address of the TCP sockets a run opens for itself (SGLang servers, their weight-update "
                     "groups); the local actors talk over ipc:// sockets in a private directory, remote "
                     "generators over `remote_host`.", "127.0.0.1")
    heartbeat_s: float = _doc("Seconds between heartbeats.", 0.5)
    heartbeat_timeout_s: float = _doc("An actor silent this long is declared dead.", 5.0)
    remote: bool = _doc("Open the run to remote generators (`flux generator --connect`): CURVE-encrypted "
                        "endpoints that only keys in `keys`/authorized may use (docs/remote.md). Local actors "
                        "keep their own endpoints on `host`.", False)
    remote_host: str = _doc("Address the remote (CURVE) endpoints bind to: 127.0.0.1 unless you ask for "
                            "another, e.g. 0.0.0.0 or one interface's address.", "127.0.0.1")
    remote_port: int = _doc("Port of the controller's CURVE endpoint, the one address remote generators "
                            "connect to; the PUB, buffer PULL and weight server take the next three ports "
                            "(open port..port+3 in a firewall; port+4: the learner group, with "
                            "learner.local_ranks). 0 = free ports; `flux train` prints the "
                            "address, and generators learn the others from it.", 0)
    keys: str = _doc("Key directory made by `flux keys DIR` (server key pair, authorized/ client keys); "
                     "needed with `remote`.", "")
    weight_chunk_kb: int = _doc("Chunk size of the weight stream to remote generators, KiB (a multiple of "
                                "64 bytes).", 4096)
    weight_window: int = _doc("Weight chunks a remote generator keeps requested ahead (flow control).", 4)
    weight_stream: str = _doc("How weights reach remote generators: `curve` (encrypted and authenticated, like "
                              "every remote endpoint) or `plain` (unencrypted TCP, for a trusted network: a "
                              "request needs the token its generator got over CURVE, withdrawn when it leaves; "
                              "several times faster where CURVE's encryption is the bottleneck, docs/remote.md).",
                              "curve")


@dataclass
class LoggingConfig:
    """Where each step's metrics go besides metrics.jsonl (which is always written)."""

    tensorboard: bool = _doc("Also write TensorBoard event files to RUN_DIR/tensorboard (needs the "
                             "`tensorboard` package; without it the run logs one warning and goes on).",
                             False)
    wandb: dict = _doc("Also log to Weights & Biases: {project, name, mode (`online`, `offline` or `disabled`), "
                       "entity, tags, group}; needs the `wandb` package (flux-rlhf[wandb]). Empty = off.",
                       factory=dict)
    sinks: list = _doc("More metrics sinks: dotted paths `module:factory`, each called once as "
                       "factory(run_dir, config) -> an object with write(step, metrics) and close().",
                       factory=list)


@dataclass
class FluxConfig:
    """A whole Flux job."""

    model_path: str = _doc("HF model directory, a Hub id (`Qwen/Qwen2.5-0.5B`: from the local HF cache, "
                           "downloaded only where HF_HUB_OFFLINE is not set), or `builtin:tiny` for the embedded "
                           "default (warm-started on the run's built-in task; `builtin:tiny:<task>` names one).",
                           "builtin:tiny")
    prompts: str = _doc("Training prompts: a JSONL/JSON/parquet/CSV file, a directory saved by `datasets`, a "
                        "Hub dataset id in the local HF cache (read with `datasets`, see `data`), or "
                        "`builtin:<task>` (built-in tasks `sort`, `repeat`). For DPO, a preference JSONL of {prompt, chosen, rejected} trains offline (`builtin:sort_pairs` "
                        "is the built-in one); a prompts file trains online DPO on sampled pairs.",
                        "builtin:sort")
    reward: str = _doc("Reward function `module:function`: fn(completion, record) -> float (or a dict with "
                       "`score` and more numbers, logged), TRL's reward_func(prompts, completions, **columns) "
                       "or verl's compute_score(data_source, solution_str, ground_truth, extra_info), "
                       "recognised by their parameter names.", "flux.rewards:char_match")
    rewards: list = _doc("Several rewards instead of `reward`: [{fn: module:function, weight: 1.0, name: ...}, "
                         "{url: http://..., weight: ...}, ...]; the reward is their weighted sum, each one logged "
                         "as reward/<name>.", factory=list)
    reward_url: str = _doc("A reward served over HTTP instead of `reward`: each prompt group's samples are POSTed "
                           "as one JSON batch, answered with a score each (docs/usage.md#rewards).", "")
    reward_workers: int = _doc("Reward calls in flight at once, beside the engine (threads for plain functions; "
                               "`async def` rewards and HTTP requests share the same limit; threads start only as calls need them).", 128, low=1)
    reward_timeout_s: float = _doc("Seconds one reward call (one HTTP attempt) may take; a call past it fails "
                                   "(0 = no limit).", 30.0, low=0)
    reward_retries: int = _doc("HTTP rewards: how many times a request that fails to connect, times out or is "
                               "answered 429/5xx is sent again.", 2, low=0)
    reward_max_failure_rate: float = _doc("A reward call that raises, times out or returns NaN/inf/a non-number "
                                          "drops its sample's group (counted as `reward_failed`); the run stops "
                                          "with an error when more than this share of the last 200 calls "
                                          "failed.", 0.5, low=0, high=1)
    algorithm: str = _doc("Algorithm: `grpo`, `ppo`, `dpo`, `rloo`, `reinforce`, `reinforce_pp`, `dapo`, "
                          "or a dotted path `module:name` to an Algorithm registered outside Flux.", "grpo")
    algo: dict = _doc("Algorithm hyper-parameters overriding its defaults, e.g. {kl_coef: 0.01}.",
                      factory=dict)
    dynamic_sampling: bool = _doc("DAPO dynamic sampling: drop zero-reward-variance groups (counted) and "
                                  "admit replacements. Always on for DPO (a flat group makes no pair).", False)
    seed: int = _doc("Seed for data order, sampling and initialisation.", 0)
    max_steps: int = _doc("Optimizer steps to run.", 800, low=1)
    out: str = _doc("Run directory (created); empty = runs/<timestamp>.", "")
    rollout: RolloutConfig = _doc("Generators.", factory=RolloutConfig)
    learner: LearnerConfig = _doc("Learner.", factory=LearnerConfig)
    checkpoint: CheckpointConfig = _doc("Checkpoints.", factory=CheckpointConfig)
    adaptive_async: AdaptiveAsyncConfig = _doc("Async ratio control.", factory=AdaptiveAsyncConfig)
    staleness: StalenessConfig = _doc("Staleness definition.", factory=StalenessConfig)
    data: DataConfig = _doc("Prompt columns.", factory=DataConfig)
    eval: EvalConfig = _doc("Held-out evaluation.", factory=EvalConfig)
    net: NetConfig = _doc("Sockets.", factory=NetConfig)
    logging: LoggingConfig = _doc("Metrics sinks.", factory=LoggingConfig)

    def __post_init__(self):
        # Sections given as dicts (the Python API) go through the same typed conversion as YAML.
        for name, hint in typing.get_type_hints(type(self)).items():
            value = getattr(self, name)
            if dataclasses.is_dataclass(hint) and isinstance(value, dict):
                setattr(self, name, _build(hint, value, name))

    @property
    def batch_samples(self) -> int:
        """B: samples per optimizer step."""
        return self.learner.groups_per_step * self.rollout.group_size

    def validate(self) -> "FluxConfig":
        """Check types, ranges and names; raise ConfigError naming the first bad field."""
        _check_leaves(self)
        r, lr, a = self.rollout, self.learner, self.adaptive_async
        checks = [
            ("rollout.engine", r.engine in ("torch", "sglang") or _resolves(r.engine),
             "must be `torch`, `sglang` or an importable `pkg.module:factory`"),
            ("rollout.num_generators", r.num_generators >= (0 if self.net.remote else 1),
             "must be >= 1 (0 only with net.remote: generators then all attach with `flux generator`)"),
            ("rollout.slowdown_schedule", _valid_schedule(r.slowdown_schedule),
             "must be [[from_version, seconds_per_token], ...] with versions >= 0 increasing, seconds >= 0"),
            ("learner.backend", lr.backend in ("torch", "megatron") or _resolves(lr.backend),
             "must be `torch`, `megatron` or an importable `pkg.module:LearnerClass`"),
            ("learner.adam_betas", len(lr.adam_betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1
                                                                  for b in lr.adam_betas), "must be two numbers in [0, 1)"),
            ("learner.no_decay", all(isinstance(k, str) and k for k in lr.no_decay), "must be a list of names"),
            ("learner.ranks", lr.ranks == 1 or lr.backend in ("torch", "megatron"),
             "several ranks need learner.backend=torch or megatron"),
            *((f"learner.{k}", n == 1 or lr.backend == "megatron" and lr.ranks % (lr.tensor_parallel *
               lr.pipeline_parallel) == 0, "needs learner.backend=megatron and ranks a multiple of "
               "tensor_parallel x pipeline_parallel") for k, n in (("tensor_parallel", lr.tensor_parallel),
                                                                  ("pipeline_parallel", lr.pipeline_parallel))),
            ("learner.sharding", lr.sharding == "replicate" or lr.ranks > 1 and lr.backend == "torch",
             "fsdp needs learner.backend=torch and learner.ranks >= 2"),
            ("learner.local_ranks", lr.local_ranks <= lr.ranks and (lr.local_ranks in (0, lr.ranks) or self.net.remote),
             "must be at most learner.ranks; fewer needs net.remote (the other ranks join over it)"),
            ("adaptive_async.min_async_ratio", 0 <= a.min_async_ratio <= a.max_async_ratio <= 1,
             "need 0 <= min_async_ratio <= max_async_ratio <= 1"),
            ("adaptive_async.initial_async_ratio",
             a.min_async_ratio <= a.initial_async_ratio <= a.max_async_ratio, "must lie in [min, max]"),
            ("adaptive_async.max_async_ratio", a.mode == "sync" or a.max_async_ratio * a.eta_max >= 0.5, "times eta_max "
             "must be >= 0.5 outside sync mode: the lead is whole steps, round(ratio x eta_max), and 0 is sync"),
            ("net.heartbeat_timeout_s", self.net.heartbeat_timeout_s > self.net.heartbeat_s > 0,
             "need heartbeat_timeout_s > heartbeat_s > 0"),
            ("logging.wandb", set(self.logging.wandb) <= {"project", "name", "mode", "entity", "tags", "group"}
             and self.logging.wandb.get("mode", "online") in ("online", "offline", "disabled"),
             "takes project, name, mode (online/offline/disabled), entity, tags, group"),
            ("logging.sinks", all(isinstance(p, str) and ":" in p for p in self.logging.sinks),
             "must be a list of dotted paths `module:factory`"),
            *((f"{k}.device", re.fullmatch(r"auto|cpu|cuda(:\d+)?", s.device) is not None,
               "must be auto, cpu, cuda or cuda:N") for k, s in (("rollout", self.rollout), ("learner", self.learner))),
            ("reward_url", self.reward_url == "" or self.reward_url.startswith(("http://", "https://")),
             "must be an http:// or https:// URL"),
            ("prompts", bool(self.prompts.strip()), "must be a JSONL path or `builtin:<task>`"),
            ("reward", ":" in self.reward, "must be a dotted path `module:function`"),
            ("rewards", all(isinstance(r, dict) and isinstance(r.get("weight", 1.0), (int, float)) and (
                (isinstance(r.get("fn"), str) and ":" in r["fn"] and not set(r) - {"fn", "weight", "name"})
                or (str(r.get("url", "")).startswith(("http://", "https://")) and not set(r) - {"url", "weight", "name"}))
                            for r in self.rewards),
             "must be a list of {fn: module:function, weight: number, name: text} or {url: http://..., ...}"),
        ]
        checks += hook("sglang.config_checks")(r) + hook("remote.config_checks")(self.net)  # their own settings
        for name, ok, why in checks:
            if not ok:
                raise ConfigError(f"{name}: {why} (got {_get(self, name)!r})")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] = (), **kwargs) -> FluxConfig:
    """YAML file (optional) + `key=value` overrides (+ keyword overrides) → a validated FluxConfig."""
    data: dict = {}
    where = "config"
    if path:
        where = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping of config keys")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {p} is not a section")
        node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
    for key, value in kwargs.items():
        if value is not None:
            data[key] = value
    try:
        return _build(FluxConfig, data, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def dump_config(cfg: FluxConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_fields(cls=FluxConfig, prefix: str = ""):
    """Yield (dotted key, type name, default, doc) for every leaf field: the configuration reference."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            yield from config_fields(hint, f"{prefix}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            yield f"{prefix}{f.name}", getattr(hint, "__name__", str(hint)), default, f.metadata.get("doc", "")


def _build(cls, data: dict, path: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{path}.{key}" if path else str(key)
        if dotted == "staleness.metric" and value == "k3" and "signal" not in data:  # an older run's config
            key, dotted = "signal", "staleness.signal"
        if key not in names:
            if dotted in MOVED:
                raise ConfigError(f"{dotted}: moved to {MOVED[dotted]}")
            raise ConfigError(f"{dotted}: unknown key (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = value if isinstance(value, hint) else _build(hint, value, dotted)
        else:
            kwargs[key] = _coerce(value, hint, dotted)
    return cls(**kwargs)


def _check_leaves(node, prefix: str = "") -> None:
    """Every leaf holds its declared type, converted as YAML values are: the Python API can pass anything."""
    hints = typing.get_type_hints(type(node))
    for f in dataclasses.fields(node):
        value, hint, dotted = getattr(node, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{dotted}: expected a mapping of {hint.__name__} keys, got {value!r}")
            _check_leaves(value, f"{dotted}.")
        else:
            setattr(node, f.name, value := _coerce(value, hint, dotted))
            for limit, (holds, sign) in LIMITS.items():
                if limit in f.metadata and not holds(value, f.metadata[limit]):
                    raise ConfigError(f"{dotted}: must be {sign} {f.metadata[limit]} (got {value!r})")
            if value not in f.metadata.get("choices", (value,)):
                *first, last = f.metadata["choices"]
                raise ConfigError(f"{dotted}: must be {', '.join(first)} or {last} (got {value!r})")


def _coerce(value: Any, hint: Any, dotted: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in typing.get_args(hint):
            if arm is type(None) and value is None:
                return None
            with suppress(ConfigError):
                return _coerce(value, arm, dotted)
        raise ConfigError(f"{dotted}: {value!r} does not fit {hint}")
    target = origin or hint
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is float and isinstance(value, str):  # YAML 1.1 reads `1e-3` as a string
        with suppress(ValueError):
            return float(value)
    if target is int and isinstance(value, bool):
        raise ConfigError(f"{dotted}: expected int, got {value!r}")
    if target is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if target is str and isinstance(value, os.PathLike):  # FluxConfig(out=Path(...)), fit(prompts=Path(...))
        return os.fspath(value)
    if isinstance(value, target):
        return value
    raise ConfigError(f"{dotted}: expected {getattr(target, '__name__', target)}, got {value!r}")


def _valid_schedule(schedule: list) -> bool:
    """`[[from_version, seconds_per_token], ...]`: int ≥ 0 and finite float ≥ 0 pairs, versions increasing."""
    pairs = all(isinstance(p, (list, tuple)) and len(p) == 2 and type(p[0]) is int and p[0] >= 0
                and type(p[1]) in (int, float) and 0 <= p[1] < float("inf") for p in schedule)  # (NaN fails)
    return pairs and all(a[0] < b[0] for a, b in zip(schedule, schedule[1:]))


def _get(cfg: FluxConfig, dotted: str):
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node
