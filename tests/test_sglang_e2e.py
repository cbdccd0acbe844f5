"""End-to-end: `flux train --set rollout.engine=sglang` against the mock SGLang server (tests/sglang_mock.py).

The mock runs in this test process; the run's generator reaches it by URL. On CPU the learner publishes
weights in shared memory, the generator reads them and sends them over `/update_weights_from_tensor`
as CPU tensors by value (the GPU path sends CUDA IPC handles instead); the mock decodes them as SGLang
does, so the test can compare what it holds with the learner's checkpoint of the same version.
"""

import pytest
import torch
from safetensors.torch import load_file

from flux.config import AdaptiveAsyncConfig
from flux.run.runtime import free_port
from tests.sglang_mock import MockSGLang, expected_shapes
from tests.test_e2e import (
    SMALL,
    assert_nothing_left,
    flux_train,
    metrics,
    processes_mentioning,
)


@pytest.mark.slow
def test_flux_train_runs_on_an_sglang_server(default_model, tmp_path):
    from transformers import AutoTokenizer

    server = MockSGLang(vocab_size=len(AutoTokenizer.from_pretrained(default_model)),
                        model_path=str(default_model), expected=expected_shapes(default_model))
    url = server.start()
    run_dir = tmp_path / "run"
    try:
        proc = flux_train("--max-steps", "4", *SMALL, "--set", "rollout.engine=sglang",
                          "--set", f"rollout.sglang_url={url}", "--set", "checkpoint.every=1",
                          "--out", str(run_dir))
    finally:
        server.stop()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(4)) and [r["version"] for r in rows] == [1, 2, 3, 4]
    # no token newer than the learner, none older than the run's bound (how far it runs ahead is timing)
    eta_max = AdaptiveAsyncConfig().eta_max
    assert all(0 <= r["lag_mean"] <= r["lag_max"] <= eta_max for r in rows), rows
    generated = [b for p, b in server.calls if p == "/generate"]
    assert len(generated) >= 4 * 2 * 4  # every sample came from the server
    # the generator followed the learner: versions pushed only forward, each one the learner published
    pushed = [int(b["weight_version"]) for p, b in server.calls
              if p == "/update_weights_from_tensor" and "weight_version" in b]
    assert pushed and pushed == sorted(set(pushed)) and set(pushed) <= {1, 2, 3, 4}
    assert server.version == str(pushed[-1])
    # ... and the server holds exactly the learner's tensors of that version
    saved = load_file(run_dir / "checkpoints" / f"step_{pushed[-1]}" / "model.safetensors")
    assert saved.keys() == server.weights.keys()
    for name, t in saved.items():
        assert torch.equal(server.weights[name], t), name
    assert_nothing_left(run_dir)


def test_an_unreachable_server_or_a_missing_package_is_a_one_line_setup_error(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    for extra, why in ((["--set", f"rollout.sglang_url={url}"], f"cannot reach the SGLang server at {url}"),
                       (["--set", "rollout.sglang_module=no_such_sglang.launch_server"],
                        "`no_such_sglang` package is not installed")):
        proc = flux_train("--set", "rollout.engine=sglang", *extra, "--out", str(tmp_path / "run"), timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.strip().startswith("flux: error: rollout.engine=sglang: ") and why in proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_each_generator_starts_and_stops_its_own_server(default_model, tmp_path):
    """No URL: the generator launches `python -m <sglang_module> --model-path ... --port ...` (here the mock,
    with sglang_args), waits for /health, and takes the server down with it."""
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(default_model))
    run_dir = tmp_path / "run"
    proc = flux_train("--max-steps", "2", *SMALL, "--set", "rollout.engine=sglang",
                      "--set", "rollout.sglang_module=tests.sglang_mock",
                      "--set", f"rollout.sglang_args=[--vocab-size, {vocab}]", "--out", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [r["version"] for r in metrics(run_dir)] == [1, 2]
    log = (run_dir / "logs" / "sglang-0.log").read_text()
    assert f"mock SGLang serving {default_model}" in log
    assert_nothing_left(run_dir)
    assert processes_mentioning(f"tests.sglang_mock --model-path {default_model}") == []


@pytest.mark.slow
def test_a_server_that_dies_mid_run_is_restarted_and_its_groups_requeued(default_model, tmp_path):
    """The generator owns its (mock) server; it is killed mid-run: the generator says so in one line, its
    groups are re-queued, the server is started again with the newest weights, and the run finishes."""
    import json
    import signal
    import subprocess
    import time

    from tests.test_e2e import train_cmd, wait_for

    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd("--max-steps", "10", *SMALL, "--set", "rollout.engine=sglang",
                                      "--set", "rollout.sglang_module=tests.sglang_mock",
                                      "--set", "rollout.sglang_args=[--token-delay, 0.002]",
                                      "--set", "rollout.sglang_startup_timeout_s=60", "--out", str(run_dir)),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: len(metrics(run_dir)) >= 1, 120, "one step")  # (10 steps: killed well before the end)
        servers = processes_mentioning("-m tests.sglang_mock")
        assert len(servers) == 1
        servers[0].send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out
    assert [r["step"] for r in metrics(run_dir)] == list(range(10))
    said = [ln for ln in (run_dir / "logs" / "gen0.stderr").read_text().splitlines() if "engine restarted" in ln]
    assert len(said) == 1 and "cannot reach the SGLang server" in said[0] and "groups re-queued" in said[0], said
    shown = [ln for ln in out.splitlines() if "engine restarted" in ln]  # the run's own output says so too
    assert len(shown) == 1 and shown[0].startswith("flux: gen0: cannot reach the SGLang server"), out
    groups = json.loads((run_dir / "groups.json").read_text())
    lost = int(said[0].split(" groups re-queued")[0].rsplit(" ", 1)[-1])
    assert lost >= 1 and groups["requeued"] == lost, (said, groups)  # the call's groups, back in the queue
    assert groups["admitted"] == groups["trained"] + groups["dropped"] + groups["requeued"] + \
        groups["unfinished_at_stop"], groups
    assert (run_dir / "logs" / "sglang-0.log").exists()
    time.sleep(0.5)
    assert processes_mentioning("-m tests.sglang_mock") == []
    assert_nothing_left(run_dir)
