"""TRL's and verl's reward signatures, called unchanged (flux.rewards.adapt sends them here).

- TRL (a `completions` parameter): `reward_func(prompts, completions, completion_ids, **columns) ->
  list[float]`, called once per prompt group by keyword (conversational records get TRL's message
  lists), the records' other keys as columns — each argument only if the function takes it;
- verl (`solution_str` and `ground_truth` parameters): `compute_score(data_source, solution_str,
  ground_truth, extra_info=None)`, once per sample, with `data_source`, `reward_model.ground_truth`
  (else `answer`) and `extra_info` from the record.
"""

from __future__ import annotations

import inspect
from typing import Callable

from flux.rewards import Part, Sample


def adapt_foreign(fn: Callable) -> Part:
    """A TRL- or verl-style function as a Part, told apart by its parameter names."""
    params = inspect.signature(fn).parameters
    names = set(params)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    name = getattr(fn, "__name__", "reward")

    def wants(key: str) -> bool:
        return key in names or var_kw

    if "completions" in names:  # TRL: batched lists in (by name), a list of floats out
        def trl(samples: list[Sample]):
            chat = ["messages" in s.record for s in samples]
            kw = {"completions": [[{"role": "assistant", "content": s.completion}] if c else s.completion
                                  for s, c in zip(samples, chat)]}
            for key in {k for s in samples for k in s.record} - {"prompt", "messages"}:
                if wants(key):
                    kw[key] = [s.record.get(key) for s in samples]
            if wants("completion_ids"):
                kw["completion_ids"] = [list(s.completion_ids or []) for s in samples]
            if wants("prompts"):
                kw["prompts"] = [s.prompt for s in samples]
            return fn(**kw)
        return Part(name, trl, batched=True, is_async=inspect.iscoroutinefunction(fn))

    def verl(s: Sample):  # verl's compute_score: one sample at a time
        truth = (s.record.get("reward_model") or {}).get("ground_truth", s.record.get("answer"))
        kw = {"extra_info": s.record.get("extra_info", {})} if wants("extra_info") else {}
        if wants("data_source"):
            kw["data_source"] = s.record.get("data_source", "")
        return fn(solution_str=s.completion, ground_truth=truth, **kw)
    return Part(name, verl, is_async=inspect.iscoroutinefunction(fn))

