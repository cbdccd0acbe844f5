"""Built-in reward functions, and loading a user's by dotted path.

A reward function is `fn(completion: str, record: dict) -> float`, where `record` is the prompt's JSONL
object (its `answer` and any free metadata).
"""

from __future__ import annotations

import importlib
import re
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
    module_name, sep, attr = dotted.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{dotted!r}: expected `module:function`")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"{dotted!r}: cannot import {module_name} ({e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{dotted!r}: {module_name} has no function {attr}")
    return fn
