"""The built-in task, the embedded tokenizer and the warm-start of the default model."""

import pytest
import torch

from flux.integrations.builtin import tasks
from flux.rewards import char_match
from flux.integrations.builtin.tiny import CHARS, SPECIAL_TOKENS, build_model, build_tokenizer

torch.set_num_threads(1)


def digits_of(record: dict) -> str:
    return record["prompt"].removeprefix("sort ").removesuffix("=")


def test_train_and_held_out_splits_are_disjoint_and_cover_the_task():
    train, held = tasks.sort_records("train"), tasks.sort_records("eval")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert len({r["prompt"] for r in train + held}) == len(train) + len(held) == 10 * 9 * 8
    assert 0.1 < len(held) / (len(train) + len(held)) < 0.3          # about 20% held out
    # split by multiset: no held-out answer (and no permutation of a held-out prompt) is ever trained on
    assert not {r["answer"] for r in train} & {r["answer"] for r in held}
    for r in train + held:
        assert len(digits_of(r)) == tasks.LENGTH and r["answer"] == "".join(sorted(digits_of(r)))
        assert r["task"] == "sort"
    assert tasks.sort_records("train") == train                      # stable, not salted


def test_the_repeat_task_is_long_tailed_and_split_by_digit_and_count():
    import numpy as np

    train, held = tasks.repeat_records("train"), tasks.repeat_records("eval")
    pair = lambda r: tuple(r["prompt"].removeprefix("rep ").removesuffix("=").split())
    assert not {pair(r) for r in train} & {pair(r) for r in held}
    count = {n: c for n, c in tasks.repeat_counts().items()}
    assert all(sum(pair(x) == pair(r) for x in held) == count[int(pair(r)[1])] for r in held[:20])
    for r in train + held:
        d, n = pair(r)
        assert r["answer"] == d * int(n) and 1 <= int(n) <= tasks.REPEAT_MAX
    for split in (train, held):
        lengths = np.array([len(r["answer"]) + 1 for r in split])     # + the end-of-sequence token
        assert np.percentile(lengths, 99) >= 8 * np.median(lengths)   # the long tail of the issue
    assert tasks.builtin_records("repeat:eval") == held and tasks.eval_records("builtin:repeat") == held


def test_builtin_names_and_eval_records():
    assert tasks.builtin_records("sort") == tasks.sort_records("train")
    assert tasks.builtin_records("sort:train") == tasks.sort_records("train")
    assert tasks.builtin_records("sort:eval") == tasks.sort_records("eval")
    assert tasks.eval_records("builtin:sort") == tasks.sort_records("eval")
    with pytest.raises(ValueError, match="unknown built-in task"):
        tasks.builtin_records("reverse_words")
    with pytest.raises(ValueError, match="split must be"):
        tasks.builtin_records("sort:test")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.mark.parametrize("text", ["sort 3814=1348", "hello, world?! a-b+c.", "x\ny z",
                                  "<|im_start|>user\nhi<|im_end|>"])
def test_tokenizer_round_trips_text(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text


def test_tokenizer_is_character_level_with_single_special_tokens(tokenizer):
    for ch in CHARS:
        assert len(tokenizer(ch, add_special_tokens=False).input_ids) == 1, repr(ch)
    assert len(tokenizer("sort 3814=", add_special_tokens=False).input_ids) == len("sort 3814=")
    assert tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(len(SPECIAL_TOKENS)))
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1
    assert len(tokenizer) == len(SPECIAL_TOKENS) + len(CHARS)


def test_saved_tokenizer_loads_identically_with_auto_tokenizer(default_model, tokenizer):
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(default_model)
    texts = ["sort 3814=", "sort 3814=1348", "hello, world?!", "a b\nc"]
    for text in texts:
        assert ids(loaded, text) == ids(tokenizer, text)
        assert loaded.decode(loaded(text, add_special_tokens=False).input_ids) == text
    assert (loaded.pad_token_id, loaded.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    messages = [{"role": "user", "content": "sort 3814="}]
    chat = {"add_generation_prompt": True, "tokenize": False}
    assert loaded.apply_chat_template(messages, **chat) == tokenizer.apply_chat_template(messages, **chat)
    assert loaded.convert_tokens_to_ids(SPECIAL_TOKENS) == tokenizer.convert_tokens_to_ids(SPECIAL_TOKENS)


def test_every_id_the_saved_tokenizer_can_produce_has_an_embedding_row(default_model):
    # transformers 5 loads the saved tokenizer as Qwen2Tokenizer, which appends `<|endoftext|>` after
    # our vocabulary (and drops characters outside the alphabet); the padded embedding covers it.
    from transformers import AutoConfig, AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(default_model)
    vocab_rows = AutoConfig.from_pretrained(default_model).vocab_size
    assert max(loaded.get_vocab().values()) < vocab_rows
    assert all(i < vocab_rows for i in ids(loaded, "<|endoftext|>x ABC é sort 381="))


def test_default_model_matches_its_tokenizer(default_model):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(default_model)
    assert len(build_tokenizer()) <= cfg.vocab_size < len(build_tokenizer()) + 64
    assert (default_model / "flux_recipe.json").is_file()


def _probe():
    import random

    return random.Random(0).sample(tasks.sort_records("train"), 64)


def test_default_model_is_warm_and_a_random_one_is_not(default_model):
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer()
    warm = AutoModelForCausalLM.from_pretrained(default_model)
    reward = tasks._sampled_reward(warm, tok, _probe(), torch.Generator().manual_seed(1), char_match)
    # warm-started to 0.2 on the same kind of probe (sampling noise aside), and far from solved
    assert 0.15 <= reward <= 0.35
    cold = build_model(len(tok), seed=0)
    reward = tasks._sampled_reward(cold, tok, _probe(), torch.Generator().manual_seed(1), char_match)
    assert reward < tasks.WARM_TARGET_REWARD


def test_warm_start_stops_at_the_first_check_reaching_the_target(monkeypatch):
    """Scripted probe rewards: checks happen every 2 SFT steps; the first one ≥ 0.2 ends the warm-start."""
    tok = build_tokenizer()
    model = build_model(len(tok), seed=0)
    scripted = iter([0.05, 0.1, 0.199, 0.2, 0.9])
    calls = []

    def fake_reward(*args, **kwargs):
        calls.append(1)
        return next(scripted)

    monkeypatch.setattr(tasks, "_sampled_reward", fake_reward)
    before = [p.detach().clone() for p in model.parameters()]
    steps = tasks.warm_start(model, tok, max_steps=50, batch=8)
    assert steps == 6 and len(calls) == 4
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))  # it did train

    monkeypatch.setattr(tasks, "_sampled_reward", lambda *a, **k: 0.0)
    assert tasks.warm_start(build_model(len(tok), seed=0), tok, max_steps=3, batch=8) == 3   # gives up at max
