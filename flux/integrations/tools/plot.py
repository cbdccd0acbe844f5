"""`flux plot`: one PNG of a run from its metrics.jsonl, and the pieces bench/ plots share.

matplotlib (the `plot` or `bench` extra) is imported only inside `pyplot()`, with the Agg backend, so
plots render without a display and the core installs without it.
"""

from __future__ import annotations

import json
from pathlib import Path

PANELS = ("reward vs step", "reward vs wall time", "staleness", "async ratio", "lag", "throughput",
          "busy fractions", "dropped groups")


class PlotError(ValueError):
    """Nothing to plot, or no matplotlib; the message is one line."""


def pyplot():
    """matplotlib.pyplot on the Agg backend; PlotError if matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError('plots need matplotlib: pip install matplotlib (or the extra: ".[plot]")') from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | Path, dpi: int = 110) -> Path:
    """Write the figure (making its directory) and free it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def smooth(xs: list[float], window: int) -> list[float]:
    """Trailing moving average (window ≥ 1)."""
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= window:
            acc -= xs[i - window]
        out.append(acc / min(i + 1, window))
    return out


def window_rate(rows: list[dict]) -> float:
    """Samples trained per second over consecutive rows (from their `samples` and `wall_s`)."""
    if len(rows) < 2:
        return float("nan")
    dt = rows[-1]["wall_s"] - rows[0]["wall_s"]
    return sum(int(r.get("samples", 0)) for r in rows[1:]) / dt if dt > 0 else float("nan")


