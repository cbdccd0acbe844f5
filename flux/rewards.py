"""Built-in reward functions, the reward styles Flux calls unchanged, and the pool that runs them.

A reward function is `fn(completion: str, record: dict) -> float`, where `record` is the prompt's record
(its `answer` and any free metadata); it may also take `completion_ids` (the sampled token ids, special
tokens included) and `finish_reason` (`stop` or `length`) by name. Two other signatures are recognised by
their parameter names and called unchanged (`adapt`):

- TRL (a `completions` parameter): `reward_func(prompts, completions, completion_ids, **columns) ->
  list[float]`, called once per prompt group by keyword (conversational records get TRL's message
  lists), the records' other keys as columns — each argument only if the function takes it;
- verl (`solution_str` and `ground_truth` parameters): `compute_score(data_source, solution_str,
  ground_truth, extra_info=None)`, with `data_source`, `reward_model.ground_truth` (else `answer`) and
  `extra_info` from the record.

Any of them may be an `async def`, and may return a float or a dict with a `score` and more numbers,
which are logged (`reward/<k>`). `rewards: [{fn | url, weight}, ...]` combines several: the reward is the
weighted sum, each one logged. `reward_url` is a reward served over HTTP (flux/integrations/rewards).
`RewardPool` runs them beside the engine, `reward_workers` calls at a time, each bounded by a timeout.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import inspect
import logging
import math
import numbers
import queue
import re
import threading
import time
import traceback
from typing import Callable

RewardFn = Callable[[str, dict], float]
FAST_CALL_S = 0.001  # a plain reward function this fast per sample is called once per group (RewardPool._part)
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


def adapt(fn: Callable) -> "Part":
    """`fn` as a Part of any style (module docstring; TRL's and verl's in flux/integrations/rewards): an
    `async def` is awaited on the pool's event loop, any other function runs in a thread."""
    names = set(inspect.signature(fn).parameters)
    if "completions" in names or {"solution_str", "ground_truth"} <= names:
        from flux.plugins import hook

        return hook("rewards.adapt_foreign")(fn)

    def native(s: Sample):
        kw = {k: getattr(s, k) for k in ("completion_ids", "finish_reason") if k in names}
        return fn(s.completion, s.record, **kw)
    return Part(getattr(fn, "__name__", "reward"), native, is_async=inspect.iscoroutinefunction(fn))


@dataclasses.dataclass
class Sample:
    """One completion to score: its text (special tokens stripped), its prompt's record, the sampled
    token ids (special tokens kept) and why it ended (`stop` or `length`)."""

    completion: str
    record: dict
    completion_ids: list | None = None
    finish_reason: str = "stop"

    @property
    def prompt(self):
        return self.record["messages"] if "messages" in self.record else self.record.get("prompt", "")


@dataclasses.dataclass
class Part:
    """One reward: `call(sample)` (or `call(samples)` when batched) gives a value per sample (a number,
    a dict with `score`, or None: not applicable); `weight` in the sum; `timeout_s` per call (None: the
    part bounds itself, as the HTTP client does)."""

    name: str
    call: Callable
    weight: float = 1.0
    batched: bool = False
    is_async: bool = False
    timeout_s: float | None = 0.0  # 0: the run's reward_timeout_s
    call_s: float = math.inf  # a plain function's latest seconds per sample (inf: not yet measured, NaN: it
    # timed out in a group call; see RewardPool._part)


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


