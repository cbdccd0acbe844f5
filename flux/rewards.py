"""Built-in reward functions, loading a user's by dotted path, and calling it safely (`RewardGuard`).

A reward function is `fn(completion: str, record: dict) -> float`, where `record` is the prompt's JSONL
object (its `answer` and any free metadata); it may also take `completion_ids` (the sampled token ids,
special tokens included) and `finish_reason` (`stop` or `length`) by name. Two other signatures are
recognised by their parameter names and called unchanged (`adapt`):

- TRL (a `completions` parameter): `reward_func(prompts, completions, completion_ids, **columns) ->
  list[float]`, called by keyword with one-element lists (conversational records get TRL's message
  lists), the record's other keys as columns — each argument only if the function takes it;
- verl (`solution_str` and `ground_truth` parameters): `compute_score(data_source, solution_str,
  ground_truth, extra_info=None)`, with `data_source`, `reward_model.ground_truth` (else `answer`) and
  `extra_info` from the record.

Any of them may return a float or a dict with a `score` and more numbers, which are logged (`reward/<k>`).
`rewards: [{fn, weight}, ...]` combines several: the reward is the weighted sum, each one logged.
"""

from __future__ import annotations

import collections
import functools
import inspect
import logging
import math
import numbers
import re
import signal
import threading
import traceback
from typing import Callable

RewardFn = Callable[[str, dict], float]
ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def extract_answer(completion: str) -> str:
    """The text inside the last <answer>...</answer>, or the whole completion when there is no tag."""
    found = ANSWER_TAG.findall(completion)
    return (found[-1] if found else completion).strip()


def exact_match(completion: str, record: dict) -> float:
    """1.0 when the (extracted) answer equals `record["answer"]` after trimming white space, else 0.0."""
    return float(extract_answer(completion) == str(record.get("answer", "")).strip())


def char_match(completion: str, record: dict) -> float:
    """Fraction of answer characters right in place; extra or missing characters count as wrong.

    Partial credit gives a denser signal than exact match on short algorithmic answers;
    exact answers score 1.0.
    """
    got, want = extract_answer(completion), str(record.get("answer", "")).strip()
    if not got and not want:
        return 1.0
    return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))


def format_reward(completion: str, record: dict) -> float:
    """1.0 when the completion matches `record["format"]` (a regex; default: ends in an <answer> tag)."""
    pattern = record.get("format", r"(?s).*<answer>.*</answer>\s*")
    return float(re.fullmatch(pattern, completion.strip()) is not None)


def load_function(dotted: str) -> Callable:
    """`package.module:function` → the function; ValueError with a one-line reason otherwise."""
    from flux.plugins import resolve

    fn = resolve(dotted, "function")
    if not callable(fn):
        raise ValueError(f"{dotted!r}: {dotted.partition(':')[0]} has no function {dotted.partition(':')[2]}")
    return fn


def adapt(fn: Callable) -> Callable:
    """`fn` as `native(completion, record, completion_ids=None, finish_reason=None)`, whatever its style."""
    params = inspect.signature(fn).parameters
    names = set(params)
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())

    def wants(name: str) -> bool:
        return name in names or var_kw

    if "completions" in names:  # TRL: batched lists in (by name), a list of floats out
        @functools.wraps(fn)
        def trl(completion, record, completion_ids=None, finish_reason=None):
            chat = "messages" in record
            prompt = record["messages"] if chat else record.get("prompt", "")
            text = [{"role": "assistant", "content": completion}] if chat else completion
            extra = {k: [v] for k, v in record.items() if k not in ("prompt", "messages") and wants(k)}
            if wants("completion_ids"):
                extra["completion_ids"] = [list(completion_ids or [])]
            if wants("prompts"):
                extra["prompts"] = [prompt]
            out = fn(completions=[text], **extra)
            return out[0] if isinstance(out, (list, tuple)) and len(out) == 1 else out
        return trl
    if {"solution_str", "ground_truth"} <= names:  # verl's compute_score
        @functools.wraps(fn)
        def verl(completion, record, completion_ids=None, finish_reason=None):
            truth = (record.get("reward_model") or {}).get("ground_truth", record.get("answer"))
            extra = {"extra_info": record.get("extra_info", {})} if wants("extra_info") else {}
            if wants("data_source"):
                extra["data_source"] = record.get("data_source", "")
            return fn(solution_str=completion, ground_truth=truth, **extra)
        return verl

    @functools.wraps(fn)
    def native(completion, record, completion_ids=None, finish_reason=None):
        extra = {k: v for k, v in (("completion_ids", completion_ids), ("finish_reason", finish_reason))
                 if k in names}
        return fn(completion, record, **extra)
    return native


