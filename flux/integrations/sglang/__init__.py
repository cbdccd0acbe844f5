"""`rollout.engine: sglang`: the SGLang server as a rollout engine (HTTP, weight updates)."""
