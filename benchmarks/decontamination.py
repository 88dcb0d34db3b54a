"""Decontamination measured: planted copies of evaluation items found, and what the rest of BIG-bench holds.

    python benchmarks/decontamination.py [--tasks navigate,sports_understanding,date_understanding]
                                         [--planted 50] [--rows-per-task 100] [--embed-sample 2000]

For each shipped task with an `eval` source, its whole evaluation set becomes an `EvalSet` (n-grams of the
length derived from it by `derived_ngram`, whole inputs of 8 words up to that length, MiniLM vectors and the
threshold derived from them), and rows are checked the way
`rebase retrieve` checks its rows (`EvalSet.match_rows`):
- **planted**: `--planted` evaluation items (a fixed sample), each written into a row three ways: *exact*
  ({"input": item, "target": its answer}), *edited* (upper case, punctuation dropped, "indeed" appended,
  beside another field) and *embedded* (the item inside a longer passage: "Question 7 of the quiz: ...
  Answer below."). Printed: how many of each were found, and by which check.
- **the rest of BIG-bench**: the first `--rows-per-task` rows of every BIG-bench task the task file does not
  ban (what retrieval may return), checked by n-grams; a fixed sample of `--embed-sample` of them by embeddings too.
  A match there is either a false alarm or a real copy of an evaluation item in another task: the printed
  examples let a reader judge which.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

from rebase.datastore.embed import Embedder
from rebase.datastore.sources import open_source
from rebase.decontaminate import EvalSet
from rebase.evaluate import read_eval_set
from rebase.models import resolve_model
from rebase.task import is_banned, load_task

TASKS = Path(__file__).resolve().parent.parent / "jobs" / "tasks"


def planted_rows(examples: list[dict], count: int) -> dict[str, list[str]]:
    sample = random.Random(0).sample(examples, min(count, len(examples)))
    exact = [json.dumps({"input": e["input"], "target": e["reference"]}) for e in sample]
    edited = [
        json.dumps({"question": re.sub(r"[^\w\s]", "", e["input"]).upper() + " indeed", "note": "from a quiz"})
        for e in sample
    ]
    embedded = [
        json.dumps({"text": f"Question {n} of the quiz: {e['input']} Answer below.", "answer": e["reference"]})
        for n, e in enumerate(sample, 1)
    ]
    return {"exact": exact, "edited": edited, "embedded": embedded}


def bigbench_rows(per_task: int) -> list[tuple[str, str]]:
    """(dataset id, row JSON) for the first rows of every BIG-bench task."""
    rows = []
    for dataset in open_source("bigbench").datasets():
        wanted = list(range(min(per_task, sum(dataset.count()))))
        for _, _, row, _ in dataset.read(wanted):
            if row:
                rows.append((dataset.dataset_id, json.dumps(row)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="navigate,sports_understanding,date_understanding")
    parser.add_argument("--planted", type=int, default=50)
    parser.add_argument("--rows-per-task", type=int, default=100)
    parser.add_argument("--embed-sample", type=int, default=2000)
    args = parser.parse_args()
    embedder = Embedder(str(resolve_model("builtin:minilm")))
    everything = bigbench_rows(args.rows_per_task)
    for name in [t for t in args.tasks.split(",") if t]:
        started = time.monotonic()
        task = load_task(TASKS / f"{name}.yaml")
        examples = read_eval_set(task.eval, task)
        eval_set = EvalSet.build([e["input"] for e in examples], embedder.encode)
        result = {"task": name, "eval_inputs": len(examples), "similarity_threshold": round(eval_set.threshold, 4)}
        for kind, rows in planted_rows(examples, args.planted).items():
            reasons = eval_set.match_rows(rows, embedder.encode)
            found = [r for r in reasons if r]
            result[f"planted_{kind}"] = f"{len(found)}/{len(rows)}"
            result[f"planted_{kind}_by"] = dict(Counter(r.split(" ")[0] for r in found))
        others = [(d, row) for d, row in everything if not is_banned(d, task.ban)]  # as retrieval leaves them
        by_words = [(dataset, row, eval_set.overlap(" ".join(str(v) for v in json.loads(row).values())))
                    for dataset, row in others]  # fmt: skip
        matched = [(dataset, row, reason) for dataset, row, reason in by_words if reason]
        sample = random.Random(1).sample(others, min(args.embed_sample, len(others)))
        reasons = eval_set.match_rows([row for _, row in sample], embedder.encode)
        near_found = [(d, r, why) for (d, r), why in zip(sample, reasons) if why and why.startswith("similarity")]
        result |= {
            "bigbench_rows": len(others),
            "bigbench_ngram_matches": len(matched),
            "bigbench_ngram_datasets": dict(Counter(d for d, _, _ in matched).most_common(5)),
            "embedded_sample": len(sample),
            "embedded_sample_similarity_matches": len(near_found),
            "examples": [
                {"dataset": d, "row": r[:160], "why": why[:160]} for d, r, why in (matched[:3] + near_found[:3])
            ],
            "seconds": round(time.monotonic() - started, 1),
        }
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