class Combined:
    """Several rewards as one: the weighted sum of their scores; each score (and each one's extra
    numbers) in `parts` for logging. A part that returns None is skipped (TRL's "not applicable")."""

    def __init__(self, parts: list[tuple[str, Callable, float]]):
        self.parts = parts
        self.__name__ = "+".join(name for name, _, _ in parts)

    def __call__(self, completion, record, completion_ids=None, finish_reason=None):
        total, logged, scored = 0.0, {}, 0
        for name, fn, weight in self.parts:
            value = fn(completion, record, completion_ids=completion_ids, finish_reason=finish_reason)
            if value is None:
                continue
            score, extra = split_score(value)
            if score is None:
                return value  # not a number: the guard counts it
            total += weight * score
            scored += 1
            logged[name] = score
            logged.update({f"{name}/{k}": v for k, v in extra.items()})
        return {"score": total, **logged} if scored else None


def split_score(value) -> tuple[float | None, dict]:
    """A reward's return value as (score, extra numbers): a number, or a dict with `score`."""
    if isinstance(value, dict):
        extra = {str(k): float(v) for k, v in value.items() if k != "score" and isinstance(v, numbers.Real)
                 and not isinstance(v, bool) and math.isfinite(float(v))}
        value = value.get("score")
    else:
        extra = {}
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None, {}
    return float(value), extra


class RewardTimeout(Exception):
    pass


class RewardGuard:
    """Calls user reward code so that it cannot stop or poison the run.

    A call that raises, runs past `timeout_s`, or returns NaN, inf or a non-number gives None (the caller
    drops the sample's group) and is counted by kind in `failures`; the first of each kind is logged with
    its traceback or value. `check()` raises `FluxRunError` once more than `max_failure_rate` of the last
    `window` calls failed: a reward that keeps failing is a bug to report, not noise to train around.

    The timeout is a SIGALRM timer, so it holds in the main thread only (the generator's and learner's
    loops run there); elsewhere calls run without one. It interrupts Python code and blocking system
    calls, not a C extension that never returns to the interpreter.
    """

    def __init__(self, fn: Callable, timeout_s: float = 30.0, max_failure_rate: float = 0.5, window: int = 200,
                 log: logging.Logger | None = None):
        self.fn, self.timeout_s, self.max_failure_rate, self.window = fn, timeout_s, max_failure_rate, window
        self.log = log or logging.getLogger("flux.rewards")
        self.failures: dict[str, int] = {}
        self.calls = 0
        self.recent: collections.deque = collections.deque(maxlen=window)
        self.extras: dict[str, float] = {}  # the last successful call's logged numbers (dict returns)

    def __call__(self, completion: str, record: dict, completion_ids=None, finish_reason=None) -> float | None:
        self.calls += 1
        self.extras = {}
        kind, detail, value = "", "", None
        timed = self.timeout_s > 0 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGALRM, _raise_timeout) if timed else None
        try:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
            value = self.fn(completion, record, completion_ids=completion_ids, finish_reason=finish_reason)
        except RewardTimeout:
            kind, detail = "timeout", f"no answer within {self.timeout_s:g}s"
        except Exception:
            kind, detail = "raised", traceback.format_exc()
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        score, extras = split_score(value) if not kind else (None, {})
        if not kind:
            if score is None:
                kind, detail = "not_a_number", f"returned {value!r:.80}"
            elif not math.isfinite(score):
                kind, detail = "non_finite", f"returned {value!r}"
        self.recent.append(bool(kind))
        if not kind:
            self.extras = extras
            return score
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if self.failures[kind] == 1:
            self.log.error("reward %s failed (%s, logged once per kind; its sample's group is dropped): %s",
                           getattr(self.fn, "__name__", self.fn), kind, detail.strip())
        return None

    def check(self) -> None:
        """Raise FluxRunError if rewards keep failing."""
        from flux.run.runtime import FluxRunError

        if len(self.recent) == self.window and sum(self.recent) > self.max_failure_rate * self.window:
            raise FluxRunError(f"the reward function failed on {sum(self.recent)} of the last {self.window} "
                               f"samples ({', '.join(f'{k}: {v}' for k, v in sorted(self.failures.items()))}); "
                               f"reward_max_failure_rate={self.max_failure_rate:g}")


def _raise_timeout(_signum, _frame):
    raise RewardTimeout()


def build_reward(cfg) -> Callable:
    """The run's reward: `rewards` (several, weighted) when given, else `reward`; in the native form."""
    if not cfg.rewards:
        return adapt(load_function(cfg.reward))
    parts = [(str(r.get("name") or r["fn"].rpartition(":")[2]), adapt(load_function(r["fn"])),
              float(r.get("weight", 1.0))) for r in cfg.rewards]
    return Combined(parts)


def guarded_reward(cfg, log: logging.Logger | None = None) -> RewardGuard:
    """The run's reward (`build_reward`) behind a RewardGuard with the run's limits."""
    return RewardGuard(build_reward(cfg), cfg.reward_timeout_s, cfg.reward_max_failure_rate, log=log)
