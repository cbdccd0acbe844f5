"""Built-in reward functions, loading a user's by dotted path, and calling it safely (`RewardGuard`).

A reward function is `fn(completion: str, record: dict) -> float`, where `record` is the prompt's JSONL
object (its `answer` and any free metadata).
"""

from __future__ import annotations

import collections
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

    def __call__(self, completion: str, record: dict) -> float | None:
        self.calls += 1
        kind, detail, value = "", "", None
        timed = self.timeout_s > 0 and threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGALRM, _raise_timeout) if timed else None
        try:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
            value = self.fn(completion, record)
        except RewardTimeout:
            kind, detail = "timeout", f"no answer within {self.timeout_s:g}s"
        except Exception:
            kind, detail = "raised", traceback.format_exc()
        finally:
            if timed:
                signal.setitimer(signal.ITIMER_REAL, 0)
                signal.signal(signal.SIGALRM, previous)
        if not kind:
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                kind, detail = "not_a_number", f"returned {value!r:.80}"
            elif not math.isfinite(float(value)):
                kind, detail = "non_finite", f"returned {value!r}"
        self.recent.append(bool(kind))
        if not kind:
            return float(value)
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


def guarded_reward(cfg, log: logging.Logger | None = None) -> RewardGuard:
    """The run's reward function (`cfg.reward`) behind a RewardGuard with the run's limits."""
    return RewardGuard(load_function(cfg.reward), cfg.reward_timeout_s, cfg.reward_max_failure_rate, log=log)
