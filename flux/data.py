"""Prompt records: JSONL files (or a built-in task), validated line by line, rendered to token ids."""

from __future__ import annotations

import json
import zlib
from pathlib import Path


class DataError(ValueError):
    """A prompts file is missing or malformed; the message names the file and line."""


def load_prompts(source: str) -> list[dict]:
    """Records from `builtin:<task>[:split]` or a JSONL file of {"prompt"|"messages", "answer"?, ...}.

    Every line must be a JSON object with a `prompt` string or a `messages` list of {role, content};
    other keys are free metadata handed to the reward function. A preference file (for DPO) gives every
    record `chosen` and `rejected` response strings too; a file mixing both kinds is an error.
    """
    if source.startswith("builtin:"):
        from flux.plugins import hook

        return hook("builtin.records")(source.removeprefix("builtin:"))
    path = Path(source)
    if not path.is_file():
        raise DataError(f"{source}: no such prompts file")
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None
            _check_record(rec, f"{source}:{lineno}")
            records.append(rec)
    if not records:
        raise DataError(f"{source}: no prompts in file")
    kinds = [is_preference(rec) for rec in records]
    if any(kinds) and not all(kinds):
        lineno = kinds.index(not kinds[0]) + 1
        raise DataError(f"{source}: record {lineno} is a {'preference' if kinds[lineno - 1] else 'prompt'} "
                        f"record but record 1 is not; a file holds one kind")
    return records


def eval_source(cfg) -> str:
    """What the run evaluates on: `eval.prompts` as given, or for `auto` the training task's own held-out
    split (`builtin:<task>`), else `split` (a held-out `eval.split_fraction` of the training records)
    when that fraction is > 0, else '' (no evaluation). Never a built-in task the run does not train on."""
    source = cfg.eval.prompts
    if source != "auto":
        return source
    if cfg.prompts.startswith("builtin:"):
        return "builtin:" + cfg.prompts.removeprefix("builtin:").split(":")[0]
    return "split" if cfg.eval.split_fraction > 0 else ""


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(training, held-out) record indices: each record held out with probability `fraction`, by a hash
    of its index and the seed (the same split in every process and on every resume), at least one of
    each when 0 < fraction < 1 and n >= 2."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    scores = [zlib.crc32(f"{seed}:{i}".encode()) / 2**32 for i in range(n)]
    held = {i for i, s in enumerate(scores) if s < fraction}
    if not held:
        held = {min(range(n), key=scores.__getitem__)}
    if len(held) == n:
        held.discard(max(range(n), key=scores.__getitem__))
    return [i for i in range(n) if i not in held], sorted(held)


def training_records(cfg) -> list[dict]:
    """The records the run trains on: `prompts`, less the held-out split when it evaluates on one."""
    records = load_prompts(cfg.prompts)
    if eval_source(cfg) != "split":
        return records
    train, _ = split_indices(len(records), cfg.eval.split_fraction, cfg.seed)
    return [records[i] for i in train]


def held_out_records(cfg) -> list[dict]:
    """The held-out split of the training prompts (`eval_source(cfg) == "split"`)."""
    records = load_prompts(cfg.prompts)
    _, held = split_indices(len(records), cfg.eval.split_fraction, cfg.seed)
    return [records[i] for i in held]


def is_preference(record: dict) -> bool:
    """Whether a record is a preference pair ({prompt, chosen, rejected})."""
    return "chosen" in record or "rejected" in record


def _check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if "prompt" in rec:
        if not isinstance(rec["prompt"], str):
            raise DataError(f"{where}: `prompt` must be a string")
    elif "messages" in rec:
        msgs = rec["messages"]
        if not (isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in msgs)):
            raise DataError(f"{where}: `messages` must be a non-empty list of {{role, content}} strings")
    else:
        raise DataError(f"{where}: needs a `prompt` string or a `messages` list")
    if is_preference(rec):
        for key in ("chosen", "rejected"):
            if not (isinstance(rec.get(key), str) and rec[key]):
                raise DataError(f"{where}: a preference record needs non-empty `chosen` and `rejected` strings "
                                f"(`{key}` is {rec.get(key)!r})")


def render_prompt(record: dict, tokenizer) -> list[int]:
    """Token ids of a record's prompt: `messages` through the tokenizer's chat template when it has one."""
    if "messages" in record:
        if getattr(tokenizer, "chat_template", None):
            ids = tokenizer.apply_chat_template(record["messages"], add_generation_prompt=True, tokenize=True)
            return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
        text = "\n".join(f"{m['role']}: {m['content']}" for m in record["messages"]) + "\nassistant: "
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(record["prompt"], add_special_tokens=False).input_ids


def write_jsonl(records: list[dict], path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec) + "\n")
