"""The docs that are generated from code stay in step with it."""

import subprocess
import sys
from pathlib import Path

from flux.config import config_fields

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_up_to_date():
    out = subprocess.run([sys.executable, "tools/config_docs.py", "--check"], cwd=ROOT, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr


def test_every_config_field_has_a_docstring():
    undocumented = [key for key, _, _, doc in config_fields() if not doc.strip()]
    assert not undocumented


def test_shipped_prompt_files_match_the_builtin_task():
    from flux.data import load_prompts

    assert load_prompts(str(ROOT / "data/prompts.jsonl")) == load_prompts("builtin:sort:train")
    assert load_prompts(str(ROOT / "data/eval.jsonl")) == load_prompts("builtin:sort:eval")


def test_the_scaling_page_configs_are_valid_flux_configs():
    """docs/scaling.md's YAML blocks are configs a user copies: each must load and validate as written."""
    import re

    import yaml

    from flux.config import FluxConfig, _build

    blocks = re.findall(r"```yaml\n(.*?)```", (ROOT / "docs" / "scaling.md").read_text(), re.S)
    assert len(blocks) == 4
    for block in blocks:
        _build(FluxConfig, yaml.safe_load(block), "").validate()
