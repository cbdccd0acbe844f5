"""`flux plot`: one PNG with every panel, from a synthetic run directory; clear errors otherwise."""

import importlib.util
import json
import sys

import pytest
from click.testing import CliRunner

from flux.integrations.tools import plot as P
from flux.cli import main
from flux.config import FluxConfig, dump_config

needs_matplotlib = pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                      reason="matplotlib is not installed (the `plot` extra)")

PNG = b"\x89PNG\r\n\x1a\n"


def rows(n: int) -> list[dict]:
    out = []
    for i in range(n):
        out.append({"step": i, "version": i + 1, "reward_mean": i / n, "eval_score": 0.4 if i < n // 2 else 0.6,
                    "wall_s": 2.0 + 0.5 * i, "samples": 8, "staleness_mean": 0.1 + 0.01 * (i % 3),
                    "staleness_ema": 0.1, "async_ratio": 0.3, "lag_mean": 0.4, "lag_max": 1,
                    "samples_per_s": 16.0, "learner_busy_frac": 0.6, "generator_busy_frac": 0.7,
                    "generator_busy": {"gen0": 0.6, "gen1": 0.8}, "dropped_stale": i // 5,
                    "groups": {"requeued": 0}})
    return out


def run_dir(tmp_path, n: int = 20):
    d = tmp_path / "run"
    d.mkdir()
    dump_config(FluxConfig(adaptive_async={"target_staleness": 0.15}), d / "config.yaml")
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return d


@needs_matplotlib
def test_figure_has_every_panel_with_labelled_axes():
    fig = P.plot_run(rows(20), target=0.1, title="t")
    axes = fig.axes
    assert [a.get_title() for a in axes] == list(P.PANELS)
    assert all(a.get_xlabel() and a.get_ylabel() for a in axes)
    by = {a.get_title(): a for a in axes}
    labels = {t: [line.get_label() for line in a.get_lines()] for t, a in by.items()}
    assert "held-out eval" in labels["reward vs step"] and "held-out eval" in labels["reward vs wall time"]
    assert "target 0.1" in labels["staleness"] and "S RMS (controller)" in labels["staleness"]
    assert {"lag mean", "lag max"} <= set(labels["lag"])
    assert {"learner", "generators (mean)", "gen0", "gen1"} <= set(labels["busy fractions"])
    # reward vs wall time really is against wall time
    raw = by["reward vs wall time"].get_lines()[0]
    assert list(raw.get_xdata()) == [2.0 + 0.5 * i for i in range(20)]


def test_eval_points_follow_the_eval_schedule():
    assert [r["step"] for r in P.eval_points(rows(20), every=0, max_steps=20)] == [0, 19]
    assert [r["step"] for r in P.eval_points(rows(20), every=5, max_steps=20)] == [0, 4, 9, 14, 19]
    assert [r["step"] for r in P.eval_points(rows(20), every=0, max_steps=100)] == [0]   # interrupted
    assert [r["step"] for r in P.eval_points(rows(20))] == [0, 10]     # no config: where the score changes
    assert P.eval_points([{"step": 0}]) == []


@needs_matplotlib
def test_plot_run_dir_writes_a_png_beside_the_metrics(tmp_path):
    d = run_dir(tmp_path)
    path = P.plot_run_dir(d)
    assert path == d / "plot.png" and path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000
    other = P.plot_run_dir(d, tmp_path / "sub" / "x.png")
    assert other.read_bytes()[:8] == PNG


@needs_matplotlib
def test_cli_plot_with_out(tmp_path):
    d = run_dir(tmp_path)
    out = tmp_path / "p.png"
    result = CliRunner().invoke(main, ["plot", str(d), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"flux: wrote {out}" and out.read_bytes()[:8] == PNG


def test_a_half_written_last_line_is_skipped(tmp_path):
    d = run_dir(tmp_path, 5)
    with (d / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "rew')
    assert [r["step"] for r in P.read_rows(d / "metrics.jsonl")] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("case, needle", [
    ("missing", "no such run directory"),
    ("no metrics", "metrics.jsonl: no such file"),
    ("empty metrics", "no steps recorded yet"),
    ("garbage", "metrics.jsonl:2: not JSON"),
])
def test_bad_run_dirs_give_one_error_line_and_exit_2(tmp_path, case, needle):
    d = tmp_path / "run"
    if case != "missing":
        d.mkdir()
    if case == "empty metrics":
        (d / "metrics.jsonl").write_text("")
    elif case == "garbage":
        (d / "metrics.jsonl").write_text('{"step": 0}\nnope\n')
    result = CliRunner().invoke(main, ["plot", str(d)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flux: error: ") and needle in lines[0], lines


def test_without_matplotlib_one_clear_line(tmp_path, monkeypatch):
    d = run_dir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(P.PlotError, match="matplotlib"):
        P.plot_run_dir(d)
    result = CliRunner().invoke(main, ["plot", str(d)])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [
        'flux: error: plots need matplotlib: pip install matplotlib (or the extra: ".[plot]")']


def test_shared_helpers():
    assert P.smooth([1, 2, 3, 4], 2) == [1, 1.5, 2.5, 3.5]
    assert P.window_rate([{"samples": 8, "wall_s": 0.0}, {"samples": 8, "wall_s": 2.0}]) == 4.0
