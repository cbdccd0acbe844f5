"""FluxConfig: YAML + --set overrides + dict sections, one typed conversion, errors that name the field."""

import dataclasses

import pytest

from flux.config import (AdaptiveAsyncConfig, ConfigError, FluxConfig, RolloutConfig, config_fields,
                         dump_config, load_config)


def write(tmp_path, text, name="job.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_validate_and_batch_samples():
    cfg = FluxConfig().validate()
    assert cfg.batch_samples == cfg.learner.groups_per_step * cfg.rollout.group_size


def test_yaml_then_set_then_keywords(tmp_path):
    path = write(tmp_path, "seed: 3\nmax_steps: 40\nrollout:\n  group_size: 4\n  temperature: 0.7\n"
                           "learner:\n  lr: 1e-3\n")
    cfg = load_config(path, ["rollout.group_size=6", "adaptive_async.mode=sync", "algo.kl_coef=0.01"],
                      max_steps=7, out=None)
    assert cfg.seed == 3
    assert cfg.rollout.group_size == 6          # --set beats the file
    assert cfg.rollout.temperature == 0.7       # untouched file value kept
    assert cfg.max_steps == 7                   # keyword beats both
    assert cfg.out == ""                        # None keywords are ignored
    assert cfg.adaptive_async.mode == "sync"
    assert cfg.algo == {"kl_coef": 0.01}
    assert cfg.learner.lr == pytest.approx(1e-3) and type(cfg.learner.lr) is float


@pytest.mark.parametrize("raw", ["1e-3", "1.0e-3", "0.001"])
def test_exponent_without_dot_parses_as_float(raw, tmp_path):
    # YAML 1.1 (PyYAML) reads `1e-3` as a string; the config must still see a float.
    assert load_config(None, [f"learner.lr={raw}"]).learner.lr == pytest.approx(1e-3)
    assert load_config(write(tmp_path, f"learner:\n  lr: {raw}\n")).learner.lr == pytest.approx(1e-3)


def test_int_given_for_float_and_number_for_string():
    cfg = load_config(None, ["rollout.temperature=1", "model_path=123"])
    assert type(cfg.rollout.temperature) is float and cfg.rollout.temperature == 1.0
    assert cfg.model_path == "123"


def test_dict_sections_in_python_api():
    cfg = FluxConfig(rollout={"group_size": 2, "temperature": "0.5"},
                     adaptive_async={"target_staleness": 0.05})
    assert isinstance(cfg.rollout, RolloutConfig) and cfg.rollout.group_size == 2
    assert cfg.rollout.temperature == 0.5
    assert isinstance(cfg.adaptive_async, AdaptiveAsyncConfig)
    assert cfg.adaptive_async.target_staleness == 0.05 and cfg.adaptive_async.eta_max == 4
    assert cfg.validate().batch_samples == 2 * cfg.learner.groups_per_step
    # dataclasses.replace goes through the same conversion (FluxTrainer uses it)
    assert dataclasses.replace(cfg, learner={"groups_per_step": 3}).batch_samples == 6


def test_paths_are_accepted_for_string_fields(tmp_path):
    cfg = FluxConfig(out=tmp_path / "run", prompts=tmp_path / "p.jsonl", eval={"prompts": tmp_path / "e.jsonl"})
    cfg.validate()
    assert (cfg.out, cfg.prompts, cfg.eval.prompts) == (str(tmp_path / "run"), str(tmp_path / "p.jsonl"),
                                                        str(tmp_path / "e.jsonl"))
    dump_config(cfg, tmp_path / "config.yaml")        # plain strings: YAML can write them
    assert load_config(tmp_path / "config.yaml") == cfg


def test_dump_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["rollout.group_size=3", "learner.lr=5e-4", "algo.kl_coef=0.02", "seed=9"])
    dump_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("overrides, field", [
    (["nope=1"], "nope"),
    (["rollout.nope=1"], "rollout.nope"),
    (["staleness.w_lagg=0.5"], "staleness.w_lagg"),
    (["nosection.key=1"], "nosection"),
])
def test_unknown_key_is_named(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert f"{field}: unknown key" in str(e.value)


@pytest.mark.parametrize("override, field", [
    ("rollout.group_size=abc", "rollout.group_size"),
    ("rollout.group_size=2.5", "rollout.group_size"),
    ("rollout.group_size=true", "rollout.group_size"),   # bool is not an int here
    ("learner.lr=fast", "learner.lr"),
    ("learner.lr=[1, 2]", "learner.lr"),
    ("dynamic_sampling=maybe", "dynamic_sampling"),
    ("algo=3", "algo"),
    ("rollout=3", "rollout"),
    ("seed.x=1", "seed"),
    ("model_path={a: 1}", "model_path"),
])
def test_bad_type_is_named(override, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert str(e.value).startswith(f"config: {field}:"), str(e.value)


# One bad value per check in FluxConfig.validate().
OUT_OF_RANGE = [
    ("rollout.engine", "vllm"), ("rollout.num_generators", 0), ("rollout.group_size", 0),
    ("rollout.groups_per_call", -1), ("rollout.max_new_tokens", 0), ("rollout.temperature", 0.0),
    ("rollout.top_p", 0.0), ("rollout.top_p", 1.5), ("rollout.top_k", -1), ("rollout.update_mode", "never"),
    ("rollout.threads", -1), ("rollout.slowdown", -0.1), ("learner.backend", "jax"),
    ("learner.groups_per_step", 0), ("learner.lr", 0.0), ("learner.lr", -1e-3),
    ("learner.micro_batch_size", -1),
    ("learner.threads", -1), ("checkpoint.every", -1), ("checkpoint.keep_last", -1), ("learner.max_skipped_steps", 0), ("learner.ranks", 0),
    ("learner.dist_timeout_s", 0.0), ("learner.lr_schedule", "sqrt"), ("learner.warmup_steps", -1),
    ("learner.adam_betas", "[0.9]"), ("learner.adam_betas", "[0.9, 1.0]"), ("learner.adam_eps", 0.0),
    ("rollout.sglang_restarts", -1),
    ("adaptive_async.mode", "fast"), ("adaptive_async.min_async_ratio", -0.1),
    ("adaptive_async.max_async_ratio", 1.5), ("adaptive_async.target_staleness", 1.5),
    ("adaptive_async.target_staleness", -0.1), ("adaptive_async.eta_max", -1),
    ("adaptive_async.ema_horizon", 0.5), ("staleness.w_lag", 1.1), ("staleness.d_ref", 0.0),
    ("staleness.signal", "kl"), ("eval.num_prompts", 0), ("eval.every", -1), ("net.heartbeat_s", 0.0),
    ("net.heartbeat_timeout_s", 0.1), ("max_steps", 0), ("reward", "flux.rewards.char_match"), ("prompts", ""),
]


@pytest.mark.parametrize("key, value", OUT_OF_RANGE)
def test_out_of_range_is_named(key, value):
    with pytest.raises(ConfigError) as e:
        load_config(None, [f"{key}={value}"])
    message = str(e.value)
    # the cross-field checks are reported under the field that owns the relation
    owners = {"adaptive_async.max_async_ratio": "adaptive_async.min_async_ratio",
              "net.heartbeat_s": "net.heartbeat_timeout_s"}
    assert f"config: {owners.get(key, key)}:" in message, message


def test_several_learner_ranks_need_a_built_in_backend():
    assert load_config(None, ["learner.ranks=2"]).learner.ranks == 2
    assert load_config(None, ["learner.ranks=2", "learner.backend=megatron"]).learner.ranks == 2
    with pytest.raises(ConfigError) as e:
        load_config(None, ["learner.ranks=2", "learner.backend=flux.learner.torch_learner:TorchLearner"])
    assert str(e.value) == ("config: learner.ranks: several ranks need learner.backend=torch or megatron "
                            "(got 2)")


@pytest.mark.parametrize("mode", ["async", "adaptive"])
def test_an_overlapped_mode_whose_lead_rounds_to_zero_steps_is_refused(mode):
    """The lead is whole steps (round(ratio x eta_max)): below half a step an async mode would be sync."""
    low = {"mode": mode, "min_async_ratio": 0.0, "max_async_ratio": 0.1, "initial_async_ratio": 0.1}
    with pytest.raises(ConfigError, match="adaptive_async.max_async_ratio: times eta_max must be >= 0.5"):
        FluxConfig(adaptive_async=low).validate()
    with pytest.raises(ConfigError, match="adaptive_async.max_async_ratio"):
        FluxConfig(adaptive_async={"mode": mode, "eta_max": 0}).validate()
    FluxConfig(adaptive_async={**low, "max_async_ratio": 0.125}).validate()   # 0.125 x 4 = half a step: lead 1
    FluxConfig(adaptive_async={"mode": "sync", "eta_max": 0}).validate()


def test_min_above_max_ratio_and_initial_outside():
    with pytest.raises(ConfigError, match="adaptive_async.min_async_ratio"):
        FluxConfig(adaptive_async={"min_async_ratio": 0.8, "max_async_ratio": 0.2}).validate()
    with pytest.raises(ConfigError, match="adaptive_async.initial_async_ratio"):
        FluxConfig(adaptive_async={"max_async_ratio": 0.4, "initial_async_ratio": 0.5}).validate()


@pytest.mark.parametrize("kwargs, field", [
    ({"rollout": {"group_sizes": 4}}, "rollout.group_sizes"),
    ({"rollout": {"group_size": "x"}}, "rollout.group_size"),
    ({"max_steps": "3"}, "max_steps"),
    ({"seed": 1.5}, "seed"),
    ({"dynamic_sampling": "yes"}, "dynamic_sampling"),
    ({"rollout": 3}, "rollout"),
    ({"rollout": RolloutConfig(group_size="x")}, "rollout.group_size"),
])
def test_python_api_bad_values_are_config_errors(kwargs, field):
    with pytest.raises(ConfigError) as e:
        FluxConfig(**kwargs).validate()
    assert str(e.value).startswith(f"{field}:"), str(e.value)


def test_file_errors_name_the_file(tmp_path):
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match=f"{missing}: no such config file"):
        load_config(missing)
    bad_yaml = write(tmp_path, "rollout: [1, 2\n", "bad.yaml")
    with pytest.raises(ConfigError, match=f"{bad_yaml}: not valid YAML"):
        load_config(bad_yaml)
    listing = write(tmp_path, "- 1\n- 2\n", "list.yaml")
    with pytest.raises(ConfigError, match=f"{listing}: top level must be a mapping"):
        load_config(listing)
    unknown = write(tmp_path, "rollout:\n  gruop_size: 4\n", "typo.yaml")
    with pytest.raises(ConfigError, match=f"{unknown}: rollout.gruop_size: unknown key"):
        load_config(unknown)
    assert load_config(write(tmp_path, "", "empty.yaml")) == FluxConfig()


@pytest.mark.parametrize("item", ["rollout.group_size", "=3", "noequals"])
def test_malformed_set(item):
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, [item])


