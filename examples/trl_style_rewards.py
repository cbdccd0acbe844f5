"""Reward functions written for TRL's GRPOTrainer, used by examples/from_trl.yaml unchanged.

TRL calls them with lists (one entry per completion) and the dataset's other columns as keyword
arguments; Flux does the same, one completion at a time (`flux.rewards.adapt`).
"""


def reward_len(completions, **kwargs):
    """TRL's documented example: completions close to 20 characters score best."""
    return [-abs(20 - len(completion)) for completion in completions]


def reward_digits(completions, answer, **kwargs):
    """The fraction of the answer's digits in place (the built-in sort task's `answer` column)."""
    return [sum(a == b for a, b in zip(c.strip(), gt)) / len(gt) for c, gt in zip(completions, answer)]
