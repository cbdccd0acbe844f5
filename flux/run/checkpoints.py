"""Checkpoints that are either whole or not there: staged, completed by the controller, renamed.

A checkpoint of step N is `RUN_DIR/checkpoints/step_N`. The learner writes its half (model, optimizer,
trainer_state.json) into the staging directory `checkpoints/.step_N.partial`; the controller adds its half
(controller_state.json), fsyncs every file, and renames the directory to `step_N` in one step. A crash at
any point leaves either the previous complete checkpoints or a `.partial` directory that `--resume`
skips (and names). With `checkpoint.keep_last: K`, older complete checkpoints are removed after each one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

REQUIRED = ("controller_state.json", "trainer_state.json")


def staging_dir(final: str | Path) -> Path:
    final = Path(final)
    return final.parent / f".{final.name}.partial"


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def finish_checkpoint(final: str | Path, controller_state: dict, keep_last: int = 0, log=None) -> Path:
    """Complete the staged checkpoint of `final` with the controller's state and publish it atomically."""
    final = Path(final)
    staged = staging_dir(final)
    (staged / "controller_state.json").write_text(json.dumps(controller_state, indent=1))
    for path in staged.rglob("*"):
        if path.is_file():
            _fsync(path)
    _fsync(staged)
    if final.exists():  # the same step saved again (a resumed run): the new one replaces it whole
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        os.rename(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(staged, final)
    _fsync(final.parent)
    if keep_last > 0:
        for _, old in complete_checkpoints(final.parent.parent)[0][:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
            if log is not None:
                log.info("removed checkpoint %s (checkpoint.keep_last=%d)", old, keep_last)
    return final


def complete_checkpoints(run_dir: str | Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """([(step, dir)] of complete checkpoints, oldest first; [incomplete directories])."""
    found, incomplete = [], []
    for d in sorted(Path(run_dir, "checkpoints").glob("*")):
        if not d.is_dir():
            continue
        if d.name.startswith("step_") and d.name[5:].isdigit() and all((d / f).is_file() for f in REQUIRED):
            try:
                json.loads((d / "controller_state.json").read_text())
            except ValueError:
                incomplete.append(d)
                continue
            found.append((int(d.name[5:]), d))
        elif d.name.startswith((".step_", "step_")):
            incomplete.append(d)
    return sorted(found), incomplete
