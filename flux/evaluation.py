"""Held-out evaluation: generate on prompts never trained on and score them with the run's reward."""

from __future__ import annotations

from flux.data import load_prompts, render_prompt


def eval_records(source: str, limit: int) -> list[dict]:
    """The first `limit` held-out records: a `builtin:<task>` source means that task's eval split."""
    if not source:
        return []
    if source.startswith("builtin:"):
        from flux.plugins import hook

        builtin_eval = hook("builtin.eval_records")

        records = builtin_eval(source)
    else:
        records = load_prompts(source)
    return records[:limit]


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
