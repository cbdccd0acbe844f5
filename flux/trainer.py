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

    def fit(self, prompts: str | None = None, max_steps: int | None = None, out: str | None = None,
            resume: str | Path | None = None) -> FitResult:
        """Train on `prompts` (JSONL path or `builtin:<task>`); raises RuntimeError if the run fails.

        `resume=RUN_DIR` continues that run from its latest checkpoint, in its directory (as
        `flux train --resume`); this trainer's config then applies, so pass the run's own config
        (`flux.load_config(RUN_DIR/config.yaml)`) unless you mean to change it.
        """
        from flux.run.launcher import latest_checkpoint, run

        changes = {k: v for k, v in (("prompts", prompts), ("max_steps", max_steps), ("out", out)) if v}
        checkpoint = ""
        if resume:
            checkpoint, changes["out"] = latest_checkpoint(resume), str(resume)
        cfg = dataclasses.replace(self.config, **changes).validate()
        code, spec = run(cfg, resume_from=checkpoint)
        path = Path(spec.run_dir) / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        if code != 0:
            raise RuntimeError(f"flux run in {spec.run_dir} failed with exit code {code}")
        return FitResult(Path(spec.run_dir), code, rows)
