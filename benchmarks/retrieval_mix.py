"""What retrieval returns per shipped task: the share of the top rows dominated by numbers, coordinates,
code or encoded data rather than words.

    python benchmarks/retrieval_mix.py --datastore DIR [--top-k 1000] [--tasks navigate,nli,...]

For each task file in jobs/tasks (or those named), `rebase retrieve` (exact) keeps the top K rows of the
datastore, the task's own dataset banned, twice: with `match_kind: false` (before) and with the default
`match_kind: true` (after: only rows of a kind one of the task's example inputs has). Each row's text
(its fields' values joined) is classified by `rebase.retrieve.kinds.text_kind`:
- numeric: at least 40% of its non-space characters are digits, or it holds a coordinate pair "(3, -4)" or "(-2.0, 1.5)"
  or a list of 5+ numbers;
- code or encoded: at least 25% of its non-space characters are brackets, operators or punctuation other
  than sentence punctuation, or it has a run of 40+ characters without a space;
- words: the rest.
Prints per task and setting the shares and the five datasets contributing most rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

import rebase
from rebase.retrieve.kinds import KINDS, row_text, task_kinds, text_kind
from rebase.task import load_task

TASKS = Path(__file__).resolve().parent.parent / "jobs" / "tasks"


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
            task = TASKS / f"{name}.yaml"
            results[name] = {"kinds": sorted(task_kinds(load_task(task)))}
            for setting, match_kind in (("before", False), ("after", True)):
                out = Path(scratch) / f"{name}-{setting}"
                rebase.retrieve(args.datastore, task, out, top_k=args.top_k, exact=True, match_kind=match_kind)
                rows = pq.read_table(out / "rows.parquet", columns=["dataset_id", "row"]).to_pylist()
                kinds = Counter(text_kind(row_text(row["row"])) for row in rows)
                results[name][setting] = {
                    "rows": len(rows),
                    "shares": {k: round(kinds[k] / len(rows), 3) for k in KINDS},
                    "top_datasets": Counter(row["dataset_id"] for row in rows).most_common(5),
                }
            print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
