"""Held-out evaluation: generate on prompts never trained on and score them with the run's reward."""

from __future__ import annotations

from flux.data import eval_source, load_prompts, render_prompt, split_records, within_length


def eval_records(cfg, limit: int | None = None, tokenizer=None) -> list[dict]:
    """The first `limit` (default eval.num_prompts) records the run evaluates on (`all_eval_records`),
    those longer than data.max_prompt_length left out (a tokenizer is needed only then)."""
    records = within_length(all_eval_records(cfg), cfg, tokenizer)[0]
    return records[:cfg.eval.num_prompts if limit is None else limit]


def all_eval_records(cfg) -> list[dict]:
    """What `eval_source` names: a `builtin:<task>` source means that task's eval split, `split` the
    training data's held-out part."""
    source = eval_source(cfg)
    if not source:
        return []
    if source == "split":
        return split_records(cfg)[1]
    if source.startswith("builtin:"):
        from flux.plugins import hook

        return hook("builtin.eval_records")(source)
    return load_prompts(source, cfg.data)


def describe_eval(cfg, counts: dict | None = None) -> str:
    """One line: what the run evaluates on (the launcher prints it; `counts` the prompts left out as too
    long, from its data.json)."""
    source = eval_source(cfg)
    n = min(cfg.eval.num_prompts, len(all_eval_records(cfg)) - (counts or {}).get("eval_too_long", 0))
    if not source:
        return ("no held-out evaluation (set eval.prompts to a file, or eval.split_fraction to hold out part of "
                f"{cfg.prompts})")
    if source == "split":
        return (f"evaluating on {n} held-out prompts of {cfg.prompts} (eval.split_fraction "
                f"{cfg.eval.split_fraction:g}; they are never trained on)")
    if source.startswith("builtin:"):
        return f"evaluating on {n} held-out prompts of {source} (never trained on)"
    return f"evaluating on {n} prompts of {source}"


def evaluate(engine, tokenizer, records: list[dict], score, sampling) -> dict:
    """Mean reward and exact-answer rate over `records`. Returns {eval_score, eval_exact, eval_n,
    eval_reward_failed}: `score(samples)` gives a score or None (a failed reward call, see RewardPool) per
    flux.rewards.Sample; a failed one is left out of the mean and counted."""
    from flux.rewards import Sample, exact_match

    prompts = [render_prompt(r, tokenizer) for r in records]
    outs = engine.generate(prompts, sampling)
    texts = tokenizer.batch_decode([o.token_ids for o in outs], skip_special_tokens=True)
    scores = score([Sample(t, r, o.token_ids.tolist(), "stop" if o.finished else "length")
                    for t, r, o in zip(texts, records, outs)])
    ok = [float(s) for s in scores if s is not None]
    exact = [exact_match(t, r) for t, r in zip(texts, records) if "answer" in r]
    return {"eval_score": sum(ok) / max(1, len(ok)), "eval_exact": sum(exact) / max(1, len(exact)),
            "eval_n": len(records), "eval_reward_failed": len(scores) - len(ok)}
