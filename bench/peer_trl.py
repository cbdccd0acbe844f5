"""Flux against a synchronous peer: TRL's `GRPOTrainer` on the same model, task and batch, on CPU.

    python bench/peer_trl.py [--workload sort|longtail] [--steps 100] [--repeats 1] [--seed 0]
                             [--trl-threads 1 2] [--set KEY=VALUE ...] [--only trl flux-sync flux-adaptive flux-async]
                             [--json bench/results/peer_trl[_<workload>].json] [--plot ...png]

`--workload` is one of bench/async_modes.py's: `sort` (the built-in task at its defaults) or `longtail`
(the built-in repeat task, completions of 2 to 49 tokens: a sync step mostly generates, and HF
`generate` decodes every batch until its longest completion ends). Its overrides come before `--set`.

Runs back to back and never in parallel (they would compete for the cores), each for the same number
of optimizer steps of the same number of samples:

    trl-<n>t       `trl.GRPOTrainer` with n torch threads, one process: HF `generate`, then the update
    flux-sync      `flux train`, adaptive_async.mode=sync
    flux-adaptive  `flux train`, adaptive_async.mode=adaptive (the default)
    flux-async     `flux train`, adaptive_async.mode=async (only with --only ... flux-async)

`--repeats N` runs the whole sequence N times, interleaved, so that load from other processes on a
shared machine falls on every system alike; the table then gives medians (samples/s range alongside),
the JSON every repeat, and the plot the last repeat's curves.

The TRL run is configured from the resolved Flux config (`trl_config_kwargs`, overrides included): the
embedded model (already SFT-warm-started), the training split of the sort task, the run's reward through
`trl_reward`, num_generations = rollout.group_size, max_completion_length = rollout.max_new_tokens, the
same temperature, groups_per_step × group_size samples per optimizer step and one update per batch
(on-policy), AdamW (lr, β = (0.9, 0.99), weight decay), cosine decay to min_lr_ratio × lr, grad clip,
and GRPO's clip range, KL coefficient (0 by default: no reference model), std scaling and loss
aggregation (Flux's `token-mean` is TRL's `dapo`). Both sides are scored greedily on the held-out split
before and after with Flux's own `flux.evaluation.evaluate`, so the eval columns compare like with like.

Timing. `samples/s` is steady training throughput, the same rule for both systems: the samples of the
steps between the first and the last, over the seconds between their step reports (each row's `wall_s`).
The first step (start-up, Flux's initial evaluation beside its first generation) and the last (Flux
evaluates and writes its final checkpoint before it reports that step; TRL after) are left out.
`cumul./s` is the cumulative rate at the last step, samples over the seconds since the first sample was
asked for (Flux: the controller's first admission; TRL: `on_train_begin`): it charges Flux for both
evaluations and the checkpoint, TRL for neither. `wall s` is the run's last step since its process
started work (Flux: the controller's start; TRL: the worker's start, imports included), and `process s`
is the whole subprocess as this script timed it. Flux runs at its default thread counts (sync: each
phase gets every core; adaptive: one thread per actor); TRL is one process; it runs once per
`--trl-threads` value (default 1 and 2, the whole machine: on a shared machine two OpenMP threads can be
several times slower than one), and `× TRL` is over the faster.

TRL is an optional dependency of this bench only (`pip install -e ".[bench]"`); it runs in a subprocess
of this script (`--trl-worker`), so its imports and threads stay out of the Flux runs. Without TRL the
Flux rows still run and the TRL row says why it failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's flux, installed or not
sys.path.insert(0, str(Path(__file__).resolve().parent))
from async_modes import WORKLOADS
from common import have_matplotlib, machine, mean, run_train, write_json

TRL = "trl"
# name → adaptive_async.mode; flux-async (the most overlap Flux allows) runs only when asked for
FLUX_RUNS = {"flux-sync": "sync", "flux-adaptive": "adaptive", "flux-async": "async"}
DEFAULT_RUNS = [TRL, "flux-sync", "flux-adaptive"]
# Columns TRL passes to a reward function that are not the prompt record's own.
TRL_REWARD_EXTRAS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")
# Flux's loss aggregation (`algo.agg`) → TRL's `loss_type` with the same normalisation.
TRL_LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo", "token-sum-norm": "dr_grpo"}
# Per-step seconds a run's rows may carry: Flux's learner compute and wait for a batch; TRL's whole
# step and the part of it before the reward call (prompt tokenization + HF generate).
TIMING = ("step_s", "batch_wait_s", "generate_s")


# ---- pure parts: config mapping, reward adapter, summaries, table -----------------------------------

def trl_config_kwargs(cfg, steps: int, seed: int, out_dir: str) -> dict:
    """A resolved `FluxConfig` (algorithm `grpo`) → `trl.GRPOConfig` keyword arguments, same recipe.

    One generation batch per optimizer step (steps_per_generation 1, num_iterations 1): every update is
    on-policy, as in Flux's sync mode. The clip range, KL coefficient, std scaling and loss aggregation
    come from the run's GRPO parameters (`algo:` overrides included). TRL's cosine goes from lr to
    min_lr_ratio·lr over `steps` (Flux's over steps − 1: the last step's lr differs by a hair).
    ValueError when the config has no TRL equivalent.
    """
    from flux.algorithms import get_algorithm

    if cfg.algorithm != "grpo":
        raise ValueError(f"algorithm={cfg.algorithm}: this bench compares GRPO only")
    algo = get_algorithm(cfg.algorithm).params(cfg.algo)
    if algo["agg"] not in TRL_LOSS_TYPES:
        raise ValueError(f"algo.agg={algo['agg']}: TRL has no such loss aggregation")
    r, lc = cfg.rollout, cfg.learner
    cosine = lc.lr_schedule == "cosine"
    return {
        "output_dir": out_dir, "seed": seed, "data_seed": seed, "max_steps": steps,
        "num_generations": r.group_size, "max_completion_length": r.max_new_tokens,
        "temperature": r.temperature, "top_p": r.top_p, "top_k": r.top_k,
        "per_device_train_batch_size": cfg.batch_samples, "gradient_accumulation_steps": 1,
        "steps_per_generation": 1, "num_iterations": 1,
        "learning_rate": lc.lr, "weight_decay": lc.weight_decay, "adam_beta1": 0.9, "adam_beta2": 0.99,
        "max_grad_norm": lc.max_grad_norm, "warmup_steps": 0,
        "lr_scheduler_type": "cosine_with_min_lr" if cosine else "constant",
        "lr_scheduler_kwargs": {"min_lr_rate": lc.min_lr_ratio} if cosine else {},
        "beta": algo["kl_coef"], "epsilon": algo["clip_low"], "epsilon_high": algo["clip_high"],
        "loss_type": TRL_LOSS_TYPES[algo["agg"]], "scale_rewards": "group" if algo["scale_std"] else "none",
        "use_cpu": True, "bf16": False, "fp16": False, "gradient_checkpointing": False,
        "logging_steps": 1, "save_strategy": "no", "report_to": "none", "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def trl_reward(fn, name: str | None = None):
    """A Flux reward `fn(completion, record) -> float` as a TRL reward function.

    TRL calls `reward(prompts=[...], completions=[...], completion_ids=[...], **columns)` with one list
    entry per completion, every other dataset column as a list of the same length, and a few non-column
    extras (`trainer_state`, `log_metric`, ...), and wants one float per completion. The record handed
    to `fn` is the prompt's row again: `prompt` plus those columns (`answer`, `task`, ...). A
    conversational completion (a list of messages) is scored on its last message's content.
    """
    def reward(prompts: list, completions: list, **kwargs) -> list[float]:
        n = len(completions)
        columns = {k: v for k, v in kwargs.items()
                   if k not in TRL_REWARD_EXTRAS and isinstance(v, list) and len(v) == n}
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            if isinstance(completion, list):
                completion = completion[-1]["content"] if completion else ""
            record = {"prompt": prompt, **{k: v[i] for k, v in columns.items()}}
            out.append(float(fn(completion, record)))
        return out

    reward.__name__ = name or getattr(fn, "__name__", "reward")  # TRL logs rewards/<name>/mean
    return reward


def summarize(rows: list[dict], process_s: float | None = None, evals: dict | None = None) -> dict:
    """One run's per-step rows (Flux's metrics.jsonl, or the TRL worker's) → the table/JSON fields.

    Reward: mean over the first 5 steps → over the last 10%. samples/s: the run's cumulative rate at its
    last step. Eval before/after: the rows' first and last `eval_score`, unless `evals` gives them.
    """
    k, j = max(1, len(rows) // 10), min(5, len(rows))
    evals = evals or {}
    timing = {f"{key}_mean": mean(r[key] for r in rows) for key in TIMING if key in rows[0]}
    return {
        "steps": len(rows),
        "samples": sum(int(r.get("samples", 0)) for r in rows),
        "wall_s": rows[-1]["wall_s"],
        "process_s": process_s,
        "samples_per_s": steady_rate(rows),
        "cumulative_samples_per_s": rows[-1]["samples_per_s"],
        "reward_first": mean(r["reward_mean"] for r in rows[:j]),
        "reward_last": mean(r["reward_mean"] for r in rows[-k:]),
        "eval_before": evals.get("eval_before", rows[0].get("eval_score")),
        "eval_after": evals.get("eval_after", rows[-1].get("eval_score")),
        **timing,
    }


def steady_rate(rows: list[dict]) -> float:
    """Samples/s over the steps between the first and the last: their samples over the seconds between the
    first and the second-to-last step report (a run of fewer than 3 steps: the cumulative rate)."""
    if len(rows) < 3 or rows[-2]["wall_s"] <= rows[0]["wall_s"]:
        return rows[-1]["samples_per_s"]
    return sum(int(r.get("samples", 0)) for r in rows[1:-1]) / (rows[-2]["wall_s"] - rows[0]["wall_s"])


def combine(repeats: list[dict]) -> dict:
    """Several repeats of one system (summaries) → one: the median of every timing, the mean of reward
    and eval, and each repeat's samples/s in `samples_per_s_all` so the spread shows."""
    out = {}
    for key, first in repeats[0].items():
        values = [r.get(key) for r in repeats]
        if key in ("steps", "samples") or any(v is None for v in values):
            out[key] = first
        elif key.startswith(("reward_", "eval_")):
            out[key] = mean(values)
        else:
            out[key] = statistics.median(values)
    out["samples_per_s_all"] = [r["samples_per_s"] for r in repeats]
    return out


