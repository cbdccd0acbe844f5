"""Write the built-in task's prompts as JSONL: data/prompts.jsonl (train) and data/eval.jsonl (held out).

    python tools/make_data.py [--out data]
"""

import argparse
from pathlib import Path

from flux.data import write_jsonl
from flux.integrations.builtin.tasks import builtin_records


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="data")
    args = ap.parse_args()
    for split, name in (("train", "prompts.jsonl"), ("eval", "eval.jsonl")):
        records = builtin_records(f"sort:{split}")
        write_jsonl(records, Path(args.out) / name)
        print(f"{Path(args.out) / name}: {len(records)} prompts")


if __name__ == "__main__":
    main()
