"""The learner: model, optimizer, reference model, checkpoints; publishes every new policy version.

    for step in range(max_steps):
        batch  = ask the buffer for whole groups (freshest first, too-stale ones dropped)
        adv    = algorithm.advantages(rewards)     (DPO: keep the chosen/rejected pair of each group)
        proximal log-probs = current weights (decoupled PPO); reference log-probs; critic values
        (PPO: advantages and returns by GAE over the critic's values); measure staleness S on the batch
        learner.step(algorithm loss)                  → version += 1   (PPO: critic.step(value loss))
        publish weights (shared memory), tell the controller, report metrics
    save the final HF checkpoint; goodbye

With `learner.ranks` = M > 1 there are M learner processes (flux/integrations/distributed/data_parallel.py):
rank 0 runs this loop (`lead`) and hands each batch to ranks 1..M-1 (`follow`); every rank then trains on
its share of the batch in lockstep (`Trainer.train`). Only rank 0 talks to the buffer and the controller,
publishes and evaluates; a learner whose weights leave through collectives (FSDP, megatron TP/PP) has every
rank join rank 0's weight gathers and checkpoint saves, in rank 0's order.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import time

import numpy as np
import torch
import zmq

from flux.run import protocol as P
from flux.run.checkpoints import staging_dir
from flux.control.composer import add_lengths
from flux.learner.base import micro_batches as split_rows
from flux.run.runtime import TIMELINE, FluxRunError, Heartbeater, RunSpec, actor_main, actor_threads, set_threads


class BatchClient:
    """Asks the buffer for batches over a DEALER; waits, but gives up when the run stops."""

    def __init__(self, ctx, spec: RunSpec, stop, name: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(spec.buffer_router)
        self.stop = stop
        self.drops = P.DropCounter(name)

    def get(self, step: int, version: int, groups: int, asked: bool = False) -> P.Batch | None:
        """The batch of ``step``; ``asked``: its request went out already (``ask``)."""
        if not asked:
            self.ask(step, version, groups)
        while not self.stop.is_set():
            if self.sock.poll(100):
                _, msg = P.recv(self.sock, self.drops)
                if isinstance(msg, P.Batch) and msg.step == step:
                    return msg
        return None

    def ask(self, step: int, version: int, groups: int) -> None:
        P.send(self.sock, P.BatchRequest(step, version, groups))


def to_train_batch(batch: P.Batch, pad_id: int, version: int | None = None, eta_max: int | None = None):
    """Flat Batch → (TrainBatch with zero advantages, per-group rewards, per-group response lengths).

    Tokens sampled more than `eta_max` versions before `version` are masked out of the loss (and of the
    staleness signals): the hard lag bound, per token."""
    from flux.learner.torch_learner import TrainBatch

    groups = batch.to_groups()
    samples = []
    for g in groups:
        offsets = np.concatenate([[0], np.cumsum(g.response_lens)])
        for i in range(g.sample_count):
            a, b = offsets[i], offsets[i + 1]
            samples.append((g.prompt_ids, g.response_ids[a:b], g.logprobs[a:b], g.versions[a:b], 0.0))
    rewards = [torch.from_numpy(g.rewards.astype(np.float32)) for g in groups]
    lengths = [torch.from_numpy(g.response_lens.astype(np.int64)) for g in groups]
    tb = TrainBatch.from_samples(samples, pad_id)
    if eta_max is not None:
        tb.response_mask = tb.response_mask * ((version - tb.versions) <= eta_max).to(tb.response_mask.dtype)
    return tb, rewards, lengths


def preference_rows(advantages) -> torch.Tensor:
    """Row order for a preference algorithm: each group's chosen (+1) then rejected (−1) row, in group
    order; rows with advantage 0 are left out. Shape: advantages (b,) → (2·pairs,) long."""
    chosen = (advantages > 0).nonzero().flatten().tolist()
    rejected = (advantages < 0).nonzero().flatten().tolist()
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected rows")
    return torch.tensor([i for pair in zip(chosen, rejected) for i in pair], dtype=torch.long)


def micro_batches(tb, size: int = 0, pairs: bool = False, rank: int = 0, ranks: int = 1, tokens: int = 0):
    """This rank's micro-batches of `tb` (row-index tensors); None = the whole batch at once
    (flux.learner.base.micro_batches)."""
    parts = split_rows(tb.attention_mask.sum(-1).tolist(), size=size, tokens=tokens, pairs=pairs, rank=rank,
                       ranks=ranks)
    return None if parts is None else [torch.tensor(p, dtype=torch.long) for p in parts]


def all_finite(tensors) -> bool:
    """No NaN or inf in any of `tensors` (one reduction per tensor, no copies)."""
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def lr_at(step: int, total: int, lr: float, schedule: str, min_ratio: float, warmup: int = 0) -> float:
    """The learning rate of optimizer step `step` of `total`: transformers' scheduler `schedule` after
    `warmup` steps of linear warmup. A function of the step alone, so a resumed run continues exactly."""
    return lr * _lr_factor(schedule, total, min_ratio, warmup)(step)


@functools.lru_cache(maxsize=8)
def _lr_factor(schedule: str, total: int, min_ratio: float, warmup: int):
    """The multiplier `transformers.get_scheduler` would apply at each step (its LambdaLR's lambda).

    `cosine` is transformers' cosine_with_min_lr ending at min_ratio on the last step (total - 1); the
    others run over `total` steps; `constant` with warmup is constant_with_warmup."""
    from transformers import get_scheduler

    name, extra, horizon = schedule, {}, max(1, total)
    if schedule == "cosine":
        name, extra, horizon = "cosine_with_min_lr", {"min_lr_rate": min_ratio}, max(1, total - 1)
    elif schedule == "constant" and warmup:
        name = "constant_with_warmup"
    elif schedule == "warmup_stable_decay":  # decays over the last 10%, to min_ratio at the last step
        horizon = max(1, total - 1)
        extra = {"num_decay_steps": max(1, (horizon - warmup) // 10), "min_lr_ratio": min_ratio}
    dummy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    return get_scheduler(name, dummy, num_warmup_steps=warmup, num_training_steps=horizon,
                         scheduler_specific_kwargs=extra).lr_lambdas[0]


def reward_parts(metas: list[dict]) -> dict[str, float]:
    """`reward/<name>`: the batch's mean of each number the rewards returned besides the score (several
    rewards, or a reward's dict), over the groups that report it."""
    seen: dict[str, list[float]] = {}
    for meta in metas:
        for k, v in (meta.get("rewards") or {}).items():
            seen.setdefault(k, []).append(float(v))
    return {f"reward/{k}": float(np.mean(v)) for k, v in sorted(seen.items())}


class Trainer:
    """What every learner rank holds and does: the model(s), the algorithm, one optimizer step on a batch.

    Rank 0 hands each step's batch to the other ranks; all of them then call `train` in lockstep (each
    computes its own rows, see flux/integrations/distributed/data_parallel.py). Everything else a learner does — the
    buffer, the controller, publishing, evaluation — is rank 0's alone (`lead`); a `collective` learner's
    weight gathers and checkpoints take every rank (`follow`).
    """

    def __init__(self, spec: RunSpec, ranks):
        from flux.algorithms import get_algorithm
        from flux.hf import device_and_dtype
        from flux.learner import build_learner
        from flux.learner.torch_learner import TorchCritic
        from flux.plugins import hook

        cfg, lc = spec.config, spec.config.learner
        self.cfg, self.ranks = cfg, ranks
        self.algorithm = get_algorithm(cfg.algorithm)
        self.params = self.algorithm.params(cfg.algo)
        self.loss_fn = self.algorithm.bind(self.params)
        torch.manual_seed(cfg.seed)
        device, compute = device_and_dtype(lc.device, lc.dtype, ranks.rank if ranks.world > 1 else None)
        common = dict(weight_decay=lc.weight_decay, betas=tuple(lc.adam_betas), eps=lc.adam_eps,
                      no_decay=tuple(lc.no_decay), max_grad_norm=lc.max_grad_norm, seed=cfg.seed, device=device,
                      compute_dtype=compute, micro_batch_size=lc.micro_batch_size or None,
                      micro_batch_tokens=lc.micro_batch_tokens or None)
        if ranks.world > 1:
            common["ranks"] = ranks
        extra = {"gradient_checkpointing": True} if lc.gradient_checkpointing else {}
        if lc.backend == "megatron":
            extra.update(tensor_parallel=lc.tensor_parallel, pipeline_parallel=lc.pipeline_parallel)
        fsdp = lc.sharding == "fsdp"
        self.learner = build_learner("fsdp" if fsdp else lc.backend, spec.model_path, lr=lc.lr,
                                     temperature=cfg.rollout.temperature,
                                     reference=self.algorithm.wants_reference(self.params), **extra, **common)
        # A sharded learner gathers its weights to publish and save: every rank joins in (`collective`).
        self.collective = getattr(self.learner, "collective", False)
        self.critic = None
        if self.algorithm.value_loss is not None:  # data parallel over the policy's own data-parallel ranks
            common["ranks"] = self.learner.ranks if ranks.world > 1 else None  # (megatron: its DP group)
            critic = hook("distributed.FSDPCritic") if fsdp else TorchCritic
            self.critic = critic(spec.model_path, lr=lc.critic_lr or lc.lr, **common)
            self.value_loss_fn = self.algorithm.bind_value(self.params)

    def load(self, path: str) -> None:
        self.learner.load(path)
        if self.critic is not None:
            self.critic.load(f"{path}/critic")

    def save(self, path: str) -> str:
        saved = str(self.learner.save(path))
        # (every rank of a collective learner calls this; a critic of its own is written by rank 0 alone)
        if self.critic is not None and (self.ranks.rank == 0 or getattr(self.critic, "collective", False)):
            self.critic.save(f"{path}/critic")
        return saved

    def train(self, step: int, tb, group_rewards, group_lengths):
        """Advantages, log-probs, one optimizer step (PPO: and one critic step). Returns (batch, stats)."""
        cfg, lc, algorithm, params = self.cfg, self.cfg.learner, self.algorithm, self.params
        learner, critic = self.learner, self.critic
        adv_inputs = {"group_lengths": group_lengths, "max_new_tokens": cfg.rollout.max_new_tokens}
        if not algorithm.token_level:
            tb.advantages, _ = algorithm.compute_advantages(group_rewards, tb, params, **adv_inputs)
        if algorithm.preference:  # train on the (chosen, rejected) rows only, each pair adjacent
            tb = tb.select(preference_rows(tb.advantages))
        # The policy at the start of this step. Advantages that need it per token get a pass of their own;
        # otherwise the step's own forward pass gives it (Learner.step's fill_proximal).
        fused = not algorithm.token_level and len(tb) > 0
        t0 = time.monotonic()
        if not fused:
            tb.proximal_logprobs = learner.logprobs(tb)
        if learner.ref_model is not None:
            tb.ref_logprobs = learner.ref_logprobs(tb)
        if critic is not None:
            tb.values = critic.values(tb)  # the critic's values at the start of this step
        if algorithm.token_level:
            tb.advantages, tb.returns = algorithm.compute_advantages(group_rewards, tb, params, **adv_inputs)
        for group in learner.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.max_steps, lc.lr, lc.lr_schedule, lc.min_lr_ratio, lc.warmup_steps)
        parts = micro_batches(tb, lc.micro_batch_size, pairs=algorithm.preference, rank=learner.ranks.rank,
                              ranks=learner.ranks.world, tokens=lc.micro_batch_tokens)
        t1 = time.monotonic()
        stats = learner.step(self.loss_fn, tb, parts, fill_proximal=fused) if len(tb) else {"step_skipped": 1.0}
        if critic is not None and len(tb):
            stats.update({f"critic_{k}" if k in ("loss", "grad_norm", "lr", "step_skipped") else k: v
                          for k, v in critic.step(self.value_loss_fn, tb, parts).items()})
        # where the step's time went: separate no-grad passes (proximal, reference, critic values), and
        # the optimizer step (forward with grad, backward, update)
        stats.update(time_logprobs_s=t1 - t0, time_update_s=time.monotonic() - t1)
        return tb, stats