def ratios(summaries: dict[str, dict]) -> dict[str, float]:
    """samples/s of every run over the fastest TRL run's (the peer at its best; empty without one)."""
    peers = [s["samples_per_s"] for name, s in summaries.items() if name.startswith(TRL)]
    if not peers:
        return {}
    ref = max(peers)
    return {name: s["samples_per_s"] / ref for name, s in summaries.items()}


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _spread(s: dict) -> str:
    """min–max samples/s over the repeats ("-" for one run)."""
    rates = s.get("samples_per_s_all", [])
    return f"{min(rates):.0f}–{max(rates):.0f}" if len(rates) > 1 else "-"


def format_table(summaries: dict[str, dict], errors: dict[str, str] | None = None) -> str:
    """Fixed-width table, one row per run; `× TRL` is samples/s over the fastest TRL run's."""
    ratio = ratios(summaries)
    lines = [(f"{'system':<14} {'steps':>5} {'samples':>7} {'wall s':>6} {'process s':>9} {'samples/s':>9} "
              f"{'range':>9} {'× TRL':>6} {'cumul./s':>8} {'reward first 5 → last 10%':>25} "
              f"{'held-out eval before → after':>28}")]
    for name, s in summaries.items():
        reward = f"{s['reward_first']:.3f} → {s['reward_last']:.3f}"
        evals = f"{_num(s['eval_before'], '.3f')} → {_num(s['eval_after'], '.3f')}"
        lines.append(f"{name:<14} {s['steps']:>5} {s['samples']:>7} {s['wall_s']:>6.0f} "
                     f"{_num(s['process_s'], '.0f'):>9} {s['samples_per_s']:>9.1f} {_spread(s):>9} "
                     f"{_num(ratio.get(name), '.2f'):>6} {_num(s.get('cumulative_samples_per_s'), '.1f'):>8} "
                     f"{reward:>25} {evals:>28}")
    for name, err in (errors or {}).items():
        lines.append(f"{name:<14} failed: {err}")
    return "\n".join(lines)


