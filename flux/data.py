"""Prompt records: read from a file, a dataset or a built-in task, validated row by row, rendered to
token ids."""

from __future__ import annotations

import functools
import json
import zlib
from pathlib import Path


class DataError(ValueError):
    """A prompts file is missing or malformed; the message names the file, row and field."""


def load_prompts(source: str, data=None) -> list[dict]:
    """Records from `builtin:<task>[:split]`, a JSONL file (read here, so an error names its line), or
    anything `datasets` reads (flux/integrations/data): a JSON, parquet, CSV or arrow file, a directory
    saved by `datasets`, a Hub dataset id in the local HF cache (its `data.split`).

    Each row becomes a record (`to_record`): a `prompt` string or a `messages` list of {role, content},
    an `answer` when the row has one, every column kept as metadata for the reward. A preference file
    (for DPO) gives every record `chosen` and `rejected` response strings too; a file mixing both kinds is
    an error. The records of a source are read once per process; callers must not change them.
    """
    if source.startswith("builtin:"):
        from flux.plugins import hook

        return hook("builtin.records")(source.removeprefix("builtin:"))
    from flux.config import DataConfig

    d, path = data or DataConfig(), Path(source)
    st = path.stat() if path.exists() else None
    stamp = (st.st_mtime_ns, st.st_size) if st else None  # a changed file is read again
    return _load(source, stamp, d.prompt_key, d.messages_key, d.answer_key, d.split)


@functools.lru_cache(maxsize=4)
def _load(source: str, _stamp, prompt_key: str, messages_key: str, answer_key: str, split: str) -> list[dict]:
    path = Path(source)
    if path.suffix == ".jsonl" or (path.is_file() and path.suffix not in (".json", ".parquet", ".csv", ".arrow")):
        rows = _jsonl_rows(source)
    else:
        from flux.plugins import hook

        rows = ((f"{source} row {i}", row) for i, row in enumerate(hook("data.read_rows")(source, split), 1))
    records = [to_record(row, where, prompt_key, messages_key, answer_key) for where, row in rows]
    if not records:
        raise DataError(f"{source}: no prompts in file")
    kinds = [is_preference(rec) for rec in records]
    if any(kinds) and not all(kinds):
        i = kinds.index(not kinds[0]) + 1
        raise DataError(f"{source}: record {i} is a {'preference' if kinds[i - 1] else 'prompt'} record but "
                        f"record 1 is not; a file holds one kind")
    return records


def _jsonl_rows(source: str):
    if not Path(source).is_file():
        raise DataError(f"{source}: no such prompts file")
    with open(source, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield f"{source}:{lineno}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{source}:{lineno}: not valid JSON ({e.msg})") from None


def to_record(row, where: str, prompt_key="prompt", messages_key="messages", answer_key="answer") -> dict:
    """A row as a record: its `prompt_key` column as `prompt` (a chat list as `messages`, as TRL's
    conversational rows and verl's parquet hold it), else `messages_key` as `messages`; `answer_key` (or
    verl's `reward_model.ground_truth`) as `answer`; every other column kept."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    rec, prompt = dict(row), _column(row, prompt_key)
    if isinstance(prompt, list):
        rec.pop("prompt", None)
        rec["messages"] = prompt
    elif prompt is not None:
        rec["prompt"] = prompt
    elif row.get(messages_key) is not None:
        rec["messages"] = row[messages_key]
    elif prompt_key != "prompt":
        raise DataError(f"{where}: no `{prompt_key}` column (data.prompt_key)")
    answer = _column(row, answer_key)
    answer = _column(row, "reward_model.ground_truth") if answer is None else answer
    if answer is not None:
        rec["answer"] = answer
    _check_record(rec, where)
    return rec


def _column(row: dict, dotted: str):
    for key in dotted.split("."):
        row = row.get(key) if isinstance(row, dict) else None
    return row


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


def split_records(cfg) -> tuple[list[dict], list[dict]]:
    """(training, held-out) records: `prompts`, less a held-out `eval.split_fraction` when the run
    evaluates on that split (`eval_source(cfg) == "split"`)."""
    records = load_prompts(cfg.prompts, cfg.data)
    if eval_source(cfg) != "split":
        return records, []
    train, held = split_indices(len(records), cfg.eval.split_fraction, cfg.seed)
    return [records[i] for i in train], [records[i] for i in held]


def within_length(records: list[dict], cfg, tokenizer) -> tuple[list[dict], int]:
    """(records whose rendered prompt fits `data.max_prompt_length`, how many did not)."""
    if not cfg.data.max_prompt_length:
        return records, 0
    if tokenizer is None:
        raise ValueError("data.max_prompt_length needs the model's tokenizer to measure prompts")
    kept = [r for r in records if len(render_prompt(r, tokenizer)) <= cfg.data.max_prompt_length]
    return kept, len(records) - len(kept)


def training_records(cfg, tokenizer=None) -> list[dict]:
    """The records the run trains on (`split_records`, `within_length`; a tokenizer is needed only
    with a data.max_prompt_length)."""
    return within_length(split_records(cfg)[0], cfg, tokenizer)[0]


def is_preference(record: dict) -> bool:
    """Whether a record is a preference pair ({prompt, chosen, rejected})."""
    return "chosen" in record or "rejected" in record


def _check_record(rec, where: str) -> None:
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