class RewardPool:
    """Scores batches of samples beside the engine, so that a slow or remote reward never stalls generation.

    `submit(samples)` returns at once with a future of [(score or None, extra numbers)] per sample. The
    parts run on an event loop in a thread of their own, at most `workers` calls at a time: an `async
    def` reward (or the HTTP client) is awaited there, any other function runs on the pool's threads. A
    call that raises, runs past its timeout, or returns NaN, inf or a non-number gives None (the caller
    drops the sample's group) and is counted by kind in `failures`; the first of each kind is logged with
    its traceback or value. `check()` raises `FluxRunError` once more than `max_failure_rate` of the
    last `window` samples failed: a reward that keeps failing is a bug to report, not noise to train
    around. A function past its timeout is abandoned, not killed: its thread runs on until it returns.
    """

    def __init__(self, parts: list[Part], workers: int = 128, timeout_s: float = 30.0,
                 max_failure_rate: float = 0.5, window: int = 200, log: logging.Logger | None = None):
        self.parts, self.timeout_s = parts, timeout_s
        self.max_failure_rate, self.window = max_failure_rate, window
        self.log = log or logging.getLogger("flux.rewards")
        self.failures: dict[str, int] = {}
        self.recent: collections.deque = collections.deque(maxlen=window)
        self.loop = asyncio.new_event_loop()
        self.limit = asyncio.Semaphore(max(1, workers))
        self.workers, self.busy, self.threads, self.jobs = max(1, workers), 0, [], queue.SimpleQueue()
        self._thread = threading.Thread(target=self.loop.run_forever, name="rewards", daemon=True)
        self._thread.start()

    def submit(self, samples: list[Sample]) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(self._score(samples), self.loop)

    def score(self, samples: list[Sample]) -> list[float | None]:
        """The scores of `samples`, waiting for them (the evaluation's use)."""
        return [score for score, _ in self.submit(samples).result()] if samples else []

    async def _score(self, samples: list[Sample]) -> list[tuple[float | None, dict]]:
        results = await asyncio.gather(*(self._part(p, samples) for p in self.parts))
        out = []
        for i in range(len(samples)):
            total, logged, scored, failure = 0.0, {}, 0, None
            for part, values in zip(self.parts, results):
                kind, value = values[i]
                if not kind and value is None:  # not applicable (TRL's None): skipped
                    continue
                score, extra = split_score(value) if not kind else (None, {})
                if not kind and score is None:
                    kind, value = "not_a_number", f"returned {value!r:.80}"
                elif not kind and not math.isfinite(score):
                    kind, value = "non_finite", f"returned {value!r}"
                if kind:
                    failure = failure or (kind, value)
                    continue
                total, scored = total + part.weight * score, scored + 1
                if len(self.parts) == 1:
                    logged.update(extra)
                else:
                    logged.update({part.name: score, **{f"{part.name}/{k}": v for k, v in extra.items()}})
            if failure or not scored:  # a part failed, or none applied
                self._failed(*(failure or ("not_a_number", "returned None")))
                out.append((None, {}))
            else:
                self.recent.append(False)
                out.append((total, logged))
        return out

    async def _part(self, part: Part, samples: list[Sample]) -> list[tuple[str, object]]:
        """(failure kind or '', value) per sample."""
        timeout = self.timeout_s if part.timeout_s == 0 else part.timeout_s

        async def once(arg, fn=None):
            async with self.limit:
                work = part.call(arg) if part.is_async else self._in_thread(fn or part.call, arg)
                try:
                    return "", await asyncio.wait_for(work, timeout or None)
                except asyncio.TimeoutError:
                    return "timeout", f"no answer within {timeout:g}s"
                except Exception:
                    return "raised", traceback.format_exc()

        def timed(group: list) -> list:  # a plain function's samples, one after another, timed
            t0, out = time.perf_counter(), [part.call(x) for x in group]
            part.call_s = part.call_s if math.isnan(part.call_s) else (time.perf_counter() - t0) / len(group)
            return out

        if not part.batched and not part.is_async and part.call_s <= FAST_CALL_S and len(samples) > 1:
            # Measured fast: the group in one thread call, not a thread hop per sample (on the built-in task
            # the hops were most of the scoring time). A group that raises, or runs past the timeout, is
            # scored again a call per sample, each with its own timeout and outcome (a timeout, every later
            # group too: a function that can hang must not hold a whole group's samples behind one).
            kind, value = await once(samples, timed)
            if not kind:
                return [("", v) for v in value]
            part.call_s = math.nan if kind == "timeout" else part.call_s  # (NaN: a call per sample from now on)
        if not part.batched:
            one = None if part.is_async else lambda x: timed([x])[0]
            return list(await asyncio.gather(*(once(s, one) for s in samples)))
        kind, value = await once(samples)
        if not kind and not (isinstance(value, (list, tuple)) and len(value) == len(samples)):
            kind, value = "bad_batch", f"returned {value!r:.80} for {len(samples)} samples"
        return [(kind, value)] * len(samples) if kind else [("", v) for v in value]

    def _in_thread(self, fn: Callable, arg) -> asyncio.Future:
        """`fn(arg)` on one of the pool's daemon threads, started as calls need them, up to `workers` (a
        call abandoned past its timeout keeps its thread busy until it returns)."""
        done = self.loop.create_future()
        self.busy += 1
        if self.busy > len(self.threads) < self.workers:
            self.threads.append(threading.Thread(target=self._work, name="reward", daemon=True))
            self.threads[-1].start()
        self.jobs.put((fn, arg, done))
        return done

    def _work(self) -> None:
        while True:
            fn, arg, done = self.jobs.get()
            try:
                value, error = fn(arg), None
            except Exception as e:
                value, error = None, e
            self.loop.call_soon_threadsafe(self._returned, done, value, error)

    def _returned(self, done: asyncio.Future, value, error) -> None:
        self.busy -= 1
        if not done.done():  # else abandoned past its timeout
            done.set_exception(error) if error else done.set_result(value)

    def _failed(self, kind: str, detail) -> None:
        self.recent.append(True)
        self.failures[kind] = self.failures.get(kind, 0) + 1
        if self.failures[kind] == 1:
            self.log.error("reward %s failed (%s, logged once per kind; its sample's group is dropped): %s",
                           "+".join(p.name for p in self.parts), kind, str(detail).strip())

    def check(self) -> None:
        """Raise FluxRunError if rewards keep failing."""
        from flux.run.runtime import FluxRunError

        if len(self.recent) == self.window and sum(self.recent) > self.max_failure_rate * self.window:
            raise FluxRunError(f"the reward function failed on {sum(self.recent)} of the last {self.window} "
                               f"samples ({', '.join(f'{k}: {v}' for k, v in sorted(self.failures.items()))}); "
                               f"reward_max_failure_rate={self.max_failure_rate:g}")

    def close(self) -> None:
        for part in self.parts:
            if hasattr(part.call, "aclose"):
                asyncio.run_coroutine_threadsafe(part.call.aclose(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)


def build_parts(cfg) -> list[Part]:
    """The run's rewards: `rewards` (several, weighted; each a `fn` or a `url`) when given, else
    `reward_url` when set, else `reward`."""
    entries = cfg.rewards or [{"url": cfg.reward_url} if cfg.reward_url else {"fn": cfg.reward}]
    parts = []
    for entry in entries:
        if entry.get("url"):
            from flux.plugins import hook

            part = Part("http", hook("rewards.HttpReward")(entry["url"], cfg.reward_timeout_s, cfg.reward_retries,
                                           cfg.reward_workers), batched=True, is_async=True, timeout_s=None)
        else:
            part = adapt(load_function(entry["fn"]))
        part.name = str(entry.get("name") or part.name)
        part.weight = float(entry.get("weight", 1.0))
        parts.append(part)
    return parts


def reward_pool(cfg, log: logging.Logger | None = None) -> RewardPool:
    """The run's rewards (`build_parts`) in a RewardPool with the run's limits."""
    return RewardPool(build_parts(cfg), cfg.reward_workers, cfg.reward_timeout_s, cfg.reward_max_failure_rate,
                      log=log)
