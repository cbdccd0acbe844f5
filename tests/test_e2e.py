"""End-to-end: the real `flux train` CLI (and the Python API) on the embedded tiny model, as subprocesses.

Every run is checked for leftovers: no process whose command line holds the run's spec path, nothing in
/dev/shm with the run's prefix `flux-<run_id>-`.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

SMALL = ["--set", "learner.groups_per_step=2", "--set", "rollout.group_size=4",
         "--set", "eval.num_prompts=20"]
METRIC_KEYS = {"step", "version", "reward_mean", "staleness_mean", "async_ratio", "samples_per_s",
               "tokens_per_s", "learner_busy_frac", "generator_busy_frac", "dropped_stale", "wall_s"}
STOP_WITHIN_S = 15.0


def train_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "flux.cli", "train", *args]


def flux_train(*args, timeout=150, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(*args), capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          check=False)


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def processes_mentioning(text: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid != os.getpid() and text in " ".join(p.info["cmdline"] or []) and p.status() != "zombie":
                found.append(p)
        except psutil.Error:
            pass
    return found


def assert_nothing_left(run_dir: Path) -> None:
    spec = run_dir / "spec.json"
    run_id = json.loads(spec.read_text())["run_id"]
    assert processes_mentioning(str(spec)) == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"flux-{run_id}-")] == []


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.fixture(scope="module")
def small_run(default_model, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    pinned = ["--set", "adaptive_async.mode=adaptive", "--set", "adaptive_async.initial_async_ratio=0.5",
              "--set", "adaptive_async.eta_max=2"]
    proc = flux_train("--max-steps", "6", *SMALL, *pinned, "--out", str(run_dir))
    return run_dir, proc


def test_train_exits_zero_with_one_metrics_line_per_step(small_run):
    run_dir, proc = small_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(6))
    for r in rows:
        assert METRIC_KEYS <= r.keys(), METRIC_KEYS - r.keys()
        assert 0.0 <= r["staleness_mean"] <= 1.0 and 0.0 <= r["async_ratio"] <= 1.0
        assert 0.0 <= r["learner_busy_frac"] <= 1.0 and 0.0 <= r["generator_busy_frac"] <= 1.0
        assert r["samples"] == 8 and r["samples_per_s"] > 0 and r["tokens_per_s"] > 0
    assert [r["version"] for r in rows] == list(range(1, 7))       # one published version per step
    assert rows[-1]["wall_s"] >= rows[0]["wall_s"]
    assert "eval_score" in rows[0] and rows[-1]["eval_n"] == 20
    assert "flux: evaluating on 20 held-out prompts of builtin:sort (never trained on)" in proc.stdout
    assert "6 steps" in proc.stdout
    # adaptive mode really runs ahead: the first admit grants two batches at version 0, so some step
    # trains on data one version old (this is what the sync test below rules out)
    assert max(r["lag_max"] for r in rows) >= 1
    assert any(r["async_ratio"] != 0.5 for r in rows)             # the PID moved a off its initial value
    # every admitted group is accounted for: trained, dropped (counted), re-queued or in flight at stop
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["trained"] == 6 * 2
    assert groups["admitted"] == (groups["trained"] + groups["dropped"] + groups["requeued"]
                                  + groups["unfinished_at_stop"])


def test_run_dir_has_config_and_a_checkpoint_that_moved(small_run, default_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from flux.config import load_config

    run_dir, _ = small_run
    cfg = load_config(run_dir / "config.yaml")
    assert (cfg.max_steps, cfg.rollout.group_size, cfg.learner.groups_per_step) == (6, 4, 2)
    ckpt = run_dir / "checkpoints" / "step_6"
    trained = AutoModelForCausalLM.from_pretrained(ckpt)
    initial = AutoModelForCausalLM.from_pretrained(default_model)
    a, b = trained.state_dict(), initial.state_dict()
    assert a.keys() == b.keys()
    assert any(not (a[k] == b[k]).all() for k in a)
    assert AutoTokenizer.from_pretrained(ckpt)("sort 381=").input_ids == AutoTokenizer.from_pretrained(
        default_model)("sort 381=").input_ids
    # the controller's half of the state sits beside the model: version, ratio, PID, data cursor
    state = json.loads((ckpt / "controller_state.json").read_text())
    assert state["version"] == 6 and state["ledger"]["counts"]["trained"] == 6 * 2
    assert {"pid", "cursor", "async_ratio", "started_samples"} <= state.keys()


def test_actors_are_forked_from_the_launcher_and_show_their_own_command_line(small_run):
    """On a CPU machine the launcher imports torch and transformers once and forks the actors: each says
    so in its timeline (its process started after the launcher's preload, with its libraries already
    imported) and was seen by `ps` as `python -m actors.<role> --spec ... --name ...` (setproctitle)."""
    run_dir, _ = small_run
    launcher = json.loads((run_dir / "logs" / "launcher.timeline.json").read_text())["marks"]
    for name in ("controller", "buffer", "learner", "gen0"):
        marks = json.loads((run_dir / "logs" / f"{name}.timeline.json").read_text())["marks"]
        assert launcher["preloaded"] <= marks["process"] <= launcher["spawned"] + 1.0, name
        assert marks["imported"] - marks["process"] < 1.0, name  # no fresh `import torch` (~1.5 s)


def test_a_forked_actor_that_fails_before_its_own_code_says_why_in_its_stderr_file(tmp_path):
    from flux.integrations.cpu.fork import Forked

    err = tmp_path / "gen0.stderr"
    child = Forked(["-m", "actors.no_such_role"], err, dict(os.environ))
    assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == set()  # the launcher's mask is back as it was
    assert child.wait(30) == 1
    assert "ModuleNotFoundError: No module named 'actors.no_such_role'" in err.read_text()
    again = Forked(["-m", "actors.no_such_role"], err, dict(os.environ))
    os.waitpid(again.pid, 0)  # reaped by someone else: poll must not raise
    assert again.poll() == 0 and again.wait(1) == 0


def test_only_the_flux_program_forks_its_actors(monkeypatch, tmp_path):
    """A program that calls the launcher (this test runner) may have run torch's OpenMP threads, after
    which a forked child hangs (GNU libgomp): it gets spawned actors, and `flux train` returns to it."""
    from flux.integrations.cpu.fork import preload
    from flux.run import launcher

    monkeypatch.delenv("FLUX_ACTOR_START", raising=False)
    assert not launcher.flux_is_the_program()
    assert preload(None) is False
    monkeypatch.setattr(sys, "argv", ["/usr/local/bin/flux", "train"])
    assert launcher.flux_is_the_program()


@pytest.mark.slow
def test_with_flux_actor_start_spawn_each_actor_is_a_fresh_interpreter(default_model, tmp_path, monkeypatch):
    """The path a GPU machine takes (no fork there): `python -m actors.<role>` processes, same run."""
    monkeypatch.setenv("FLUX_ACTOR_START", "spawn")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd("--max-steps", "4", *SMALL, "--out", str(run_dir)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        learner = wait_for(lambda: [p for p in processes_mentioning(str(run_dir / "spec.json"))
                                    if "actors.learner" in " ".join(p.cmdline())], 60, "the learner")[0]
        assert learner.cmdline()[:3] == [sys.executable, "-m", "actors.learner"]  # an exec'd interpreter
        out, err = proc.communicate(timeout=150)
    finally:
        proc.kill()
    assert proc.returncode == 0, out + err
    assert [r["step"] for r in metrics(run_dir)] == [0, 1, 2, 3]
    launcher = json.loads((run_dir / "logs" / "launcher.timeline.json").read_text())["marks"]
    assert launcher["preloaded"] - launcher["prepared"] < 0.5  # nothing preloaded
    assert_nothing_left(run_dir)


@pytest.mark.slow
def test_a_users_prompts_are_evaluated_on_their_own_held_out_split_or_not_at_all(default_model, tmp_path):
    """Changing `prompts` without `eval.prompts` never evaluates on the built-in task; the run says so."""
    from flux.data import load_prompts, write_jsonl

    path = tmp_path / "mine.jsonl"
    write_jsonl(load_prompts("builtin:sort")[:60], path)
    none = flux_train("--max-steps", "1", *SMALL, "--set", f"prompts={path}", "--out", str(tmp_path / "a"))
    assert none.returncode == 0, none.stdout + none.stderr
    assert "flux: no held-out evaluation" in none.stdout and "eval_score" not in metrics(tmp_path / "a")[0]
    split = flux_train("--max-steps", "1", *SMALL, "--set", f"prompts={path}", "--set", "eval.split_fraction=0.2",
                       "--out", str(tmp_path / "b"))
    assert split.returncode == 0, split.stdout + split.stderr
    line = next(ln for ln in split.stdout.splitlines() if "evaluating on" in ln)
    n = int(line.split("evaluating on ")[1].split()[0])
    assert 1 <= n < 60 and f"held-out prompts of {path}" in line
    assert metrics(tmp_path / "b")[0]["eval_n"] == n


@pytest.mark.slow
def test_a_hub_id_is_found_in_the_local_hf_cache_and_nothing_is_downloaded(default_model, tmp_path):
    """`model_path: org/name` resolves as transformers resolves it: the cache's snapshot of refs/main."""
    import shutil

    cache = tmp_path / "hub"
    snapshot = cache / "models--flux-test--tiny-sort" / "snapshots" / "0123abcd"
    shutil.copytree(default_model, snapshot)
    (cache / "models--flux-test--tiny-sort" / "refs").mkdir()
    (cache / "models--flux-test--tiny-sort" / "refs" / "main").write_text("0123abcd")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(train_cmd("--max-steps", "1", *SMALL, "--set", "model_path=flux-test/tiny-sort",
                                   "--out", str(tmp_path / "run")), capture_output=True, text=True, timeout=150,
                         env=env, check=False)
    assert run.returncode == 0, run.stdout + run.stderr
    spec = json.loads((tmp_path / "run" / "spec.json").read_text())
    assert spec["model_path"] == str(snapshot) and len(metrics(tmp_path / "run")) == 1
    missing = subprocess.run(train_cmd("--max-steps", "1", "--set", "model_path=flux-test/absent",
                                       "--out", str(tmp_path / "run2")), capture_output=True, text=True,
                             timeout=150, env=env, check=False)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    assert "model_path: flux-test/absent is not a directory, nor in the local HF cache" in missing.stderr
    assert "HF_HUB_OFFLINE=1 forbids downloading it" in missing.stderr


