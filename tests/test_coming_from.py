"""The configs of docs/coming-from-trl.md and docs/coming-from-verl.md run as they are (shortened)."""

import pytest

from tests.test_e2e import flux_train, metrics

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("name, logged", [("from_trl", {"reward/digits", "reward/length"}),
                                          ("from_verl", {"reward/exact"})])
def test_the_example_config_runs(default_model, tmp_path, name, logged):
    proc = flux_train(str(ROOT / "examples" / f"{name}.yaml"), "--max-steps", "3", "--set", "eval.num_prompts=10",
                      "--set", "learner.groups_per_step=2", "--out", str(tmp_path / "run"), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2] and logged <= rows[-1].keys(), sorted(rows[-1])
    assert "eval_score" in rows[-1]
    assert "evaluating on 10 held-out prompts of builtin:sort" in proc.stdout
