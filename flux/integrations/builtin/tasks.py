"""The built-in tasks, with held-out splits, and the embedded model's warm-start on each.

- `sort` (the default): sort three distinct digits (`sort 381=` → `138`).
- `repeat`: write a digit n times (`rep 7 5=` → `77777`), n long-tailed from 1 to 48 (median answer 3
  characters, 99th percentile 47): a generation-heavy workload whose batches wait on their longest
  completion, as reasoning RL's do (docs/concepts.md, "Workloads").
- `sort_pairs`: preference pairs on the sort prompts, for DPO.

Why this task: its answer is checked exactly, it needs a real algorithm (order statistics over the
prompt, one digit at a time), and held-out prompts test generalisation rather than memorisation: the
split is by *multiset* of digits, so no permutation of a held-out prompt's digits (and so no held-out
answer) ever appears in training. Reward is `flux.rewards:char_match`, the fraction of digits right in
place, so a random digit string scores 0.1 on average.

(Tried first and rejected, on this 0.3M-parameter model and a 5-minute budget: *reversal*, where RL
learns the output digits that attention can find by content but stalls on the middle one, which needs
pure positional attention (reward plateaus near 0.75); and *sorting with repeated digits*, where
counting duplicates stalls it near 0.7 for some seeds.)

The embedded model gets a short supervised warm-start on the training split (`warm_start`), stopped as
soon as its *sampled* mean reward reaches 0.2: the model knows the format and has a weak start on the
skill, and RL has to take it the rest of the way (≥ 0.8), which plain SFT-style format learning cannot
fake.
"""

from __future__ import annotations

import itertools
import random
import zlib

DIGITS = "0123456789"
LENGTH = 3
WARM_TARGET_REWARD = 0.2


def _is_held_out(digits: str) -> bool:
    # Split on the sorted digits (the multiset), with a stable hash (not Python's salted hash()):
    # the same 20% of multisets are held out on every machine.
    return zlib.crc32("".join(sorted(digits)).encode()) % 5 == 0


def sort_records(split: str = "train") -> list[dict]:
    """All `sort <ddd>=` prompts (distinct digits) of the split (`train` or `eval`), answer = sorted digits."""
    if split not in ("train", "eval"):
        raise ValueError(f"builtin:sort:{split}: split must be `train` or `eval`")
    out = []
    for tup in itertools.permutations(DIGITS, LENGTH):
        d = "".join(tup)
        if _is_held_out(d) == (split == "eval"):
            out.append({"prompt": f"sort {d}=", "answer": "".join(sorted(d)), "task": "sort"})
    return out


def sort_pairs(split: str = "train") -> list[dict]:
    """Preference pairs for DPO on the sort task: chosen = the sorted digits, rejected = a wrong answer.

    The wrong answer is, in turn, the prompt's digits as given (unsorted; or reversed when the prompt is
    already sorted), the sorted digits reversed, and the sorted digits with one digit swapped for one
    not in the prompt: the mistakes a sampled policy makes early on. Deterministic.
    """
    out = []
    for i, rec in enumerate(sort_records(split)):
        given, answer = rec["prompt"][len("sort "):-1], rec["answer"]
        kind = i % 3
        if kind == 0:
            wrong = given if given != answer else answer[::-1]
        elif kind == 1:
            wrong = answer[::-1]
        else:
            other = next(d for d in DIGITS[::-1] if d not in given)
            wrong = answer[: i % LENGTH] + other + answer[i % LENGTH + 1:]
        out.append({**rec, "chosen": answer, "rejected": wrong})
    return out


REPEAT_MAX = 48


def repeat_counts() -> dict[int, int]:
    """How many prompts (per digit) ask for n repetitions: ⌈60 / n^1.3⌉-ish, a long tail from 1 to 48."""
    return {n: max(1, round(60 / n ** 1.3)) for n in range(1, REPEAT_MAX + 1)}


def repeat_records(split: str = "train") -> list[dict]:
    """`rep <d> <n>=` → d written n times, `repeat_counts()[n]` copies of each prompt (the long tail); the
    held-out split is by (digit, n) pair, so no held-out answer is ever trained on, with the same copies
    (evaluation sees the training distribution of lengths) in a fixed shuffled order (so its first k
    records are a fair sample of it). Deterministic."""
    if split not in ("train", "eval"):
        raise ValueError(f"builtin:repeat:{split}: split must be `train` or `eval`")
    out = []
    for n, copies in repeat_counts().items():
        for d in DIGITS:
            if (zlib.crc32(f"{d}x{n}".encode()) % 5 == 0) == (split == "eval"):
                out += [{"prompt": f"rep {d} {n}=", "answer": d * n, "task": "repeat"}] * copies
    if split == "eval":
        random.Random(0).shuffle(out)
    return out


