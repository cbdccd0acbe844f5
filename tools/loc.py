"""Lines of code per package, and the core's budget: docstrings, comments and blank lines excluded.

    python tools/loc.py            # a table per package; exit 1 if the core is over 5,000 lines
    python tools/loc.py --json     # the same as JSON

The core is `actors/` and `flux/` without `flux/integrations/` (the optional parts: SGLang, megatron-core,
several learner ranks, remote generators, sinks, the status/plot views, the built-in demo model and
tasks). The whole package's size is reported beside it, so that moving code out of the core is never
the only way the number falls.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 5000
INTEGRATIONS = "flux/integrations"


def code_lines(source: str) -> int:
    """Lines holding a token that is not a comment, outside every module/class/function docstring."""
    doc: set[int] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                doc.update(range(first.lineno, first.end_lineno + 1))
    skip = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)
    code: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in skip:
            code.update(range(tok.start[0], tok.end[0] + 1))
    return len(code - doc)


def files(root: Path = ROOT) -> list[Path]:
    return sorted([*root.joinpath("flux").rglob("*.py"), *root.joinpath("actors").rglob("*.py")])


def count(root: Path = ROOT) -> dict:
    """{"packages": {package: lines}, "core": n, "integrations": n, "total": n, "budget": 5000}."""
    packages: dict[str, int] = defaultdict(int)
    core = integrations = 0
    for path in files(root):
        rel = path.relative_to(root).as_posix()
        n = code_lines(path.read_text())
        packages[rel.rsplit("/", 1)[0]] += n
        if rel.startswith(INTEGRATIONS + "/"):
            integrations += n
        else:
            core += n
    return {"packages": dict(sorted(packages.items())), "core": core, "integrations": integrations,
            "total": core + integrations, "budget": BUDGET}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    result = count()
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        for package, n in result["packages"].items():
            where = "integration" if package.startswith(INTEGRATIONS) else "core"
            print(f"{n:6d}  {package:40s} {where}")
        print(f"{result['core']:6d}  core (budget {BUDGET})\n{result['integrations']:6d}  integrations\n"
              f"{result['total']:6d}  flux/ + actors/ in all")
    if result["core"] > BUDGET:
        print(f"the core is {result['core']} lines of code, over the budget of {BUDGET}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
