"""What retrieval returns per shipped task: the share of the top rows dominated by numbers, coordinates,
code or encoded data rather than words.

    python benchmarks/retrieval_mix.py --datastore DIR [--top-k 1000] [--tasks navigate,nli,...]

For each task file in jobs/tasks (or those named), `rebase retrieve` (exact) keeps the top K rows of the
datastore, the task's own dataset banned. Each row's text (its fields' values joined) is classified:
- numeric: at least 40% of its non-space characters are digits, or it holds a coordinate pair "(3, -4)"
  or a list of 5+ numbers;
- code or encoded: at least 25% of its non-space characters are brackets, operators or punctuation other
  than sentence punctuation, or it has a run of 40+ characters without a space;
- words: the rest.
Prints per task the shares and the five datasets contributing most rows.
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

import rebase

TASKS = Path(__file__).resolve().parent.parent / "jobs" / "tasks"
_COORDINATE = re.compile(r"\(\s*-?\d+\s*,\s*-?\d+\s*\)")
_NUMBER_LIST = re.compile(r"(?:-?\d+(?:\.\d+)?\s*[,;\s]\s*){4,}-?\d+")
_SYMBOLS = set("[]{}<>=+*/\\|^~`#$%&_@")
_LONG_TOKEN = re.compile(r"\S{40,}")


def kind(text: str) -> str:
    """numeric, code or words (see the module's docstring)."""
    characters = [c for c in text if not c.isspace()]
    if not characters:
        return "words"
    digits = sum(c.isdigit() for c in characters) / len(characters)
    if digits >= 0.4 or _COORDINATE.search(text) or _NUMBER_LIST.search(text):
        return "numeric"
    symbols = sum(c in _SYMBOLS for c in characters) / len(characters)
    if symbols >= 0.25 or _LONG_TOKEN.search(text):
        return "code"
    return "words"


def row_text(row: str) -> str:
    values = json.loads(row)
    return " ".join(str(value) for value in values.values() if value is not None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datastore", required=True)
    parser.add_argument("--top-k", type=int, default=1000)
    parser.add_argument("--tasks", default="")
    args = parser.parse_args()
    names = [t.strip() for t in args.tasks.split(",") if t.strip()] or sorted(p.stem for p in TASKS.glob("*.yaml"))
    results = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in names:
            out = Path(scratch) / name
            rebase.retrieve(args.datastore, TASKS / f"{name}.yaml", out, top_k=args.top_k, exact=True)
            rows = pq.read_table(out / "rows.parquet", columns=["dataset_id", "row"]).to_pylist()
            kinds = Counter(kind(row_text(row["row"])) for row in rows)
            datasets = Counter(row["dataset_id"] for row in rows).most_common(5)
            results[name] = {
                "rows": len(rows),
                "shares": {k: round(kinds[k] / len(rows), 3) for k in ("words", "numeric", "code")},
                "top_datasets": datasets,
            }
            print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