def test_no_process_or_shared_memory_survives(small_run):
    assert_nothing_left(small_run[0])


def test_sync_mode_trains_on_current_weights_only(default_model, tmp_path):
    run_dir = tmp_path / "sync"
    proc = flux_train("--max-steps", "4", *SMALL, "--set", "adaptive_async.mode=sync", "--out", str(run_dir))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(run_dir)
    assert len(rows) == 4
    assert [r["lag_max"] for r in rows] == [0] * 4
    assert all(r["async_ratio"] == 0.0 and r["dropped_stale"] == 0 for r in rows)
    assert_nothing_left(run_dir)


def test_python_api_fit(default_model, tmp_path, capsys):
    from flux import FluxConfig, FluxTrainer
    from flux.data import write_jsonl
    from flux.integrations.builtin.tasks import builtin_records

    records = builtin_records(FluxConfig().prompts.removeprefix("builtin:"))[:30]
    prompts = [{"prompt": r["prompt"], "answer": r["answer"]} for r in records[:20]]
    prompts += [{"messages": [{"role": "user", "content": r["prompt"]}], "answer": r["answer"]}
                for r in records[20:]]
    write_jsonl(prompts, tmp_path / "prompts.jsonl")
    cfg = FluxConfig(max_steps=3, learner={"groups_per_step": 2}, rollout={"group_size": 4},
                     eval={"num_prompts": 10}, out=tmp_path / "api")
    result = FluxTrainer(cfg).fit(prompts=tmp_path / "prompts.jsonl")    # paths, not only strings
    assert result.exit_code == 0
    assert [m["step"] for m in result.metrics] == [0, 1, 2]
    assert result.checkpoint == tmp_path / "api" / "checkpoints" / "step_3"
    assert (result.checkpoint / "model.safetensors").is_file()
    assert result.metrics[0]["groups"]["admitted"] >= 2
    assert_nothing_left(tmp_path / "api")


