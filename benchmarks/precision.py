"""Float32 against the default precision (`dtype: auto`) for the generating stages, in one run.

    python benchmarks/precision.py [--teacher-rows 64] [--eval-examples 200] [--eval-max-new-tokens 96]

Both sides use the built-in Gemma 3 270M on this machine, greedy decoding, the same inputs:
- teacher: `rebase transform` of the same retrieved rows (the navigate task over a small BIG-bench
  datastore built first, navigate itself banned) at `dtype: float32` and at `dtype: auto`: generated
  tokens per second of generation, the share of `ok` records, and the share of rows whose greedy answer
  is the same text at both precisions;
- evaluation: `rebase evaluate` of the built-in model with the task's few-shot examples on the same
  held-out BIG-bench navigate examples at both precisions: examples per second, accuracy with its 95%
  Wilson interval, and the share of identical predictions.
Training (`benchmarks/train.py`), embedding (`benchmarks/embed.py`) and serving (`benchmarks/serve.py
--dtype`) compare the precisions in their own benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

import rebase
from rebase import precision
from rebase.generate.pool import _read_answers
from rebase.intervals import wilson

REPO = Path(__file__).resolve().parent.parent
TASK = REPO / "jobs" / "tasks" / "navigate.yaml"
# Tasks near navigate in form (states, steps, objects) and far from it, a few hundred rows each.
STORE_TASKS = "logical_deduction,tracking_shuffled_objects,date_understanding,temporal_sequences,object_counting"


def teacher(retrieved: Path, scratch: Path, rows: int, max_new_tokens: int) -> dict:
    runs, outputs = {}, {}
    for dtype in ("float32", "auto"):
        out = scratch / f"transform-{dtype}"
        summary = rebase.transform(
            retrieved, TASK, out, limit=rows, max_new_tokens=max_new_tokens, prompts_per_call=rows, dtype=dtype
        )
        records = pq.read_table(out / "records.parquet", columns=["row_uid", "prompt_hash", "status"]).to_pylist()
        answers = _read_answers(out / "answers")  # the stage's own answer cache, keyed by prompt hash
        outputs[dtype] = {r["row_uid"]: answers.get(r["prompt_hash"], {}).get("text") for r in records}
        runs[dtype] = {
            "rows": summary.rows,
            "ok_share": round(summary.statuses.get("ok", 0) / summary.rows, 3),
            "statuses": summary.statuses,
            "completion_tokens": summary.completion_tokens,
            "generation_seconds": round(summary.generation_seconds, 1),
            "tokens_per_second": round(summary.completion_tokens / summary.generation_seconds, 1),
        }
        print(f"teacher, dtype {dtype}:", json.dumps(runs[dtype]), flush=True)
    same = sum(outputs["float32"][uid] == outputs["auto"].get(uid) for uid in outputs["float32"])
    runs["identical_answers_share"] = round(same / len(outputs["float32"]), 3)
    runs["speedup"] = round(runs["auto"]["tokens_per_second"] / runs["float32"]["tokens_per_second"], 2)
    return runs


def evaluation(scratch: Path, examples: int, max_new_tokens: int) -> dict:
    runs, predictions = {}, {}
    for dtype in ("float32", "auto"):
        out = scratch / f"evaluate-{dtype}"
        started = time.monotonic()
        summary = rebase.evaluate(
            "builtin:gemma3-270m",
            TASK,
            out,
            limit=examples,
            few_shot=True,
            max_new_tokens=max_new_tokens,
            prompts_per_call=examples,
            dtype=dtype,
        )
        seconds = time.monotonic() - started
        rows = pq.read_table(out / "predictions.parquet").to_pylist()
        predictions[dtype] = [row["prediction"] for row in rows]
        correct = sum(bool(row["correct"]) for row in rows)
        runs[dtype] = {
            "examples": summary.examples,
            "accuracy": round(correct / len(rows), 3),
            "accuracy_95": wilson(correct, len(rows)),
            "seconds": round(seconds, 1),
            "examples_per_second": round(summary.examples / seconds, 3),
        }
        print(f"evaluation, dtype {dtype}:", json.dumps(runs[dtype]), flush=True)
    same = sum(a == b for a, b in zip(predictions["float32"], predictions["auto"]))
    runs["identical_predictions_share"] = round(same / len(predictions["float32"]), 3)
    runs["speedup"] = round(runs["auto"]["examples_per_second"] / runs["float32"]["examples_per_second"], 2)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher-rows", type=int, default=64)
    parser.add_argument("--teacher-max-new-tokens", type=int, default=320, help="as the demo's transform")
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--eval-max-new-tokens", type=int, default=96)
    args = parser.parse_args()
    report: dict = {"default_precision": precision.resolve("auto", "cpu")}
    with tempfile.TemporaryDirectory(dir=os.environ.get("REBASE_BENCH_TMP")) as tmp:
        scratch = Path(tmp)
        store = scratch / "store"
        rebase.build_datastore(f"bigbench:{STORE_TASKS}", store, rows_per_dataset=200, embed_dtype="float32")
        rebase.retrieve(store, TASK, scratch / "retrieved", top_k=args.teacher_rows, exact=True)
        report["teacher"] = teacher(scratch / "retrieved", scratch, args.teacher_rows, args.teacher_max_new_tokens)
        report["evaluation"] = evaluation(scratch, args.eval_examples, args.eval_max_new_tokens)
    print(json.dumps(report, indent=2))
    t, e = report["teacher"], report["evaluation"]
    print(
        f"teacher: {report['default_precision']} {t['speedup']}x float32 in generated tokens/s, ok share "
        f"{t['auto']['ok_share']} vs {t['float32']['ok_share']}, identical answers {t['identical_answers_share']}"
    )
    print(
        f"evaluation: {report['default_precision']} {e['speedup']}x float32 in examples/s, accuracy "
        f"{e['auto']['accuracy']} {e['auto']['accuracy_95']} vs {e['float32']['accuracy']} "
        f"{e['float32']['accuracy_95']}, identical predictions {e['identical_predictions_share']}"
    )


if __name__ == "__main__":
    main()
