"""Held-out evaluation: generate on prompts never trained on and score them with the run's reward."""

from __future__ import annotations

from flux.data import eval_source, held_out_records, load_prompts, render_prompt


def eval_records(cfg, limit: int | None = None) -> list[dict]:
    """The first `limit` (default eval.num_prompts) records the run evaluates on (`eval_source`): a
    `builtin:<task>` source means that task's eval split, `split` the training data's held-out part."""
    source = eval_source(cfg)
    limit = cfg.eval.num_prompts if limit is None else limit
    if not source:
        return []
    if source == "split":
        records = held_out_records(cfg)
    elif source.startswith("builtin:"):
        from flux.plugins import hook

        builtin_eval = hook("builtin.eval_records")

        records = builtin_eval(source)
    else:
        records = load_prompts(source)
    return records[:limit]


def describe_eval(cfg) -> str:
    """One line: what the run evaluates on (the launcher prints it)."""
    source, n = eval_source(cfg), len(eval_records(cfg))
    if not source:
        return ("no held-out evaluation (set eval.prompts to a file, or eval.split_fraction to hold out part of "
                f"{cfg.prompts})")
    if source == "split":
        return (f"evaluating on {n} held-out prompts of {cfg.prompts} (eval.split_fraction "
                f"{cfg.eval.split_fraction:g}; they are never trained on)")
    if source.startswith("builtin:"):
        return f"evaluating on {n} held-out prompts of {source} (never trained on)"
    return f"evaluating on {n} prompts of {source}"


def evaluate(engine, tokenizer, records: list[dict], reward_fn, sampling) -> dict:
    """Mean reward and exact-answer rate over `records`. Returns {eval_score, eval_exact, eval_n,
    eval_reward_failed}: a reward call that fails (`reward_fn` returned None, see RewardGuard) is left out
    of the mean and counted."""
    from flux.rewards import exact_match

    prompts = [render_prompt(r, tokenizer) for r in records]
    outs = engine.generate(prompts, sampling)
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    scores = [reward_fn(t, r) for t, r in zip(texts, records)]
    ok = [float(s) for s in scores if s is not None]
    exact = [exact_match(t, r) for t, r in zip(texts, records) if "answer" in r]
    return {"eval_score": sum(ok) / max(1, len(ok)), "eval_exact": sum(exact) / max(1, len(exact)),
            "eval_n": len(records), "eval_reward_failed": len(scores) - len(ok)}