TASKS = {"sort": sort_records, "sort_pairs": sort_pairs, "repeat": repeat_records}
EVAL_TASK = {"sort_pairs": "sort"}  # tasks evaluated on another task's held-out split
# The embedded model's start on each task (warm_start): sampled mean reward to reach, and the context
# its completions need. A task's model is a separate cache entry (tiny.ensure_default_model).
WARM = {"sort": (WARM_TARGET_REWARD, 64), "repeat": (0.3, 128)}


def builtin_records(name: str) -> list[dict]:
    """`<task>` / `<task>:train` (training split) and `<task>:eval` (held-out split), task in `TASKS`."""
    task, _, split = name.partition(":")
    if task not in TASKS:
        raise ValueError(f"builtin:{name}: unknown built-in task (known: {', '.join(TASKS)})")
    return TASKS[task](split or "train")


def eval_records(source: str) -> list[dict]:
    """The held-out prompts of a `builtin:<task>` source (`sort_pairs`: the sort task's); other sources
    are files, loaded by the caller."""
    task = source.removeprefix("builtin:").partition(":")[0]
    if task not in TASKS:
        raise ValueError(f"builtin:{task}: unknown built-in task (known: {', '.join(TASKS)})")
    task = EVAL_TASK.get(task, task)
    return TASKS[task]("eval")


def warm_start(model, tokenizer, seed: int = 0, max_steps: int = 200, batch: int = 64, lr: float = 1e-3,
               task: str = "sort") -> int:
    """Supervised warm-start on the task's training split until the sampled mean reward reaches its
    `WARM` target (sort: 0.2).

    Returns the number of SFT steps taken. Checked every 2 steps on 64 fixed prompts × 4 samples at
    temperature 1, the same way RL will sample.
    """
    import torch
    import torch.nn.functional as F

    from flux.rewards import char_match

    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    records = TASKS[task]("train")
    target = WARM[task][0]
    probe = rng.sample(records, 64)
    eos = tokenizer.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(max_steps):
        if step % 2 == 0 and _sampled_reward(model, tokenizer, probe, gen, char_match) >= target:
            return step
        rows = rng.sample(records, batch)
        prompts = [tokenizer(r["prompt"]).input_ids for r in rows]
        seqs = [tokenizer(r["prompt"] + r["answer"]).input_ids + [eos] for r in rows]
        if len({len(p) for p in prompts}) == 1 and len({len(q) for q in seqs}) == 1:  # sort: one shape
            prompt_len = len(prompts[0])
            x = torch.tensor(seqs)
            logits = model(x[:, :-1]).logits[:, prompt_len - 1:]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, prompt_len:].reshape(-1))
        else:  # right-padded, the prompts and the padding left out of the loss
            width = max(map(len, seqs))
            x = torch.tensor([q + [eos] * (width - len(q)) for q in seqs])
            labels = torch.tensor([[-100] * (len(p) - 1) + q[len(p):] + [-100] * (width - len(q))
                                   for p, q in zip(prompts, seqs)])
            logits = model(x[:, :-1]).logits
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return max_steps


def _sampled_reward(model, tokenizer, records, gen, reward_fn, samples: int = 4) -> float:
    """Mean reward of `samples` completions per record, sampled at temperature 1 (records batched by
    prompt length, so no padding is needed)."""
    import torch

    eos = tokenizer.eos_token_id
    by_len: dict[int, list[dict]] = {}
    for r in records:
        by_len.setdefault(len(tokenizer(r["prompt"]).input_ids), []).append(r)
    total = 0.0
    for group in by_len.values():
        x = torch.tensor([tokenizer(r["prompt"]).input_ids for r in group for _ in range(samples)])
        done = torch.zeros(len(x), dtype=torch.bool)
        out = []
        with torch.no_grad():
            for _ in range(max(len(r["answer"]) for r in group) + 2):
                probs = model(x).logits[:, -1].softmax(-1)
                nxt = torch.multinomial(probs, 1, generator=gen).squeeze(1)
                out.append(torch.where(done, eos, nxt))
                done |= nxt == eos
                x = torch.cat([x, nxt[:, None]], 1)
        for i, row in enumerate(torch.stack(out, 1).tolist()):
            text = tokenizer.decode(row[: row.index(eos)] if eos in row else row)
            total += reward_fn(text, group[i // samples])
    return total / (len(records) * samples)
