"""A metrics sink in one file: every step's scalars as one CSV row.

    flux train --set 'logging.sinks=[examples.custom_sink:make_sink]'

A sink is any object with `write(step, metrics)` and `close()`; the factory is called once by the
controller with the run directory and the run's config. A failing sink is logged and dropped, never
stops the run (flux/sinks.py).
"""

from __future__ import annotations

import csv
import os

from flux.sinks import scalars

COLUMNS = ("step", "reward_mean", "staleness_mean", "async_ratio", "lag_mean", "samples_per_s", "eval_score")


class CsvSink:
    def __init__(self, path: str):
        self.file = open(path, "w", newline="")  # noqa: SIM115  (open for the whole run)
        self.rows = csv.DictWriter(self.file, COLUMNS, extrasaction="ignore")
        self.rows.writeheader()

    def write(self, step: int, metrics: dict) -> None:
        self.rows.writerow({**scalars(metrics), "step": step})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def make_sink(run_dir: str, config) -> CsvSink:
    return CsvSink(os.path.join(run_dir, "metrics.csv"))
