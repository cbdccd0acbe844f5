"""The learner: model, optimizer, reference model, checkpoints; publishes every new policy version.

    for step in range(max_steps):
        batch  = ask the buffer for whole groups (freshest first, too-stale ones dropped)
        adv    = algorithm.advantages(rewards)     (DPO: keep the chosen/rejected pair of each group)
        proximal log-probs = current weights (decoupled PPO); reference log-probs; critic values
        (PPO: advantages and returns by GAE over the critic's values); measure staleness S on the batch
        learner.step(algorithm loss)                  → version += 1   (PPO: critic.step(value loss))
        publish weights (shared memory), tell the controller, report metrics
    save the final HF checkpoint; goodbye
"""

from __future__ import annotations

import json
import math
import os
import socket
import time

import numpy as np
import torch
import zmq

from flux import protocol as P
from flux.composer import balance
from flux.runtime import Heartbeater, RunSpec, actor_main, set_threads


class BatchClient:
    """Asks the buffer for batches over a DEALER; waits, but gives up when the run stops."""

    def __init__(self, ctx, spec: RunSpec, stop, name: str):
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(spec.buffer_router)
        self.stop = stop
        self.drops = P.DropCounter(name)

    def get(self, step: int, version: int, groups: int) -> P.Batch | None:
        P.send(self.sock, P.BatchRequest(step, version, groups))
        while not self.stop.is_set():
            if self.sock.poll(100):
                _, msg = P.recv(self.sock, self.drops)
                if isinstance(msg, P.Batch) and msg.step == step:
                    return msg
        return None


def to_train_batch(batch: P.Batch, pad_id: int):
    """Flat Batch → (TrainBatch with zero advantages, per-group rewards, per-group response lengths)."""
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
    return TrainBatch.from_samples(samples, pad_id), rewards, lengths


def preference_rows(advantages) -> torch.Tensor:
    """Row order for a preference algorithm: each group's chosen (+1) then rejected (−1) row, in group
    order; rows with advantage 0 are left out. Shape: advantages (b,) → (2·pairs,) long."""
    chosen = (advantages > 0).nonzero().flatten().tolist()
    rejected = (advantages < 0).nonzero().flatten().tolist()
    if len(chosen) != len(rejected):
        raise ValueError(f"{len(chosen)} chosen but {len(rejected)} rejected rows")
    return torch.tensor([i for pair in zip(chosen, rejected) for i in pair], dtype=torch.long)


def micro_batches(tb, size: int, pairs: bool = False):
    """Micro-batches of about `size` samples with near-equal token counts (None = the whole batch).

    With `pairs`, rows (2i, 2i+1) are a preference pair and always land in the same micro-batch.
    """
    if not size or size >= len(tb):
        return None
    lengths = tb.attention_mask.sum(-1).tolist()
    if not pairs:
        return [torch.tensor(rows) for rows in balance(lengths, math.ceil(len(lengths) / size))]
    pair_lengths = [lengths[i] + lengths[i + 1] for i in range(0, len(lengths), 2)]
    parts = balance(pair_lengths, math.ceil(len(lengths) / max(2, size)))
    return [torch.tensor([r for p in part for r in (2 * p, 2 * p + 1)]) for part in parts]


