"""Metrics sinks: every step reaches every sink, TensorBoard is optional, bad sink paths fail early."""

import json
import logging
import sys
import time
import uuid

import pytest
from click.testing import CliRunner

from actors.controller import Controller
from flux.run import protocol as P
from flux.config import ConfigError, FluxConfig, load_config
from flux.run.runtime import RunSpec
from flux.integrations.sinks.tensorboard import TensorBoardSink
from flux.integrations.sinks import grouped
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
    assert set(events.Tags()["scalars"]) == {"rollout/reward_mean", "rollout/groups/trained"}
    assert [(e.step, e.value) for e in events.Scalars("rollout/reward_mean")] == [(0, 0.0), (1, 0.25), (2, 0.5)]
    assert [e.value for e in events.Scalars("rollout/groups/trained")] == [0.0, 2.0, 4.0]


def test_dashboards_group_metric_names_the_way_users_scan_them():
    row = {"step": 3, "reward_mean": 0.5, "reward": {"char_match": 0.4}, "loss": 0.1, "grad_norm": 2.0,
           "lag_mean": 0.6, "staleness_mean": 0.1, "async_ratio": 0.3, "sig_k3": 0.01, "time_update_s": 0.2,
           "wall_s": 9.0, "eval_score": 0.7, "samples_per_s": 100.0, "groups": {"trained": 4}, "checkpoint": "x"}
    assert grouped(row) == {
        "rollout/reward_mean": 0.5, "rollout/reward/char_match": 0.4, "train/loss": 0.1, "train/grad_norm": 2.0,
        "staleness/lag_mean": 0.6, "staleness/staleness_mean": 0.1, "staleness/async_ratio": 0.3,
        "staleness/sig_k3": 0.01, "timing/time_update_s": 0.2, "timing/wall_s": 9.0, "eval/eval_score": 0.7,
        "rollout/samples_per_s": 100.0, "rollout/groups/trained": 4.0}


def test_wandb_sink_logs_grouped_metrics_offline(tmp_path, monkeypatch):
    """The real wandb package, offline: its transaction log, read back as wandb's own protobuf records,
    holds every step under its grouped name and the run's config."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = FluxConfig(logging={"wandb": {"project": "flux-test", "name": "r1", "mode": "offline"}}).validate()
    sinks = open_sinks(str(tmp_path), cfg)
    assert [type(s).__name__ for s in sinks.extras] == ["WandbSink"]
    for i in range(3):
        sinks.write(i, {"step": i, "reward_mean": i / 4, "lag_mean": 0.5, "eval_score": 0.1 * i})
    sinks.close()
    [run_dir] = (tmp_path / "wandb").glob("offline-run-*")
    [data] = run_dir.glob("run-*.wandb")
    logged, config = [], {}
    for rec in finished_wandb_log(data):
        if rec.WhichOneof("record_type") == "history":
            logged.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif rec.WhichOneof("record_type") == "run":
            config.update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
    assert [r["rollout/reward_mean"] for r in logged] == [0.0, 0.25, 0.5]
    assert [r["_step"] for r in logged] == [0, 1, 2] and all(r["staleness/lag_mean"] == 0.5 for r in logged)
    assert [r["eval/eval_score"] for r in logged] == pytest.approx([0.0, 0.1, 0.2])
    rollout = config["rollout"].get("value", config["rollout"])  # wandb wraps config values in {"value": ...}
    assert rollout["group_size"] == cfg.rollout.group_size and config["model_path"] in (cfg.model_path,
                                                                                       {"value": cfg.model_path})


def finished_wandb_log(path, timeout_s: float = 30.0) -> list:
    """The records of a .wandb file once its `exit` record is on disk: wandb-core, a separate process,
    writes the file, and under load its last records can land after `run.finish()` has returned (the
    full suite once read the log with its config but none of its history)."""
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(wandb_records(path.read_bytes()))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.1)


def wandb_records(blob: bytes):
    """The protobuf Records of a .wandb file: wandb's transaction log, LevelDB's log format (a 7-byte
    header, then 32 KiB blocks of chunks: crc32 (4), length (2), type (1: full, 2: first, 3: middle,
    4: last), data)."""
    from wandb.proto import wandb_internal_pb2

    assert blob[:4] == b":W&B", blob[:8]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(blob):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        length, kind = int.from_bytes(blob[pos + 4:pos + 6], "little"), blob[pos + 6]
        if pos + 7 + length > len(blob):  # a chunk still being written
            return
        chunk, pos = blob[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            yield rec


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


@pytest.mark.slow
def test_a_run_logs_to_wandb_offline_and_leaves_no_wandb_process(default_model, tmp_path):
    pytest.importorskip("wandb")
    import os

    import psutil

    from tests.test_e2e import SMALL, assert_nothing_left, flux_train

    def wandb_processes():
        return {p.pid for p in psutil.process_iter(["name", "cmdline"])
                if "wandb-core" in (p.info["name"] or "") + " ".join(p.info["cmdline"] or [])}

    before = wandb_processes()
    os.environ["WANDB_SILENT"] = "true"
    try:
        proc = flux_train("--max-steps", "2", *SMALL, "--set", "logging.wandb={project: flux-e2e, mode: offline}",
                          "--out", str(tmp_path / "run"))
    finally:
        os.environ.pop("WANDB_SILENT")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [run] = (tmp_path / "run" / "wandb").glob("offline-run-*")
    history = [r for r in wandb_records(next(run.glob("run-*.wandb")).read_bytes())
               if r.WhichOneof("record_type") == "history"]
    assert len(history) == 2
    assert wandb_processes() <= before
    assert_nothing_left(tmp_path / "run")