def body(spec: RunSpec, name: str, stop, log) -> int:
    cfg = spec.config
    set_threads(actor_threads(cfg, "learner"))
    from flux.learner.base import SingleRank
    from flux.plugins import hook

    # Before the models load, so that joining waits only for the other ranks' imports.
    from flux.hf import device_and_dtype

    device = device_and_dtype(cfg.learner.device, "fp32", int(os.environ.get("RANK", "0")))[0]  # NCCL or gloo
    ranks = SingleRank() if cfg.learner.ranks == 1 else \
        hook("distributed.RankGroup").from_env(device=device, timeout_s=cfg.learner.dist_timeout_s)
    if ranks.world != cfg.learner.ranks:
        raise RuntimeError(f"learner.ranks={cfg.learner.ranks} but this process was started as one of "
                           f"{ranks.world}")
    try:
        trainer = Trainer(spec, ranks)
        cores = hook("cpu.CoreShare")(spec, "learner", name)
        cores.follow(getattr(trainer.learner, "model", None))  # torch: threads follow who computes
        TIMELINE.mark("model")
        start = version = 0
        if spec.resume_from:  # every rank loads the model, optimizer and critic; the step and version
            trainer.load(spec.resume_from)
            with open(f"{spec.resume_from}/controller_state.json") as f:
                state = json.load(f)
            start, version = int(state["step"]), int(state["version"])
        if ranks.rank > 0:
            return follow(spec, trainer, cores, start, stop, log)
        return lead(spec, name, stop, log, trainer, cores, start, version)
    finally:
        ranks.close()


