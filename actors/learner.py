"""The learner: model, optimizer, reference model, checkpoints; publishes every new policy version.

    for step in range(max_steps):
        batch  = ask the buffer for whole groups (freshest first, too-stale ones dropped)
        adv    = algorithm.advantages(rewards)
        proximal log-probs = current weights (decoupled PPO); measure staleness S on the batch
        learner.step(algorithm loss)                  → version += 1
        publish weights (shared memory), tell the controller, report metrics
    save the final HF checkpoint; goodbye
"""

from __future__ import annotations

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


def to_train_batch(batch: P.Batch, algorithm, params: dict, pad_id: int):
    """Flat Batch → TrainBatch with advantages from the algorithm. Returns (TrainBatch, rewards (N,))."""
    from flux.learner.torch_learner import TrainBatch

    groups = batch.to_groups()
    sizes = {g.sample_count for g in groups}
    rewards = torch.from_numpy(np.concatenate([g.rewards for g in groups]).astype(np.float32))
    if len(sizes) == 1:  # the usual case: one (G, n) matrix
        adv = algorithm.advantages(rewards.view(len(groups), -1), **algorithm.advantage_kwargs(params))
        adv = adv.reshape(-1)
    else:
        adv = torch.cat([algorithm.advantages(torch.from_numpy(g.rewards)[None],
                                              **algorithm.advantage_kwargs(params)).reshape(-1)
                         for g in groups])
    samples, k = [], 0
    for g in groups:
        offsets = np.concatenate([[0], np.cumsum(g.response_lens)])
        for i in range(g.sample_count):
            a, b = offsets[i], offsets[i + 1]
            samples.append((g.prompt_ids, g.response_ids[a:b], g.logprobs[a:b], g.versions[a:b], adv[k]))
            k += 1
    return TrainBatch.from_samples(samples, pad_id), rewards


def micro_batches(tb, size: int):
    """Micro-batches of about `size` samples with near-equal token counts (None = the whole batch)."""
    if not size or size >= len(tb):
        return None
    lengths = tb.attention_mask.sum(-1).tolist()
    return [torch.tensor(rows) for rows in balance(lengths, math.ceil(len(lengths) / size))]


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
    from flux.learner.torch_learner import TorchLearner
    from flux.rewards import load_function
    from flux.staleness import batch_staleness
    from flux.weights import WeightPublisher

    algorithm = get_algorithm(cfg.algorithm)
    params = algorithm.params(cfg.algo)
    loss_fn = algorithm.bind(params)
    torch.manual_seed(cfg.seed)
    lc, aa, sc = cfg.learner, cfg.adaptive_async, cfg.staleness
    learner = TorchLearner(spec.model_path, lr=lc.lr, weight_decay=lc.weight_decay,
                           max_grad_norm=lc.max_grad_norm, micro_batch_size=lc.micro_batch_size or None,
                           temperature=cfg.rollout.temperature, reference=algorithm.wants_reference(params),
                           seed=cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec.model_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    reward_fn = load_function(cfg.reward)
    held_out = eval_records(cfg.eval.prompts, cfg.eval.num_prompts)
    evaluator = TorchEngine(learner.model, seed=cfg.seed)
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
        return evaluate(evaluator, tokenizer, held_out, reward_fn, eval_sampling) if held_out else {}

    version, last_eval = 0, run_eval()
    log.info("learner up: %s, B=%d, eval %s", algorithm.name, cfg.batch_samples, last_eval)
    step = 0
    for step in range(cfg.max_steps):
        t_wait = time.monotonic()
        batch = buffer.get(step, version, lc.groups_per_step)
        if batch is None:
            break
        t0 = time.monotonic()
        tb, rewards = to_train_batch(batch, algorithm, params, pad_id)
        tb.proximal_logprobs = learner.logprobs(tb)  # the policy at the start of this step
        if learner.ref_model is not None:
            tb.ref_logprobs = learner.ref_logprobs(tb)
        stale = batch_staleness(tb.proximal_logprobs, tb.behaviour_logprobs, tb.response_mask, tb.versions,
                                version, eta_max=max(1, aa.eta_max), d_ref=sc.d_ref, w_lag=sc.w_lag,
                                metric=sc.metric)
        for group in learner.optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.max_steps, lc.lr, lc.lr_schedule, lc.min_lr_ratio)
        stats = learner.step(loss_fn, tb, micro_batches(tb, lc.micro_batch_size))
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
            saved = {"checkpoint": str(learner.save(f"{spec.run_dir}/checkpoints/step_{step + 1}"))}
        metrics = {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "staleness_mean": stale["staleness"], **{k: v for k, v in stale.items() if k != "staleness"},
            **{k: float(v) for k, v in stats.items()},
            "learner_busy_frac": busy / max(1e-6, time.monotonic() - t_start),
            "samples": int(len(batch.response_lens)), "tokens": int(batch.response_lens.sum()),
            "response_len_mean": float(batch.response_lens.mean()),
            "step_s": step_s, "batch_wait_s": t0 - t_wait,
            "dropped_in_batch": int(batch.dropped_stale),
            "group_ids": [int(g) for g in batch.group_ids], **last_eval, **saved,
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