def markdown_table(summaries: dict[str, dict]) -> str:
    """The same numbers as a Markdown table (for the README)."""
    ratio = ratios(summaries)
    lines = [("| system | steps | samples | wall s | samples/s | range | × TRL | cumul./s "
              "| reward, first 5 → last 10% | held-out eval, before → after |"), "|---" * 10 + "|"]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['steps']} | {s['samples']} | {s['wall_s']:.0f} "
                     f"| {s['samples_per_s']:.1f} | {_spread(s)} "
                     f"| {_num(ratio.get(name), '.2f')} | {_num(s.get('cumulative_samples_per_s'), '.1f')} "
                     f"| {s['reward_first']:.3f} → {s['reward_last']:.3f} "
                     f"| {_num(s['eval_before'], '.3f')} → {_num(s['eval_after'], '.3f')} |")
    return "\n".join(lines)


# ---- the TRL side (a subprocess: `--trl-worker`) ----------------------------------------------------

def grpo_config(kwargs: dict):
    """`trl.GRPOConfig(**kwargs)`, with gradient_checkpointing under transformers 5's name when it has it."""
    from trl import GRPOConfig

    kwargs = dict(kwargs)
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(GRPOConfig)}:
        kwargs["activation_checkpointing"] = kwargs.pop("gradient_checkpointing")
    return GRPOConfig(**kwargs)


