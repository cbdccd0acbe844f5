"""The `rollout.sglang_*` settings' checks (run by FluxConfig.validate when a run uses SGLang)."""

from __future__ import annotations


def config_checks(r) -> list[tuple[str, bool, str]]:
    """(field, ok, why) for each `rollout.sglang_*` setting of RolloutConfig `r`."""
    return [
        ("rollout.sglang_url", _valid_urls(r.sglang_url, r.num_generators),
         "must be http(s)://HOST:PORT, or a comma-separated list with one URL per generator"),
        ("rollout.sglang_port", 0 <= r.sglang_port and r.sglang_port + r.num_generators <= 65536,
         "must be 0 (free ports) or a port with room for one per generator"),
        ("rollout.sglang_args", all(isinstance(a, (str, int, float)) for a in r.sglang_args),
         "must be a list of command-line arguments"),
        ("rollout.sglang_module", bool(r.sglang_module.strip()), "must name a module"),
        ("rollout.sglang_startup_timeout_s", r.sglang_startup_timeout_s > 0, "must be > 0"),
        ("rollout.sglang_restarts", r.sglang_restarts >= 0, "must be >= 0"),
        ("rollout.sglang_pause_mode", r.sglang_pause_mode in ("abort", "retract", "in_place"),
         "must be `abort`, `retract` or `in_place`"),
        ("rollout.sglang_weight_sync", r.sglang_weight_sync in ("tensor", "distributed"),
         "must be `tensor` or `distributed`"),
        ("rollout.sglang_bucket_mb", r.sglang_bucket_mb >= 1, "must be >= 1"),
        ("rollout.sglang_group_backend", r.sglang_group_backend in ("nccl", "gloo"), "must be `nccl` or `gloo`"),
    ]


def _valid_urls(urls: str, num_generators: int) -> bool:
    """Empty, one http(s) URL for one generator, or one per generator (comma-separated)."""
    parts = [u.strip() for u in urls.split(",") if u.strip()]
    if not parts:
        return True
    return all(u.startswith(("http://", "https://")) for u in parts) and (
        len(parts) == num_generators)