def checkpoint_dir(spec: RunSpec, step: int) -> str | None:
    """Where the checkpoint after `step` goes, or None when that step saves none."""
    every, last = spec.config.checkpoint.every, step == spec.config.max_steps - 1
    return f"{spec.run_dir}/checkpoints/step_{step + 1}" if last or (every and (step + 1) % every == 0) else None


def follow(spec: RunSpec, trainer: Trainer, cores, start: int, stop, log) -> int:
    """Ranks 1..M-1: train on each batch rank 0 hands out, until it says stop; a sharded learner also
    joins rank 0's weight gathers (publish, checkpoint) in rank 0's order."""
    step, learner = start, trainer.learner
    if spec.resume_from and trainer.collective:
        learner.export_weights()  # rank 0 publishes the checkpoint's weights
    for step in range(start, trainer.cfg.max_steps):
        cores.working(False)
        work = trainer.ranks.broadcast(None, stop)
        if work is None:
            break
        cores.working(True)
        _, stats = trainer.train(step, *work)
        if trainer.collective and not stats.get("step_skipped"):
            learner.export_weights()
        if trainer.collective and (final := checkpoint_dir(spec, step)) and trainer.ranks.broadcast(None, stop):
            trainer.save(str(staging_dir(final)))  # (the doorbell: not in a collective while rank 0 evaluates)
    log.info("learner rank %d leaves after step %d", trainer.ranks.rank, step + 1)
    return 0