def trl_worker(steps: int, seed: int, threads: int, overrides: list[str], out: Path) -> None:
    """Train with TRL's GRPOTrainer; write out/metrics.jsonl (one row per step) and out/evals.json."""
    t_start = time.time()
    os.environ["HF_HUB_OFFLINE"] = "1"  # no downloads, ever
    import torch

    torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from flux.config import load_config
    from flux.engine.base import SamplingParams
    from flux.engine.torch_engine import TorchEngine
    from flux.evaluation import eval_records, evaluate
    from flux.rewards import load_function
    from flux.integrations.builtin.tasks import builtin_records
    from flux.integrations.builtin.tiny import resolve_model_path

    cfg = load_config(None, overrides, max_steps=steps, seed=seed)
    if not cfg.prompts.startswith("builtin:"):
        raise SystemExit(f"prompts={cfg.prompts}: this bench runs the built-in tasks only")
    path = resolve_model_path(cfg.model_path, cfg.prompts)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    reward_fn = load_function(cfg.reward)
    held_out = eval_records(cfg)
    sampling = SamplingParams(cfg.rollout.max_new_tokens, cfg.eval.temperature,
                              stop_token_ids=(tokenizer.eos_token_id,))

    def run_eval() -> float | None:
        if not held_out:
            return None
        score = lambda samples: [reward_fn(s.completion, s.record) for s in samples]  # noqa: E731
        return evaluate(TorchEngine(model, seed=seed), tokenizer, held_out, score, sampling)["eval_score"]

    evals = {"eval_before": run_eval()}
    rows: list[dict] = []
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.jsonl"
    metrics.write_text("")
    marks: dict[str, float] = {}
    flux_reward = trl_reward(reward_fn, cfg.reward.rpartition(":")[2])

    def timed_reward(*a, **kw):  # TRL scores right after generating: the first call ends generation
        marks.setdefault("scored", time.time())
        return flux_reward(*a, **kw)

    timed_reward.__name__ = flux_reward.__name__

    class Rows(TrainerCallback):
        """One row per optimizer step from TRL's per-step log (logging_steps=1), with its timing."""

        def on_train_begin(self, args, state, control, **kw):
            marks["train"] = time.time()

        def on_step_begin(self, args, state, control, **kw):
            marks.pop("scored", None)
            marks["step"] = time.time()

        def on_step_end(self, args, state, control, **kw):
            marks["step_end"] = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            if not logs or "reward" not in logs:
                return  # the end-of-training summary log
            now = time.time()
            samples = cfg.batch_samples * (len(rows) + 1)
            row = {"step": len(rows), "reward_mean": float(logs["reward"]), "samples": cfg.batch_samples,
                   "wall_s": now - t_start, "samples_per_s": samples / (now - marks["train"]),
                   "step_s": marks["step_end"] - marks["step"],
                   "generate_s": marks.get("scored", marks["step_end"]) - marks["step"],
                   "lr": logs.get("learning_rate"), "completion_len": logs.get("completions/mean_length")}
            rows.append(row)
            with open(metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"trl step {row['step'] + 1}/{steps}  reward {row['reward_mean']:.3f}  "
                  f"{row['samples_per_s']:.1f} samples/s  {row['wall_s']:.0f}s", flush=True)

    trainer = GRPOTrainer(
        model=model, processing_class=tokenizer, reward_funcs=timed_reward,
        args=grpo_config(trl_config_kwargs(cfg, steps, seed, str(out / "trainer"))),
        train_dataset=Dataset.from_list(builtin_records(cfg.prompts.removeprefix("builtin:"))),
        callbacks=[Rows()],
    )
    trainer.train()
    evals["eval_after"] = run_eval()
    import trl

    evals["versions"] = {"trl": trl.__version__, "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__}
    (out / "evals.json").write_text(json.dumps(evals))


def run_trl(name: str, args, threads: int, out: Path) -> tuple[list[dict], dict, float, str | None]:
    """The TRL worker as a subprocess, output to out/bench.log. Returns (rows, evals, seconds, error)."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, __file__, "--trl-worker", "--out", str(out), "--steps", str(args.steps),
           "--seed", str(args.seed), "--trl-threads", str(threads)]
    for item in args.overrides:
        cmd += ["--set", item]
    print(f"{name}: running {args.steps} steps in {out}", file=sys.stderr, flush=True)
    t0 = time.monotonic()
    with open(out / "bench.log", "w") as log:
        proc = subprocess.run(cmd, check=False, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    seconds = time.monotonic() - t0
    print(f"{name}: exit {proc.returncode} after {seconds:.0f}s", file=sys.stderr, flush=True)
    metrics, evals = out / "metrics.jsonl", out / "evals.json"
    rows = [json.loads(x) for x in metrics.read_text().splitlines()] if metrics.exists() else []
    if proc.returncode != 0 or not rows or not evals.exists():
        tail = (out / "bench.log").read_text(errors="replace").strip().splitlines()
        return rows, {}, seconds, (tail or [f"exit code {proc.returncode}"])[-1]
    return rows, json.loads(evals.read_text()), seconds, None


# ---- plot and main ----------------------------------------------------------------------------------

def plot(runs: dict[str, list[dict]], summaries: dict[str, dict], path: str) -> None:
    """Reward (moving mean) vs wall time and vs step for every run, and a bar of each run's samples/s."""
    from flux.integrations.tools.plot import pyplot, save, smooth

    plt = pyplot()
    fig, (ax_w, ax_s, ax_b) = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [3, 3, 2]})
    color = {name: f"C{i}" for i, name in enumerate(summaries)}
    for name, rows in runs.items():
        w = max(1, len(rows) // 20)
        reward = [r["reward_mean"] for r in rows]
        for ax, x in ((ax_w, [r["wall_s"] for r in rows]), (ax_s, [r["step"] for r in rows])):
            ax.plot(x, reward, c=color[name], alpha=0.25, lw=0.8)
            ax.plot(x, smooth(reward, w), c=color[name], label=f"{name} ({w}-step mean)")
    ax_w.set(xlabel="wall time since the process started (s)", ylabel="mean reward",
             title="reward vs wall time")
    ax_s.set(xlabel="step (same samples per step)", ylabel="mean reward", title="reward vs step")
    names = list(summaries)
    rates = [summaries[n]["samples_per_s"] for n in names]
    ratio = ratios(summaries)
    bars = ax_b.bar(names, rates, color=[color[n] for n in names])
    labels = [f"{v:.0f}" + (f"\n{ratio[n]:.2f}× TRL" if n in ratio else "") for n, v in zip(names, rates)]
    ax_b.bar_label(bars, labels, fontsize=9)
    ax_b.set(ylabel="samples/s (training)", title="throughput", ylim=(0, 1.2 * max(rates)))
    for ax in (ax_w, ax_s, ax_b):
        ax.grid(alpha=0.3)
    ax_w.legend(fontsize=8)
    fig.tight_layout()
    save(fig, path)


def plan(only: list[str], trl_threads: list[int]) -> list[tuple[str, int]]:
    """The runs in order as (name, TRL threads or 0 for a Flux run); one TRL run per thread count."""
    out = []
    for name in only:
        if name != TRL:
            out.append((name, 0))
        elif len(trl_threads) == 1:
            out.append((TRL, trl_threads[0]))
        else:
            out += [(f"{TRL}-{t}t", t) for t in trl_threads]
    return out


def _children_cpu_s() -> float:
    """User + system CPU seconds of every finished child process (and theirs) so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["sort", "longtail"], default="sort",
                    help="bench/async_modes.py's workload: its config overrides come before --set")
    ap.add_argument("--steps", type=int, default=100, help="optimizer steps per run (same for all three)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-threads", type=int, nargs="+", default=[1, 2],
                    help="torch threads of the TRL process; several values: one TRL run each (trl-1t, ...)")
    ap.add_argument("--only", nargs="+", choices=[TRL, *FLUX_RUNS], default=DEFAULT_RUNS,
                    help=f"systems to run, in this order (default: {' '.join(DEFAULT_RUNS)})")
    ap.add_argument("--repeats", type=int, default=1,
                    help="run the whole sequence this many times, interleaved; the table shows medians")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="Flux config override, applied to every run, TRL's mapping included (repeatable)")
    ap.add_argument("--json", default=None, help="default: bench/results/peer_trl.json (sort), "
                                                      "bench/results/peer_trl_<workload>.json otherwise")
    ap.add_argument("--plot", default=None, help="default: the JSON's path with .png")
    ap.add_argument("--runs-dir", default=None, help="keep the run directories here (default: a temp dir)")
    ap.add_argument("--trl-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:  # (its --set already holds the workload's overrides)
        trl_worker(args.steps, args.seed, args.trl_threads[0], args.overrides, Path(args.out))
        return 0
    args.overrides = [*WORKLOADS[args.workload][0], *args.overrides]
    suffix = "" if args.workload == "sort" else f"_{args.workload}"
    args.json = args.json or f"bench/results/peer_trl{suffix}.json"
    args.plot = args.plot or str(Path(args.json).with_suffix(".png"))

    tmp = None if args.runs_dir else tempfile.TemporaryDirectory()
    root = Path(args.runs_dir or tmp.name)
    runs: dict[str, list[dict]] = {}  # the last repeat's rows, for the plot
    repeats: dict[str, list[dict]] = {}
    errors: dict[str, str] = {}
    versions: dict = {}
    try:
        for rep in range(args.repeats):
            for name, threads in plan(args.only, args.trl_threads):
                out = root / f"r{rep}" / name
                load, cpu0 = os.getloadavg()[0], _children_cpu_s()
                if threads:
                    rows, evals, seconds, err = run_trl(name, args, threads, out)
                    versions = evals.pop("versions", versions)
                else:
                    sets = [f"seed={args.seed}", *args.overrides, f"adaptive_async.mode={FLUX_RUNS[name]}"]
                    t0 = time.monotonic()
                    rows, _, err = run_train(name, sets, args.steps, out)
                    seconds, evals = time.monotonic() - t0, None
                if err:
                    errors[f"{name} (repeat {rep + 1})"] = err
                    continue
                # Other processes on the machine stretch wall time but barely CPU time: both are recorded.
                summary = summarize(rows, seconds, evals)
                summary.update(cpu_s=_children_cpu_s() - cpu0, load_1m_before=load)
                runs[name] = rows
                repeats.setdefault(name, []).append(summary)
    finally:
        if tmp is not None:
            tmp.cleanup()

    summaries = {name: combine(reps) for name, reps in repeats.items()}
    print(format_table(summaries, errors))
    for name, s in summaries.items():
        parts = [f"{k} {s[k + '_mean']:.3f} s" for k in TIMING if k + "_mean" in s]
        loads = ", ".join(f"{r['load_1m_before']:.1f}" for r in repeats[name])
        print(f"{name}: per step {', '.join(parts)}; {s['cpu_s']:.0f} CPU s; 1-min load before: {loads}")
    result = {"machine": {**machine(), **versions},
              "args": {k: v for k, v in vars(args).items() if k not in ("trl_worker", "out")},
              "runs": summaries, "repeats": repeats, "errors": errors, "ratio_vs_trl": ratios(summaries),
              "markdown": markdown_table(summaries)}
    write_json(args.json, result)
    if not have_matplotlib():
        return 1 if errors else 0
    if runs:
        plot(runs, summaries, args.plot)
        print(f"wrote {args.plot}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