def read_rows(path: str | Path) -> list[dict]:
    """Every complete line of a metrics.jsonl; PlotError naming the file and line if one is not JSON."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise PlotError(f"{path}: no such file") from None
    rows = []
    for i, line in enumerate(text[: text.rfind("\n") + 1].splitlines(), 1):  # a half-written tail is skipped
        try:
            rows.append(json.loads(line))
        except ValueError:
            raise PlotError(f"{path}:{i}: not JSON") from None
    return rows


def eval_points(rows: list[dict], every: int = 0, max_steps: int | None = None) -> list[dict]:
    """The rows that carry a fresh held-out eval score (every row repeats the latest one).

    The learner evaluates before the first step (row 0), every `every` steps and after the last step
    (`eval.every`, `max_steps`); without `max_steps`, the rows where the score changes stand in.
    """
    def fresh(i: int, r: dict) -> bool:
        if i == 0:
            return True
        if max_steps is None:
            return r["eval_score"] != rows[i - 1].get("eval_score")
        return r["step"] == max_steps - 1 or bool(every and (r["step"] + 1) % every == 0)

    return [r for i, r in enumerate(rows) if "eval_score" in r and fresh(i, r)]


def plot_run(rows: list[dict], target: float | None = None, title: str = "", eval_every: int = 0,
             max_steps: int | None = None):
    """A 4×2 figure of one run's metrics rows, one panel per entry of PANELS; returns the Figure.

    `target` is the staleness target; `eval_every` and `max_steps` place the eval points (eval_points).

    Per-step values are drawn faint with a trailing mean on top when they are noisy (reward, staleness);
    samples/s is the run's cumulative rate plus a windowed rate; busy fractions include each generator's
    own when metrics carry `generator_busy`.
    """
    if not rows:
        raise PlotError("no steps to plot")
    plt = pyplot()
    w = max(1, len(rows) // 50)
    steps = [r["step"] for r in rows]
    wall = [r.get("wall_s", 0.0) for r in rows]

    def col(key, default=float("nan")):
        return [r.get(key, default) for r in rows]

    fig, axes = plt.subplots(4, 2, figsize=(13, 13))
    ax = dict(zip(PANELS, axes.flat))
    reward = col("reward_mean")
    evals = eval_points(rows, eval_every, max_steps)
    views = (("reward vs step", steps, [r["step"] for r in evals], "step"),
             ("reward vs wall time", wall, [r["wall_s"] for r in evals], "wall time (s)"))
    for name, x, x_eval, xlabel in views:
        a = ax[name]
        a.plot(x, reward, c="C0", alpha=0.3, lw=0.8, label="reward per step")
        a.plot(x, smooth(reward, w), c="C0", label=f"reward ({w}-step mean)")
        if evals:
            a.plot(x_eval, [r["eval_score"] for r in evals], "o", c="C3", label="held-out eval")
        a.set(xlabel=xlabel, ylabel="reward", title=name)

    a = ax["staleness"]
    a.plot(steps, col("staleness_mean"), c="C0", alpha=0.35, lw=0.8, label="S per step")
    a.plot(steps, col("staleness_ema"), c="C0", label="S RMS (controller)")
    if target is not None:
        a.axhline(target, ls="--", c="k", lw=1, label=f"target {target:g}")
    a.set(xlabel="step", ylabel="staleness S", title="staleness")

    a = ax["async ratio"]
    a.plot(steps, col("async_ratio"), c="C2", label="async ratio a")
    a.set(xlabel="step", ylabel="async ratio a", title="async ratio", ylim=(-0.05, 1.05))

    a = ax["lag"]
    a.plot(steps, col("lag_mean"), c="C4", label="lag mean")
    a.plot(steps, col("lag_max"), c="C4", ls=":", label="lag max")
    a.set(xlabel="step", ylabel="lag (versions)", title="lag")

    a = ax["throughput"]
    win = max(2, len(rows) // 30)
    a.plot(steps, col("samples_per_s"), c="C3", label="samples/s (cumulative)")
    a.plot(steps[1:], [window_rate(rows[max(0, i - win):i + 1]) for i in range(1, len(rows))], c="C3",
           alpha=0.4, label=f"samples/s ({win}-step window)")
    a.set(xlabel="step", ylabel="samples/s", title="throughput")

    a = ax["busy fractions"]
    a.plot(steps, col("learner_busy_frac"), c="C1", label="learner")
    a.plot(steps, col("generator_busy_frac"), c="C2", label="generators (mean)")
    gens = sorted({g for r in rows for g in r.get("generator_busy", {})})
    if len(gens) > 1:
        for g in gens:
            a.plot(steps, [r.get("generator_busy", {}).get(g, float("nan")) for r in rows], lw=0.8, alpha=0.6,
                   label=g)
    a.set(xlabel="step", ylabel="busy fraction", title="busy fractions", ylim=(-0.05, 1.05))

    a = ax["dropped groups"]
    a.plot(steps, col("dropped_stale", 0), c="C5", label="dropped as too stale (buffer)")
    a.plot(steps, [r.get("groups", {}).get("requeued", 0) for r in rows], c="C6",
           label="re-queued (dead generator)")
    a.set(xlabel="step", ylabel="groups (cumulative)", title="dropped groups")

    for a in axes.flat:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_run_dir(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """RUN_DIR/metrics.jsonl (+ config.yaml for the staleness target) → a PNG (default RUN_DIR/plot.png)."""
    import yaml

    d = Path(run_dir)
    if not d.is_dir():
        raise PlotError(f"{d}: no such run directory")
    rows = read_rows(d / "metrics.jsonl")
    if not rows:
        raise PlotError(f"{d / 'metrics.jsonl'}: no steps recorded yet")
    target, every, max_steps = None, 0, None
    try:
        cfg = yaml.safe_load((d / "config.yaml").read_text()) or {}
        target = float(cfg["adaptive_async"]["target_staleness"])
        every, max_steps = int(cfg["eval"]["every"]), int(cfg["max_steps"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
        pass  # no (or an old) config: no target line, eval points where the score changes
    fig = plot_run(rows, target, f"{d.name}: {len(rows)} steps", every, max_steps)
    return save(fig, out or d / "plot.png")
