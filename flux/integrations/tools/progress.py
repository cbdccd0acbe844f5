"""The progress of `flux train`: on a terminal a tqdm bar, else plain lines (the launcher follows the
run's metrics.jsonl with it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


class Progress:
    """Follows metrics.jsonl: on a terminal a tqdm bar (steps, rate, ETA, the step's numbers), else one
    plain line every 10 steps and at the last."""

    def __init__(self, run_dir: str, max_steps: int, stream=sys.stdout):
        self.path, self.max_steps, self.stream = Path(run_dir) / "metrics.jsonl", max_steps, stream
        self.tty = stream.isatty()
        self.offset = 0
        self.rows: list[dict] = []
        self.bar = None

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open() as f:
            f.seek(self.offset)
            chunk = f.read()
        complete = chunk[: chunk.rfind("\n") + 1]
        self.offset += len(complete.encode())
        for line in complete.splitlines():
            row = json.loads(line)
            self.rows.append(row)
            self.show(row)

    def show(self, m: dict) -> None:
        numbers = (f"reward {m['reward_mean']:.3f}  staleness {m['staleness_mean']:.3f}  "
                   f"async {m['async_ratio']:.2f}  lag {m.get('lag_mean', 0):.2f}  {m['samples_per_s']:.1f} samples/s"
                   + (f"  eval {m['eval_score']:.3f}" if "eval_score" in m else ""))
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self.max_steps, file=self.stream, unit="step", dynamic_ncols=True,
                                initial=m["step"], bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                                              "[{elapsed}<{remaining}, {rate_fmt}] {postfix}")
            self.bar.set_postfix_str(numbers, refresh=False)
            self.bar.update(m["step"] + 1 - self.bar.n)
        elif m["step"] % 10 == 0 or m["step"] + 1 == self.max_steps:
            self.stream.write(f"step {m['step'] + 1}/{self.max_steps}  {numbers}  {m['wall_s']:.0f}s\n")
            self.stream.flush()

    def say(self, line: str) -> None:
        """A line of the run's own (a generator died, a server restarted) above the bar."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def summarize(self) -> None:
        """The run's last lines: steps, wall time, reward first → last, held-out eval, where things are."""
        rows, stream, run_dir = self.rows, self.stream, self.path.parent
        if not rows:
            stream.write("flux: no steps were recorded\n")
            return
        first, last = rows[0], rows[-1]
        k, j = max(1, len(rows) // 10), min(5, len(rows))
        head = sum(r["reward_mean"] for r in rows[:j]) / j
        tail = sum(r["reward_mean"] for r in rows[-k:]) / k
        stream.write(f"flux: {len(rows)} steps in {last['wall_s']:.0f}s; reward {head:.3f} (first {j} steps) → "
                     f"{tail:.3f} (last {k} steps)")
        if "eval_score" in first:
            stream.write(f"; held-out eval {first['eval_score']:.3f} → {last['eval_score']:.3f}")
        stream.write(f"\nflux: metrics {run_dir}/metrics.jsonl; checkpoint {run_dir}/checkpoints/step_{last['step'] + 1}\n")
