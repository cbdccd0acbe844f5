"""Metrics sinks: every step reaches every sink, TensorBoard is optional, bad sink paths fail early."""

import json
import logging
import sys
import uuid

import pytest
from click.testing import CliRunner

from actors.controller import Controller
from flux.run import protocol as P
from flux.config import ConfigError, FluxConfig, load_config
from flux.run.runtime import RunSpec
from flux.integrations.sinks.tensorboard import TensorBoardSink
from flux.sinks import JsonlSink, Sinks, open_sinks, scalars

RECORDING_SINK = '''
RECORDS = []


class Recorder:
    def __init__(self, run_dir, config):
        self.run_dir, self.config, self.steps, self.closed = run_dir, config, [], False
        RECORDS.append(self)

    def write(self, step, metrics):
        self.steps.append((step, metrics))

    def close(self):
        self.closed = True


def make(run_dir, config):
    return Recorder(run_dir, config)


def broken(run_dir, config):
    rec = Recorder(run_dir, config)
    def write(step, metrics):
        raise RuntimeError("dashboard is down")
    rec.write = write
    return rec
'''


@pytest.fixture
def sink_module(tmp_path, monkeypatch):
    """A fresh importable module with `make` (records every write) and `broken` (raises on write)."""
    name = f"recsink_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(RECORDING_SINK)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def controller(run_dir, **logging_cfg) -> Controller:
    cfg = FluxConfig(rollout={"group_size": 4}, learner={"groups_per_step": 2}, adaptive_async={"mode": "sync"},
                     logging=logging_cfg).validate()
    spec = RunSpec("r1", str(run_dir), "m", "tcp://a:1", "tcp://a:2", "tcp://a:3", "tcp://a:4", 10, cfg)
    return Controller(spec, logging.getLogger("test"))


def step(ctl: Controller, i: int) -> None:
    ctl.handle(None, P.StepReport(i, i + 1, {"reward_mean": i / 10, "staleness_mean": 0.0, "samples": 8,
                                             "tokens": 32, "learner_busy_frac": 0.5}))


def test_every_step_reaches_every_sink(tmp_path, sink_module):
    ctl = controller(tmp_path, sinks=[f"{sink_module}:make", f"{sink_module}:make"])
    for i in range(5):
        step(ctl, i)
    ctl.metrics.close()
    records = sys.modules[sink_module].RECORDS
    assert len(records) == 2 and all(r.closed for r in records)
    assert records[0].run_dir == str(tmp_path) and records[0].config.logging.sinks[0].endswith(":make")
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for rec in records:
        assert [s for s, _ in rec.steps] == [0, 1, 2, 3, 4]
        assert [m for _, m in rec.steps] == lines       # the same line metrics.jsonl got
    assert lines[2]["reward_mean"] == 0.2 and lines[2]["step"] == 2


def test_a_failing_sink_is_dropped_and_metrics_jsonl_goes_on(tmp_path, sink_module, caplog):
    ctl = controller(tmp_path, sinks=[f"{sink_module}:broken", f"{sink_module}:make"])
    with caplog.at_level(logging.ERROR, logger="flux.sinks"):
        for i in range(3):
            step(ctl, i)
    ctl.metrics.close()
    assert "dashboard is down" in caplog.text and caplog.text.count("failed; dropping it") == 1
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    good = sys.modules[sink_module].RECORDS[1]
    assert [s for s, _ in good.steps] == [0, 1, 2]


def test_scalars_flatten_numbers_only():
    flat = scalars({"a": 1, "b": 0.5, "ok": True, "name": "x", "ids": [1, 2], "nan": float("nan"),
                    "groups": {"trained": 4, "inner": {"x": 2}}, "none": None})
    assert flat == {"a": 1.0, "b": 0.5, "ok": 1.0, "groups/trained": 4.0, "groups/inner/x": 2.0}


@pytest.mark.parametrize("value", ["[nocolon]", "notalist", "[1]", "[[a:b]]"])
def test_bad_sink_entries_are_config_errors(value):
    with pytest.raises(ConfigError, match="logging.sinks"):
        load_config(None, [f"logging.sinks={value}"])


def test_unimportable_sink_stops_before_any_actor(tmp_path):
    from flux.cli import main

    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--set", "logging.sinks=[no_such_module_xyz:make]",
                                       "--out", str(out)])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flux: error: logging.sinks: ")
    assert "no_such_module_xyz" in lines[0] and not out.exists()


def test_sink_without_the_factory_is_named(tmp_path, sink_module):
    from flux.run.launcher import SetupError, prepare

    cfg = load_config(None, [f"logging.sinks=[{sink_module}:nope]"], out=str(tmp_path / "run"))
    with pytest.raises(SetupError, match=f"logging.sinks: .*{sink_module} has no function nope"):
        prepare(cfg)


def test_tensorboard_sink_writes_readable_events(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sink = TensorBoardSink(str(tmp_path / "tb"))
    for i in range(3):
        sink.write(i, {"step": i, "reward_mean": i / 4, "groups": {"trained": 2 * i}, "mode": "sync"})
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert {"reward_mean", "groups/trained", "step"} <= set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("reward_mean")] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert [e.value for e in events.Scalars("groups/trained")] == [0.0, 2.0, 4.0]


def test_tensorboard_from_config_when_installed(tmp_path):
    pytest.importorskip("tensorboard")
    ctl = controller(tmp_path, tensorboard=True)
    for i in range(2):
        step(ctl, i)
    ctl.metrics.close()
    files = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1 and files[0].stat().st_size > 0


def test_without_tensorboard_one_warning_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    cfg = FluxConfig(logging={"tensorboard": True}).validate()
    with caplog.at_level(logging.WARNING, logger="flux.sinks"):
        sinks = open_sinks(str(tmp_path), cfg)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "tensorboard" in caplog.text
    assert isinstance(sinks, Sinks) and sinks.extras == [] and isinstance(sinks.primary, JsonlSink)
    sinks.write(0, {"step": 0})
    sinks.close()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 0}\n'
    assert not (tmp_path / "tensorboard").exists()
