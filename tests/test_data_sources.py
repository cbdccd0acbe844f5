"""Prompts beyond JSONL, read with `datasets`: verl's parquet schema, TRL's conversational datasets saved to
disk, a Hub dataset in a temporary HF cache; column mapping; data.max_prompt_length with counted drops;
bad input named in one line."""

import json
import os
import subprocess
import sys

import pytest

datasets = pytest.importorskip("datasets")

from flux.config import DataConfig, FluxConfig  # noqa: E402
from flux.data import DataError, load_prompts, within_length  # noqa: E402

VERL_ROWS = [  # the rows verl's examples/data_preprocess/gsm8k.py writes
    {"data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": f"What is {i} + {i}?"}],
     "ability": "math", "reward_model": {"style": "rule", "ground_truth": str(2 * i)},
     "extra_info": {"split": "train", "index": i}}
    for i in range(6)
]


def test_verl_parquet_rows_become_chat_records_with_their_ground_truth(tmp_path):
    path = tmp_path / "train.parquet"
    datasets.Dataset.from_list(VERL_ROWS).to_parquet(str(path))
    records = load_prompts(str(path))
    assert len(records) == 6
    assert records[2]["messages"] == [{"role": "user", "content": "What is 2 + 2?"}] and "prompt" not in records[2]
    assert records[2]["answer"] == "4" and records[2]["data_source"] == "openai/gsm8k"
    assert records[2]["reward_model"] == {"style": "rule", "ground_truth": "4"}  # kept for verl's compute_score


def test_trl_conversational_dataset_saved_to_disk_with_splits_and_a_column_map(tmp_path):
    rows = {"prompt": [[{"role": "user", "content": f"q{i}"}] for i in range(4)], "solution": ["a", "b", "c", "d"]}
    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows),
                               "test": datasets.Dataset.from_dict({k: v[:1] for k, v in rows.items()})})
    ds.save_to_disk(str(tmp_path / "saved"))
    records = load_prompts(str(tmp_path / "saved"), DataConfig(answer_key="solution"))
    assert [r["answer"] for r in records] == ["a", "b", "c", "d"] and records[0]["messages"][0]["content"] == "q0"
    assert len(load_prompts(str(tmp_path / "saved"), DataConfig(answer_key="solution", split="test"))) == 1
    with pytest.raises(DataError, match=r"no split 'dev' \(data.split; it has train, test\)"):
        load_prompts(str(tmp_path / "saved"), DataConfig(split="dev"))


def test_json_and_csv_files_and_a_prompt_column_of_another_name(tmp_path):
    (tmp_path / "p.json").write_text(json.dumps([{"question": "2+2", "answer": 4}, {"question": "3+3", "answer": 6}]))
    records = load_prompts(str(tmp_path / "p.json"), DataConfig(prompt_key="question"))
    assert [(r["prompt"], r["answer"]) for r in records] == [("2+2", 4), ("3+3", 6)]
    (tmp_path / "p.csv").write_text("question,answer\n1+1,2\n")
    assert load_prompts(str(tmp_path / "p.csv"), DataConfig(prompt_key="question"))[0]["prompt"] == "1+1"
    (tmp_path / "q.jsonl").write_text('{"question": "x"}\n{"text": "y"}\n')  # JSONL is mapped the same way
    with pytest.raises(DataError, match=r"q.jsonl:2: no `question` column \(data.prompt_key\)"):
        load_prompts(str(tmp_path / "q.jsonl"), DataConfig(prompt_key="question"))


def test_a_hub_dataset_is_found_in_the_local_hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    repo = tmp_path / "hub" / "datasets--flux-test--gsm8k-mini"
    (repo / "snapshots" / "c0ffee" / "data").mkdir(parents=True)
    datasets.Dataset.from_list(VERL_ROWS).to_parquet(str(repo / "snapshots" / "c0ffee" / "data" / "train.parquet"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("c0ffee")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    records = load_prompts("flux-test/gsm8k-mini")
    assert len(records) == 6 and records[0]["answer"] == "0"
    with pytest.raises(DataError, match="flux-test/absent is not a directory, nor in the local HF cache"):
        load_prompts("flux-test/absent")


def test_rows_that_are_wrong_are_named_by_file_row_and_field(tmp_path):
    path = tmp_path / "bad.parquet"
    datasets.Dataset.from_list([{"prompt": "ok"}, {"prompt": None, "other": "x"}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"bad.parquet row 2: `prompt` must be a string"):
        load_prompts(str(path))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DataError, match=r"junk.parquet: `datasets` could not read it: ") as e:
        load_prompts(str(tmp_path / "junk.parquet"))
    assert "\n" not in str(e.value)


def test_without_datasets_the_error_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    (tmp_path / "p.parquet").write_bytes(b"x")
    with pytest.raises(DataError, match=r"needs the `datasets` library: pip install 'flux-rlhf\[data\]'"):
        load_prompts(str(tmp_path / "p.parquet"))


def test_prompts_longer_than_the_limit_are_left_out_and_counted(tmp_path):
    from flux.integrations.builtin.tiny import build_tokenizer

    tok = build_tokenizer()
    records = [{"prompt": "rev 1="}, {"prompt": "rev 123456789012345="}, {"prompt": "rev 12="}]
    cfg = FluxConfig(data={"max_prompt_length": 8})
    kept, dropped = within_length(records, cfg, tok)
    assert [r["prompt"] for r in kept] == ["rev 1=", "rev 12="] and dropped == 1
    assert within_length(records, FluxConfig(), None) == (records, 0)  # no limit: no tokenizer needed
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        within_length(records, cfg, None)


@pytest.mark.slow
def test_a_run_on_parquet_counts_the_prompts_it_leaves_out(default_model, tmp_path):
    from tests.test_e2e import SMALL, assert_nothing_left, metrics, train_cmd

    rows = [{"prompt": [{"role": "user", "content": f"rev {d}="}], "reward_model": {"ground_truth": d[::-1]}}
            for d in ("12", "345", "6789", "1234567890123456789", "55", "908")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "run"
    proc = subprocess.run(train_cmd("--max-steps", "2", *SMALL, "--set", f"prompts={tmp_path / 'train.parquet'}",
                                    "--set", "data.max_prompt_length=30", "--set", "eval.split_fraction=0.3",
                                    "--out", str(out)),
                          capture_output=True, text=True, timeout=200, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = json.loads((out / "data.json").read_text())
    assert counts["train"] + counts["train_too_long"] + counts["eval_too_long"] <= 6
    assert counts["train_too_long"] + counts["eval_too_long"] == 1, counts
    assert f"data.max_prompt_length=30 leaves out {counts['train_too_long']} training and " in proc.stdout
    assert len(metrics(out)) == 2
    assert_nothing_left(out)
    bad = subprocess.run(train_cmd("--set", f"prompts={tmp_path / 'absent.parquet'}", "--out", str(tmp_path / "r2")),
                         capture_output=True, text=True, timeout=100)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert "absent.parquet: no such prompts file, directory or dataset" in bad.stderr
