"""Generate docs/configuration.md from the config dataclasses' field docstrings.

    python tools/config_docs.py            # rewrite docs/configuration.md
    python tools/config_docs.py --check    # exit 1 if it is out of date
"""

import argparse
import sys
from pathlib import Path

from flux.config import config_fields

DOC = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render() -> str:
    lines = [
        "# Configuration reference",
        "",
        "Generated from `flux/config.py` by `python tools/config_docs.py`; do not edit by hand.",
        "Set keys in a YAML file (nested sections) or with `--set section.key=value`; `flux config` prints",
        "the same list.",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    for key, typ, default, doc in config_fields():
        lines.append(f"| `{key}` | {typ} | `{default!r}` | {doc.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--check", action="store_true")
    args = ap.parse_args()
    text = render()
    if args.check:
        if not DOC.exists() or DOC.read_text() != text:
            print(f"{DOC} is out of date: run python tools/config_docs.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
