"""The `net.*` settings of remote generators' checks (run by FluxConfig.validate)."""

from __future__ import annotations


def config_checks(net) -> list[tuple[str, bool, str]]:
    """(field, ok, why) for each remote-generator setting of NetConfig `net`."""
    return [
        ("net.remote_port", 0 <= net.remote_port < 65536, "must be a port (0 = a free one)"),
        ("net.keys", bool(net.keys.strip()) or not net.remote,
         "net.remote needs a key directory: make one with `flux keys DIR`"),
        ("net.weight_chunk_kb", net.weight_chunk_kb >= 1, "must be >= 1"),
        ("net.weight_window", net.weight_window >= 1, "must be >= 1"),
        ("net.weight_stream", net.weight_stream in ("curve", "plain"), "must be `curve` or `plain`"),
    ]