def _bad_inputs(tmp: Path):
    """(name, CLI args, text the one stderr line must contain)."""
    not_json = tmp / "not_json.jsonl"
    not_json.write_text('{"prompt": "rev 1="}\n{"prompt": "rev 2=",,}\n')
    no_prompt = tmp / "no_prompt.jsonl"
    no_prompt.write_text('{"prompt": "rev 1="}\n\n{"answer": "2"}\n')
    typo = tmp / "typo.yaml"
    typo.write_text("rollout:\n  gruop_size: 4\n")
    return {
        "unknown key": (["--set", "nope=1"], ["nope", "unknown key"]),
        "bad type": (["--set", "rollout.group_size=abc"], ["rollout.group_size", "expected int"]),
        "unknown algorithm": (["--set", "algorithm=nope"], ["algorithm", "nope"]),
        "bad reward": (["--set", "reward=flux.rewards:nope"], ["reward", "nope"]),
        "missing prompts": (["--set", f"prompts={tmp / 'missing.jsonl'}"],
                            [f"prompts: {tmp / 'missing.jsonl'}: no such prompts file"]),
        "missing eval prompts": (["--set", f"eval.prompts={tmp / 'held.jsonl'}"],
                                 [f"eval.prompts: {tmp / 'held.jsonl'}: no such prompts file"]),
        "not json": (["--set", f"prompts={not_json}"], [f"{not_json}:2"]),
        "no prompt": (["--set", f"prompts={no_prompt}"], [f"{no_prompt}:3", "prompt"]),
        "missing config": ([str(tmp / "missing.yaml")], [str(tmp / "missing.yaml")]),
        "yaml typo": ([str(typo)], [str(typo), "rollout.gruop_size"]),
    }