def test_config_fields_cover_every_leaf_with_a_doc():
    rows = list(config_fields())
    keys = [k for k, _, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert {"rollout.group_size", "adaptive_async.target_staleness", "staleness.w_lag",
            "max_steps"} <= set(keys)
    assert all(doc for _, _, _, doc in rows)
    # every listed key is settable with its own default
    defaults = [f"{k}={v}" for k, _, v, _ in rows if not isinstance(v, (dict, str))]
    assert load_config(None, defaults) == FluxConfig()


def test_an_older_runs_staleness_metric_k3_reads_as_the_signal(tmp_path):
    old = tmp_path / "config.yaml"
    old.write_text("staleness:\n  metric: k3\n  w_lag: 0.5\n")
    cfg = load_config(str(old))
    assert cfg.staleness.signal == "k3" and cfg.staleness.w_lag == 0.5
    old.write_text("staleness:\n  metric: abs_log_ratio\n")
    with pytest.raises(ConfigError, match="staleness.metric: moved to staleness.signal"):
        load_config(str(old))


def test_a_dotted_path_whose_module_raises_on_import_is_a_config_error(tmp_path, monkeypatch):
    (tmp_path / "broken_engine_mod.py").write_text("raise RuntimeError('no GPU here')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="importing it raised RuntimeError: no GPU here"):
        load_config(None, ["rollout.engine=broken_engine_mod:build"])


def test_thread_counts_follow_the_mode_and_the_cores(monkeypatch):
    from flux.run import runtime

    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)
    sync = FluxConfig(adaptive_async={"mode": "sync"}, rollout={"num_generators": 2}).validate()
    assert runtime.actor_threads(sync, "learner") == 8 and runtime.actor_threads(sync, "generator") == 4
    overlapped = FluxConfig(rollout={"num_generators": 3}).validate()  # adaptive: all four at once
    assert runtime.actor_threads(overlapped, "learner") == 2 == runtime.actor_threads(overlapped, "generator")
    ranks = FluxConfig(learner={"ranks": 4}, rollout={"num_generators": 12}).validate()
    assert runtime.actor_threads(ranks, "learner") == 1  # never 0
    given = FluxConfig(learner={"threads": 3}, rollout={"threads": 1}).validate()
    assert runtime.actor_threads(given, "learner") == 3 and runtime.actor_threads(given, "generator") == 1


def test_actors_get_a_short_openmp_spin_and_the_users_own_value_wins(monkeypatch, tmp_path):
    """GNU OpenMP's idle threads spin 300,000 rounds by default, holding a core the next actor needs (the
    `flux` program sets GOMP_SPINCOUNT before torch loads; spawned actors get it in their environment)."""
    import os

    from click.testing import CliRunner

    from flux.cli import main
    from flux.run import launcher
    from flux.run.runtime import OMP_SPIN, RunSpec

    monkeypatch.setenv("GOMP_SPINCOUNT", "")  # (so that the teardown puts back what was there)
    monkeypatch.delenv("GOMP_SPINCOUNT")
    assert CliRunner().invoke(main, ["config"]).exit_code == 0
    assert os.environ["GOMP_SPINCOUNT"] == OMP_SPIN[1] == "20000"
    seen = []
    monkeypatch.delenv("GOMP_SPINCOUNT")  # (the CLI set it in this process): the launcher sets it itself

    class Popen:  # what `start` hands a spawned actor, without starting one
        def __init__(self, argv, env, **kw):
            seen.append(env)

    monkeypatch.setattr(launcher.subprocess, "Popen", Popen)
    spec = RunSpec("r1", str(tmp_path), "m", "tcp://a:1", "tcp://a:2", "tcp://a:3", "tcp://a:4", 10,
                   FluxConfig().validate())
    launcher.start(spec, [])
    monkeypatch.setenv("GOMP_SPINCOUNT", "7")
    assert CliRunner().invoke(main, ["config"]).exit_code == 0 and os.environ["GOMP_SPINCOUNT"] == "7"
    launcher.start(spec, [])
    assert [e["GOMP_SPINCOUNT"] for e in seen] == ["20000"] * 4 + ["7"] * 4
