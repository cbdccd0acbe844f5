"""Checkpoints are whole or absent: staged, completed with the controller's state, renamed in one step."""

import io
import json

import pytest

from flux.run.checkpoints import complete_checkpoints, finish_checkpoint, staging_dir
from flux.run.launcher import SetupError, latest_checkpoint


def stage(run_dir, step, learner_files=("model.safetensors", "trainer_state.json")):
    staged = staging_dir(run_dir / "checkpoints" / f"step_{step}")
    staged.mkdir(parents=True)
    for name in learner_files:
        (staged / name).write_text("{}")
    return staged


def test_a_staged_checkpoint_appears_only_once_complete(tmp_path):
    staged = stage(tmp_path, 4)
    assert complete_checkpoints(tmp_path) == ([], [staged])            # the learner's half alone: incomplete
    final = finish_checkpoint(tmp_path / "checkpoints" / "step_4", {"step": 4, "version": 4})
    assert final.name == "step_4" and not staged.exists()
    assert json.loads((final / "controller_state.json").read_text())["version"] == 4
    assert complete_checkpoints(tmp_path) == ([(4, final)], [])


def test_resume_takes_the_newest_complete_one_and_names_what_it_skips(tmp_path):
    for step in (2, 4):
        stage(tmp_path, step)
        finish_checkpoint(tmp_path / "checkpoints" / f"step_{step}", {"step": step})
    crashed = stage(tmp_path, 6)                                          # killed while the model was written
    cut = tmp_path / "checkpoints" / "step_8"                             # an old-style, half-written one
    cut.mkdir()
    (cut / "trainer_state.json").write_text("{}")
    (cut / "controller_state.json").write_text('{"step": 8, "ver')      # cut mid-write
    said = io.StringIO()
    assert latest_checkpoint(tmp_path, said) == tmp_path / "checkpoints" / "step_4"
    assert f"skipping incomplete checkpoint {crashed}" in said.getvalue()
    assert f"skipping incomplete checkpoint {cut}" in said.getvalue()


def test_no_complete_checkpoint_is_a_setup_error(tmp_path):
    stage(tmp_path, 2)
    with pytest.raises(SetupError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path)


def test_keep_last_removes_the_older_ones(tmp_path):
    for step in (1, 2, 3, 4):
        stage(tmp_path, step)
        finish_checkpoint(tmp_path / "checkpoints" / f"step_{step}", {"step": step}, keep_last=2)
    assert [s for s, _ in complete_checkpoints(tmp_path)[0]] == [3, 4]


def test_the_same_step_saved_again_replaces_the_old_one_whole(tmp_path):
    stage(tmp_path, 3)
    finish_checkpoint(tmp_path / "checkpoints" / "step_3", {"run": 1})
    stage(tmp_path, 3, learner_files=("trainer_state.json",))
    final = finish_checkpoint(tmp_path / "checkpoints" / "step_3", {"run": 2})
    assert json.loads((final / "controller_state.json").read_text()) == {"run": 2}
    assert not (final / "model.safetensors").exists()                    # nothing of the old one mixed in
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3"]