def lr_at(step: int, total: int, lr: float, schedule: str, min_ratio: float) -> float:
    """Cosine decay from lr to min_ratio·lr over the run (late RL steps are where policies wobble)."""
    if schedule == "constant" or total <= 1:
        return lr
    progress = step / (total - 1)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def body(spec: RunSpec, name: str, stop, log) -> int:
    cfg = spec.config
    set_threads(cfg.learner.threads)
    from transformers import AutoTokenizer

    from flux.algorithms import get_algorithm
    from flux.engine.base import SamplingParams
    from flux.engine.torch_engine import TorchEngine
    from flux.evaluation import eval_records, evaluate
    from flux.learner import build_learner
    from flux.learner.torch_learner import TorchCritic
    from flux.rewards import load_function
    from flux.staleness import batch_staleness
    from flux.weights import WeightPublisher

    algorithm = get_algorithm(cfg.algorithm)
    params = algorithm.params(cfg.algo)
    loss_fn = algorithm.bind(params)
    torch.manual_seed(cfg.seed)
    lc, aa, sc = cfg.learner, cfg.adaptive_async, cfg.staleness
    learner = build_learner(lc.backend, spec.model_path, lr=lc.lr, weight_decay=lc.weight_decay,
                            max_grad_norm=lc.max_grad_norm, micro_batch_size=lc.micro_batch_size or None,
                            temperature=cfg.rollout.temperature, reference=algorithm.wants_reference(params),
                            seed=cfg.seed)
    critic = None
    if algorithm.value_loss is not None:
        critic = TorchCritic(spec.model_path, lr=lc.critic_lr or lc.lr, weight_decay=lc.weight_decay,
                             max_grad_norm=lc.max_grad_norm, micro_batch_size=lc.micro_batch_size or None,
                             seed=cfg.seed)
        value_loss_fn = algorithm.bind_value(params)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    reward_fn = load_function(cfg.reward)
    held_out = eval_records(cfg.eval.prompts, cfg.eval.num_prompts)
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
        return evaluate(evaluator, tokenizer, held_out, reward_fn, eval_sampling)

    version = start = 0
    if spec.resume_from:  # model, optimizer, critic; the step and version the controller was at
        learner.load(spec.resume_from)
        if critic is not None:
            critic.load(f"{spec.resume_from}/critic")
        with open(f"{spec.resume_from}/controller_state.json") as f:
            state = json.load(f)
        start, version = int(state["step"]), int(state["version"])
        # The generators start from the base model: give them the checkpoint's weights as `version`.
        P.send(ctl, P.Published(version, publisher.publish(version, learner.export_weights())))
        log.info("resumed from %s at step %d, version %d", spec.resume_from, start, version)
    last_eval = run_eval()
    log.info("learner up: %s, B=%d, eval %s", algorithm.name, cfg.batch_samples, last_eval)
    step = start
    for step in range(start, cfg.max_steps):
        t_wait = time.monotonic()
        batch = buffer.get(step, version, lc.groups_per_step)
        if batch is None:
            break
        t0 = time.monotonic()
        tb, group_rewards, group_lengths = to_train_batch(batch, pad_id)
        rewards = torch.cat(group_rewards)
        adv_inputs = dict(group_lengths=group_lengths, max_new_tokens=cfg.rollout.max_new_tokens)
        if not algorithm.token_level:
            tb.advantages, _ = algorithm.compute_advantages(group_rewards, tb, params, **adv_inputs)
        if algorithm.preference:  # train on the (chosen, rejected) rows only, each pair adjacent
            tb = tb.select(preference_rows(tb.advantages))
        tb.proximal_logprobs = learner.logprobs(tb)  # the policy at the start of this step
        if learner.ref_model is not None:
            tb.ref_logprobs = learner.ref_logprobs(tb)
        if critic is not None:
            tb.values = critic.logprobs(tb)  # the critic's values at the start of this step
        if algorithm.token_level:
            tb.advantages, tb.returns = algorithm.compute_advantages(group_rewards, tb, params, **adv_inputs)
        stale = batch_staleness(tb.proximal_logprobs, tb.behaviour_logprobs, tb.response_mask, tb.versions,
                                version, eta_max=max(1, aa.eta_max), d_ref=sc.d_ref, w_lag=sc.w_lag,
                                metric=sc.metric)
        for group in learner.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.max_steps, lc.lr, lc.lr_schedule, lc.min_lr_ratio)
        parts = micro_batches(tb, lc.micro_batch_size, pairs=algorithm.preference)
        stats = learner.step(loss_fn, tb, parts) if len(tb) else {"step_skipped": 1.0}
        if critic is not None:
            stats.update({f"critic_{k}" if k in ("loss", "grad_norm", "lr", "step_skipped") else k: v
                          for k, v in critic.step(value_loss_fn, tb, parts).items()})
        if not stats.get("step_skipped"):
            version += 1
            handle = publisher.publish(version, learner.export_weights())
            P.send(ctl, P.Published(version, handle))
        step_s = time.monotonic() - t0
        busy += step_s
        last = step == cfg.max_steps - 1
        if last or (cfg.eval.every and (step + 1) % cfg.eval.every == 0):
            last_eval = run_eval()
        saved = {}
        if last or (lc.checkpoint_every and (step + 1) % lc.checkpoint_every == 0):
            path = f"{spec.run_dir}/checkpoints/step_{step + 1}"
            saved = {"checkpoint": str(learner.save(path))}
            if critic is not None:
                critic.save(f"{path}/critic")
        metrics = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "staleness_mean": stale["staleness"], **{k: v for k, v in stale.items() if k != "staleness"},
            **{k: float(v) for k, v in stats.items()},
            "learner_busy_frac": busy / max(1e-6, time.monotonic() - t_start),
            "samples": int(len(batch.response_lens)), "tokens": int(batch.response_lens.sum()),
            "response_len_mean": float(batch.response_lens.mean()),
            "step_s": step_s, "batch_wait_s": t0 - t_wait,
            "dropped_in_batch": int(batch.dropped_stale),
            "group_ids": [int(g) for g in batch.group_ids],
            "prompts": [int(i) for i in batch.prompt_indices], **last_eval, **saved,
        }
        P.send(ctl, P.StepReport(step, version, metrics))
    done = step == cfg.max_steps - 1 and not stop.is_set()
    log.info("learner %s after %d steps", "finished" if done else f"stopped ({stop.reason})", step + 1)
    P.send(ctl, P.Goodbye("learner", name, "finished" if done else stop.reason or "stopped", True))
    heart.halt.set()
    heart.join(2)
    publisher.close()
    ctl.close()
    buffer.sock.close()
    ctx.term()
    return 0


if __name__ == "__main__":
    actor_main("learner", body)
