"""Threads that follow who computes (flux/integrations/cpu/cores.py): the phase that runs alone takes
every core, and both narrow, within one layer, once another actor on the host computes too."""

import os

import pytest
import torch

from flux.config import FluxConfig
from flux.integrations.cpu.cores import CoreShare
from flux.run.runtime import RunSpec


def spec(tmp_path, mode="adaptive", **learner):
    cfg = FluxConfig(adaptive_async={"mode": mode}, learner=learner).validate()
    return RunSpec("r1", str(tmp_path), "m", "", "", "", "", 0, cfg, socket_dir=str(tmp_path))


@pytest.fixture
def two_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1}, raising=False)
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))


def test_the_phase_that_runs_alone_has_every_core_and_both_narrow_when_they_overlap(tmp_path, two_cores):
    learner, gen = CoreShare(spec(tmp_path), "learner", "learner"), CoreShare(spec(tmp_path), "generator", "gen0")
    net, seen = model(), []
    learner.follow(net)
    gen.follow(model())
    net[1].register_forward_hook(lambda *_: seen.append(("forward", torch.get_num_threads())))
    net[0].weight.register_hook(lambda g: seen.append(("backward", torch.get_num_threads())))
    learner.working(True)
    out = net(torch.ones(2, 4)).sum()
    # The generator (another process: its byte only, not this process's threads) starts decoding between
    # the learner's forward and backward, and stops before the next forward.
    learner.mem[gen.slot] = 1
    out.backward()
    learner.mem[gen.slot] = 0
    net(torch.ones(2, 4))
    assert seen == [("forward", 2), ("backward", 1), ("forward", 2)]
    gen.working(True)
    gen.working(False)
    assert (tmp_path / "cores").read_bytes() == b"\x01\x00"  # learner computing, generator waiting


def test_sync_mode_fixed_threads_and_other_devices_keep_their_thread_count(tmp_path, two_cores):
    torch.set_num_threads(1)
    sync = CoreShare(spec(tmp_path, mode="sync"), "learner", "learner")
    sync.follow(model())
    sync.working(True)
    assert sync.mem is None and torch.get_num_threads() == 1 and not (tmp_path / "cores").exists()
    fixed = CoreShare(spec(tmp_path, threads=1), "learner", "learner")
    net = model()
    fixed.follow(net)
    fixed.working(True)  # it still says it computes, so that the others leave it its core
    net(torch.ones(2, 4))
    assert torch.get_num_threads() == 1 and (tmp_path / "cores").read_bytes()[0] == 1
    other = CoreShare(spec(tmp_path), "generator", "gen0")
    other.follow(None)  # an engine without a torch model (SGLang)
    other.working(True)
    assert other.mem is None