def lead(spec: RunSpec, name: str, stop, log, trainer: Trainer, cores, start: int, version: int) -> int:
    """Rank 0 (with one rank: the learner): the learner loop of the module docstring."""
    from transformers import AutoTokenizer

    from flux.engine.base import SamplingParams
    from flux.engine.torch_engine import TorchEngine
    from flux.evaluation import eval_records, evaluate
    from flux.rewards import reward_pool
    from flux.control.staleness import batch_signals
    from flux.run.weights import WeightPublisher

    cfg, lc = spec.config, spec.config.learner
    learner, ranks = trainer.learner, trainer.ranks
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scorer = reward_pool(cfg, log)  # the evaluation's
    held_out = eval_records(cfg, tokenizer=tokenizer)
    evaluator = None
    eval_sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.eval.temperature,
                                   stop_token_ids=(tokenizer.eos_token_id,))
    publisher = WeightPublisher(spec.shm_prefix)

    ctx = zmq.Context()
    ctl = ctx.socket(zmq.DEALER)
    ctl.setsockopt(zmq.LINGER, 2000)
    ctl.connect(spec.controller_router)
    P.send(ctl, P.Register("learner", name, os.getpid(), socket.gethostname()))
    buffer = BatchClient(ctx, spec, stop, name)
    t_start, busy = time.monotonic(), 0.0
    heart = Heartbeater(ctx, spec, "learner", name, lambda: busy / max(1e-6, time.monotonic() - t_start))
    heart.start()

    def run_eval() -> dict:
        nonlocal evaluator
        if not held_out:
            return {}
        model = learner.eval_model()  # an HF model with the current weights (megatron: a refreshed twin)
        evaluator = evaluator or TorchEngine(model, seed=cfg.seed)
        return evaluate(evaluator, tokenizer, held_out, scorer.score, eval_sampling)

    if spec.resume_from:  # the generators start from the base model: give them the checkpoint's weights
        P.send(ctl, P.Published(version, publisher.publish(version, learner.export_weights())))
        log.info("resumed from %s at step %d, version %d", spec.resume_from, start, version)
    # In sync mode a generator computes only while the learner waits for its batch; an evaluation at the same
    # time would fight it for the cores (two processes at every core's thread count run many times slower),
    # so there the learner evaluates while the generator waits: after the first batch, before each publish.
    sync = cfg.adaptive_async.mode == "sync"
    # The first batch is asked for before the initial eval, so that (overlapped modes) the two overlap.
    buffer.ask(start, version, lc.groups_per_step)
    cores.working(True)
    last_eval = {} if sync else run_eval()
    log.info("learner up: %s, B=%d, %d rank(s), eval %s", trainer.algorithm.name, cfg.batch_samples,
             ranks.world, last_eval)
    TIMELINE.mark("ready", save=True)
    step, skipped = start, 0  # skipped: consecutive steps skipped for a non-finite gradient
    for step in range(start, cfg.max_steps):
        t_wait = time.monotonic()
        cores.working(False)
        batch = buffer.get(step, version, lc.groups_per_step, asked=step == start)
        cores.working(True)
        if sync and step == start and batch is not None:  # (its time counts as this step's wait for the batch;
            last_eval = run_eval()                        # before the broadcast: the other ranks wait at the store)
        # The other ranks get the same batch (None: stop) and train on their share of it in lockstep.
        work = ranks.broadcast(None if batch is None else
                               to_train_batch(batch, pad_id, version, cfg.adaptive_async.eta_max))
        if work is None:
            break
        TIMELINE.mark("first_batch")
        t0 = time.monotonic()
        tb, stats = trainer.train(step, *work)
        if not all_finite([tb.proximal_logprobs[tb.response_mask.bool()]]):
            raise FluxRunError(f"the policy's weights became non-finite at step {step - 1}: its log-probs on "
                               f"the batch of step {step} are NaN/inf (learner.lr={lc.lr:g}; try a smaller one)")
        rewards = torch.cat(work[1])
        trained_at = version
        if last := step == cfg.max_steps - 1:
            TIMELINE.mark("last_step")
        evaluating = last or (cfg.eval.every and (step + 1) % cfg.eval.every == 0)
        weights = None
        if stats.get("step_skipped"):  # its groups are dropped (the controller gives their credit back)
            skipped += 1
            log.warning("step %d skipped: non-finite gradient (%d in a row)", step, skipped)
            if skipped >= lc.max_skipped_steps:
                raise FluxRunError(f"{skipped} consecutive optimizer steps skipped for a non-finite gradient "
                                   f"(steps {step - skipped + 1}..{step}); learner.max_skipped_steps="
                                   f"{lc.max_skipped_steps}")
        else:
            skipped = 0
            t_pub = time.monotonic()
            weights = learner.export_weights()  # (a sharded learner's ranks all gather: see `follow`)
            if not all_finite(weights.values()):
                raise FluxRunError(f"the policy's weights became non-finite at step {step} "
                                   f"(learning rate {lc.lr:g}; try a smaller learner.lr)")
        t_eval = time.monotonic()
        if evaluating and sync:
            last_eval = run_eval()  # before the publish (see above), of the weights about to be published
        t_eval = time.monotonic() - t_eval
        if weights is not None:
            version += 1
            P.send(ctl, P.Published(version, publisher.publish(version, weights)))
            stats["time_publish_s"] = time.monotonic() - t_pub - t_eval
        # What the batch says about staleness, for the controller to turn into S (flux/control/staleness.py):
        # after the publish, so that generators waiting for the new weights need not wait for it too.
        stale = batch_signals(tb.proximal_logprobs, tb.behaviour_logprobs, tb.response_mask, tb.versions,
                              trained_at, tis_cap=float(trainer.params.get("tis_cap") or 2.0))
        step_s = time.monotonic() - t0 - t_eval
        busy += step_s
        if evaluating and not sync:  # overlapped modes: the generators go on with the new weights meanwhile
            last_eval = run_eval()
        saved = {}
        if final := checkpoint_dir(spec, step):  # staged; the controller completes and renames it
            if trainer.collective:
                ranks.broadcast(True)  # the other ranks wait for this at the store, then save with rank 0
            trainer.save(str(staging_dir(final)))
            saved = {"checkpoint": final}
        metrics = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            **stale,
            **{k: float(v) for k, v in stats.items()},
            "learner_busy_frac": busy / max(1e-6, time.monotonic() - t_start),
            "samples": len(batch.response_lens), "tokens": int(batch.response_lens.sum()),
            "masked_stale_tokens": int(batch.response_lens.sum()) - tb.num_tokens,  # older than eta_max
            "response_len_mean": float(batch.response_lens.mean()),
            "response_len_p50": float(np.percentile(batch.response_lens, 50)),
            "response_len_p99": float(np.percentile(batch.response_lens, 99)),
            "length_hist": add_lengths({}, batch.response_lens),
            "step_s": step_s, "batch_wait_s": t0 - t_wait,
            "dropped_in_batch": int(batch.dropped_stale),
            "group_ids": [int(g) for g in batch.group_ids],
            "prompts": [int(i) for i in batch.prompt_indices], **last_eval, **saved,
            **reward_parts(batch.metas),
        }
        P.send(ctl, P.StepReport(step, version, metrics))
        TIMELINE.mark("first_step", save=step == start)
    done = step == cfg.max_steps - 1 and not stop.is_set()
    log.info("learner %s after %d steps", "finished" if done else f"stopped ({stop.reason})", step + 1)
    P.send(ctl, P.Goodbye("learner", name, "finished" if done else stop.reason or "stopped", True))
    heart.halt.set()
    heart.join(2)
    publisher.close()
    scorer.close()
    ctl.close()
    buffer.sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    actor_main("learner", body)