BAD_INPUTS = ["unknown key", "bad type", "unknown algorithm", "bad reward", "missing prompts",
              "missing eval prompts", "not json", "no prompt", "missing config", "yaml typo"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_exits_2_with_one_line(case, tmp_path):
    args, needles = _bad_inputs(tmp_path)[case]
    out = tmp_path / "run"
    proc = flux_train(*args, "--out", str(out), timeout=60, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flux: error: ") and "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0]
    assert not (out / "spec.json").exists() and not (tmp_path / "runs").exists()
    assert processes_mentioning(str(out)) == []


def start_long_run(run_dir: Path) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True)
    log = run_dir.parent / "launcher.out"
    with open(log, "w") as out:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(train_cmd("--max-steps", "1000", *SMALL, "--set", "eval.num_prompts=1",
                                          "--out", str(run_dir)), stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: metrics(run_dir), 120, "the first metrics line")
    except AssertionError:
        proc.kill()
        proc.wait()
        raise
    return proc, log


def stop_time(proc: subprocess.Popen) -> tuple[int, float]:
    t0 = time.monotonic()
    try:
        code = proc.wait(timeout=STOP_WITHIN_S + 15)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    return code, time.monotonic() - t0


def test_a_killed_learner_stops_the_whole_run(default_model, tmp_path):
    run_dir = tmp_path / "crash"
    proc, log = start_long_run(run_dir)
    spec = str(run_dir / "spec.json")
    learners = [p for p in processes_mentioning(spec) if "actors.learner" in " ".join(p.cmdline())]
    assert len(learners) == 1
    assert len(processes_mentioning(spec)) == 4          # controller, buffer, learner, gen0
    learners[0].send_signal(signal.SIGKILL)
    code, took = stop_time(proc)
    text = log.read_text()
    assert code != 0 and took < STOP_WITHIN_S, (code, took, text)
    assert "learner learner died" in text, text
    assert_nothing_left(run_dir)


def test_ctrl_c_stops_the_run_with_130(default_model, tmp_path):
    run_dir = tmp_path / "sigint"
    proc, log = start_long_run(run_dir)
    proc.send_signal(signal.SIGINT)
    code, took = stop_time(proc)
    text = log.read_text()
    assert code == 130 and took < STOP_WITHIN_S, (code, took, text)
    assert "interrupted" in text and "Traceback" not in text, text
    assert_nothing_left(run_dir)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the swallowed one
def test_a_ctrl_c_that_a_finalizer_swallows_still_stops_the_run():
    # Python runs a signal's handler at the next bytecode, which may be inside a __del__ the GC calls; the
    # KeyboardInterrupt raised there is printed and dropped ("Exception ignored in"). The launcher's loop
    # checks the event the handler sets as well (a full-suite run once trained on through a Ctrl-C).
    from flux.run.launcher import _signals_as_interrupt

    class Finalizer:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # the handler runs in here

    interrupted, previous = _signals_as_interrupt()
    try:
        Finalizer()  # dropped at once: __del__ runs, the interrupt it raises goes nowhere
        time.sleep(0.05)
        assert interrupted.is_set()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]


def test_cli_ctrl_c_before_the_actors_start_exits_130(monkeypatch):
    from click.testing import CliRunner

    import flux.run.launcher
    from flux.cli import main

    def interrupted(cfg, stream=None, resume_from=""):
        raise KeyboardInterrupt

    monkeypatch.setattr(flux.run.launcher, "run", interrupted)
    result = CliRunner().invoke(main, ["train", "--max-steps", "1"])
    assert result.exit_code == 130
    assert result.output.strip().splitlines() == ["flux: error: interrupted"]


def test_cli_train_called_from_a_program_returns_to_it(monkeypatch):
    """`flux train` as the program skips the interpreter's teardown (os._exit); called in-process (here
    through click), it exits the way click commands do, and the caller goes on."""
    from click.testing import CliRunner

    import flux.run.launcher
    from flux.cli import main

    monkeypatch.setattr(flux.run.launcher, "run", lambda cfg, stream=None, resume_from="": (3, None))
    assert CliRunner().invoke(main, ["train", "--max-steps", "1"]).exit_code == 3


def test_cli_config_lists_every_key():
    from click.testing import CliRunner

    from flux.cli import main
    from flux.config import config_fields

    result = CliRunner().invoke(main, ["config"])
    assert result.exit_code == 0
    lines = result.output.splitlines()
    assert len(lines) == len(list(config_fields()))
    assert any(line.startswith("adaptive_async.target_staleness (float, default ") for line in lines)
