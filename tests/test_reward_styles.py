"""Rewards written for TRL or verl run unchanged; dict returns and several weighted rewards are logged.

The TRL and verl functions below are their documentation's examples, verbatim (TRL's GRPOTrainer
"Using a custom reward function" section; verl's "Implement Reward Function for Dataset" /
custom_reward_function page and its gsm8k scorer's signature).
"""

import json
import re

import pytest

from flux.rewards import RewardPool, Sample, adapt


def score(fn, completion, record, completion_ids=None, finish_reason="stop"):
    """`fn`'s score of one sample, as a run's reward pool computes it."""
    pool = RewardPool([adapt(fn)], timeout_s=5)
    try:
        return pool.score([Sample(completion, record, completion_ids, finish_reason)])[0]
    finally:
        pool.close()


# ---- TRL's documented examples (verbatim) -------------------------------------------------------
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


def format_reward_func(completions, **kwargs):
    """Reward function that checks if the completion has a specific format."""
    pattern = r"^<think>.*?</think><answer>.*?</answer>$"
    completion_contents = [completion[0]["content"] for completion in completions]
    matches = [re.match(pattern, content) for content in completion_contents]
    return [1.0 if match else 0.0 for match in matches]


def reward_func(completions, ground_truth, **kwargs):
    # Regular expression to capture content inside \boxed{}
    matches = [re.search(r"\\boxed\{(.*?)\}", completion) for completion in completions]
    contents = [match.group(1) if match else "" for match in matches]
    # Reward 1 if the content is the same as the ground truth, 0 otherwise
    return [1.0 if c == gt else 0.0 for c, gt in zip(contents, ground_truth)]


# ---- verl's documented examples (verbatim) ------------------------------------------------------
def my_reward_fn(data_source, solution_str, ground_truth, extra_info=None):
    return len(solution_str) / 100


def compute_score(solution_str, ground_truth, method="strict", format_score=0.0, score=1.0):
    answer = solution_str.split("#### ")[-1].strip() if "#### " in solution_str else None
    if answer is None:
        return 0
    return score if answer == ground_truth else format_score


def test_trl_reward_functions_run_unchanged():
    assert score(reward_len, "x" * 15, {"prompt": "p"}) == -5
    chat = {"messages": [{"role": "user", "content": "2+2?"}]}
    assert score(format_reward_func, "<think>easy</think><answer>4</answer>", chat) == 1.0
    assert score(format_reward_func, "4", chat) == 0.0
    record = {"prompt": "2+2?", "ground_truth": "4"}  # a dataset column, as TRL passes it
    assert score(reward_func, r"so \boxed{4}", record) == 1.0 and score(reward_func, r"\boxed{5}", record) == 0.0
    seen = {}

    def wants_ids(prompts, completions, completion_ids, **kw):
        seen.update(prompts=prompts, ids=completion_ids, kw=kw)
        return [1.0]

    assert score(wants_ids, "a", {"prompt": "p", "level": 3}, completion_ids=[5, 1]) == 1.0
    assert seen == {"prompts": ["p"], "ids": [[5, 1]], "kw": {"level": [3]}}


def test_verl_compute_score_runs_unchanged():
    record = {"prompt": "q", "data_source": "openai/gsm8k", "reward_model": {"ground_truth": "72"},
              "extra_info": {"split": "train"}}
    assert score(my_reward_fn, "x" * 50, record) == 0.5
    assert score(compute_score, "... #### 72", record) == 1.0 and score(compute_score, "72", record) == 0
    assert score(compute_score, "#### 9", {"prompt": "q", "answer": "9"}) == 1.0  # Flux's `answer` as truth


def test_a_native_reward_may_ask_for_ids_and_the_finish_reason():
    def stopped(completion, record, completion_ids, finish_reason):
        return float(finish_reason == "stop" and completion_ids[-1] == 1)

    assert score(stopped, "a", {}, completion_ids=[4, 1], finish_reason="stop") == 1.0
    assert score(stopped, "a", {}, completion_ids=[4, 4], finish_reason="length") == 0.0


def test_dict_returns_are_scored_and_their_numbers_kept():
    pool = RewardPool([adapt(lambda completion, record: {"score": 0.5, "acc": 1, "note": "x"})])
    assert pool.submit([Sample("a", {})]).result() == [(0.5, {"acc": 1.0})]
    bad = RewardPool([adapt(lambda completion, record: {"acc": 1.0})])
    assert bad.submit([Sample("a", {})]).result() == [(None, {})] and bad.failures == {"not_a_number": 1}
    pool.close(), bad.close()


def test_several_rewards_are_a_weighted_sum_each_logged():
    parts = [adapt(reward_len), adapt(format_reward_func), adapt(lambda completions, **kw: [None] * len(completions))]
    for part, name, weight in zip(parts, ("len", "fmt", "na"), (0.1, 2.0, 5.0)):  # None: not applicable
        part.name, part.weight = name, weight
    pool = RewardPool(parts)
    chat = {"messages": [{"role": "user", "content": "q"}]}
    text = "<think>t</think><answer>a</answer>"
    [(total, logged)] = pool.submit([Sample(text, chat)]).result()
    assert total == pytest.approx(0.1 * -abs(20 - 1) + 2.0)  # TRL: len() of the message list
    assert logged == {"len": -19.0, "fmt": 1.0}
    pool.close()


@pytest.mark.slow
def test_a_run_logs_each_reward(default_model, tmp_path):
    from tests.test_e2e import SMALL, flux_train, metrics

    cfg = tmp_path / "run.yaml"
    cfg.write_text("rewards:\n  - {fn: 'flux.rewards:char_match', weight: 1.0}\n"
                   "  - {fn: 'tests.test_reward_styles:reward_len', weight: 0.01, name: length}\n")
    proc = flux_train(str(cfg), "--max-steps", "2", *SMALL, "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(tmp_path / "run")
    assert {"reward/char_match", "reward/length"} <= rows[0].keys(), sorted(rows[0])
    for r in rows:
        assert r["reward_mean"] == pytest.approx(r["reward/char_match"] + 0.01 * r["reward/length"], abs=1e-4)
    assert json.loads((tmp_path / "run" / "groups.json").read_text())["trained"] == 4
