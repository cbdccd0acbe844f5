"""The Python API: `FluxTrainer(FluxConfig(...)).fit(prompts="data/prompts.jsonl")`."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from flux.config import FluxConfig


@dataclass
class FitResult:
    """What a finished run left behind."""

    run_dir: Path
    exit_code: int
    metrics: list[dict]

    @property
    def checkpoint(self) -> Path | None:
        found = sorted((self.run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name[5:]))
        return found[-1] if found else None


class FluxTrainer:
    """Runs a job described by a FluxConfig with the same actors as `flux train`."""

    def __init__(self, config: FluxConfig | None = None, **overrides):
        config = config or FluxConfig()
        self.config = dataclasses.replace(config, **overrides).validate() if overrides else config.validate()

    def fit(self, prompts: str | None = None, max_steps: int | None = None, out: str | None = None) -> FitResult:
        """Train on `prompts` (JSONL path or `builtin:<task>`); raises RuntimeError if the run fails."""
        from flux.launcher import run

        changes = {k: v for k, v in (("prompts", prompts), ("max_steps", max_steps), ("out", out)) if v}
        cfg = dataclasses.replace(self.config, **changes).validate()
        code, spec = run(cfg)
        path = Path(spec.run_dir) / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if code != 0:
            raise RuntimeError(f"flux run in {spec.run_dir} failed with exit code {code}")
        return FitResult(Path(spec.run_dir), code, rows)
