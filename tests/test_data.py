"""Prompt records: JSONL validation with file:line messages, built-in sources, rendering to token ids."""

import json

import pytest

from flux.data import DataError, load_prompts, render_prompt, write_jsonl
from flux.integrations.builtin.tiny import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def jsonl(tmp_path, *lines, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_reads_prompt_and_messages_records_and_skips_blank_lines(tmp_path):
    path = jsonl(tmp_path, '{"prompt": "rev 12=", "answer": "21", "level": 3}', "",
                 '{"messages": [{"role": "user", "content": "hi"}]}', "   ")
    records = load_prompts(path)
    assert records == [{"prompt": "rev 12=", "answer": "21", "level": 3},
                       {"messages": [{"role": "user", "content": "hi"}]}]


def test_write_jsonl_round_trip(tmp_path):
    records = [{"prompt": f"rev {i}=", "answer": str(i)[::-1]} for i in range(5)]
    write_jsonl(records, tmp_path / "sub" / "out.jsonl")
    assert load_prompts(str(tmp_path / "sub" / "out.jsonl")) == records


def test_missing_file(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"{missing}: no such prompts file"):
        load_prompts(missing)


def test_not_json_names_file_and_line(tmp_path):
    path = jsonl(tmp_path, '{"prompt": "a"}', "", '{"prompt": "b",,}')
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert str(e.value).startswith(f"{path}:3: not valid JSON")


@pytest.mark.parametrize("line, why", [
    ('{"answer": "1"}', "needs a `prompt` string or a `messages` list"),
    ('{"prompt": 12}', "`prompt` must be a string"),
    ('{"messages": []}', "`messages` must be a non-empty list"),
    ('{"messages": [{"role": "user"}]}', "`messages` must be a non-empty list"),
    ('{"messages": "hi"}', "`messages` must be a non-empty list"),
    ('["prompt", "x"]', "expected a JSON object, got list"),
    ('"rev 1="', "expected a JSON object, got str"),
])
def test_bad_record_names_file_and_line(tmp_path, line, why):
    path = jsonl(tmp_path, '{"prompt": "ok"}', line)
    with pytest.raises(DataError) as e:
        load_prompts(path)
    assert str(e.value).startswith(f"{path}:2: {why}")


def test_empty_file(tmp_path):
    path = jsonl(tmp_path, "", "  ")
    with pytest.raises(DataError, match="no prompts in file"):
        load_prompts(path)


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


def test_builtin_source():
    from flux.integrations.builtin import tasks
    from flux.config import FluxConfig

    default = FluxConfig().prompts                      # `builtin:<task>`: whichever task is the default
    name = default.removeprefix("builtin:")
    assert load_prompts(default) == tasks.builtin_records(name) == tasks.builtin_records(f"{name}:train")
    assert load_prompts(f"{default}:eval") == tasks.builtin_records(f"{name}:eval")
    with pytest.raises(ValueError, match="unknown built-in task"):
        load_prompts("builtin:no_such_task")


def test_render_plain_prompt_has_no_special_tokens(tokenizer):
    ids = render_prompt({"prompt": "rev 123="}, tokenizer)
    assert isinstance(ids, list) and len(ids) == len("rev 123=")  # character-level tokenizer
    assert tokenizer.decode(ids) == "rev 123="


def test_render_messages_through_the_chat_template(tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "rev 123="}]
    ids = render_prompt({"messages": messages}, tokenizer)
    assert all(isinstance(i, int) for i in ids)
    expected = ("<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\nrev 123=<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert tokenizer.decode(ids) == expected
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert ids[0] == im_start and ids.count(im_start) == 3  # special tokens are single ids, not spelled out


def test_render_messages_without_a_chat_template(tokenizer):
    plain = build_tokenizer()
    plain.chat_template = None
    ids = render_prompt({"messages": [{"role": "user", "content": "hi"}]}, plain)
    assert plain.decode(ids) == "user: hi\nassistant: "


def test_records_survive_json_round_trip(tmp_path):
    rec = {"prompt": "rev 1=", "answer": "1", "meta": {"nested": [1, 2]}}
    path = jsonl(tmp_path, json.dumps(rec))
    assert load_prompts(path) == [rec]


def test_evaluation_defaults_never_pick_a_task_the_run_does_not_train_on(tmp_path):
    from flux.config import load_config
    from flux.data import eval_source, split_indices, split_records, training_records
    from flux.evaluation import describe_eval, eval_records

    path = jsonl(tmp_path, *[json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(40)])
    cfg = load_config(None, [f"prompts={path}"])
    assert eval_source(cfg) == "" and eval_records(cfg) == [] and "no held-out evaluation" in describe_eval(cfg)
    assert training_records(cfg) == load_prompts(path)
    cfg = load_config(None, [f"prompts={path}", "eval.split_fraction=0.25"])
    train, held = split_records(cfg)
    assert eval_source(cfg) == "split" and eval_records(cfg) == held and 4 <= len(held) <= 18
    assert sorted(r["prompt"] for r in train + held) == sorted(f"q{i}" for i in range(40))  # disjoint, complete
    assert f"evaluating on {len(held)} held-out prompts of {path}" in describe_eval(cfg)
    assert split_indices(40, 0.25, cfg.seed) == split_indices(40, 0.25, cfg.seed)  # the same in every process
    assert split_indices(2, 0.01, 0)[1] and split_indices(2, 0.99, 0)[0]  # at least one of each
    assert eval_source(load_config(None, ["prompts=builtin:repeat"])) == "builtin:repeat"  # its own task
    assert eval_source(load_config(None, ["prompts=builtin:sort:train"])) == "builtin:sort"
    assert eval_source(load_config(None, [f"prompts={path}", f"eval.prompts={path}"])) == path  # as given
