"""Each data gate's precision on navigate records whose correctness can be established.

    python benchmarks/gates.py [--examples 64] [--transformed DIR ...]

Two samples:
- planted: navigate examples made by a program (benchmarks/ceiling.py, correct by construction), half of
  them with the wrong answer put in (the reasoning still concludes the right one). The contradiction gate
  and the consistency gate (the built-in teacher answers each input again, few-shot, greedy) run on them;
  a removed record is a true removal when its answer was wrong.
- real: what the built-in teacher wrote in transformed directories (`--transformed`, e.g. the demo's
  `out/runs/navigate-demo/transform`): every record that passed the per-answer checks. An input is on
  the task when it is a walk in navigate's words only ("Always face forward.", "Take N steps [left]",
  "Turn around." ...); the task-fit gate's removal is true when the input is not one. The programmatic
  inputs, all on the task, show what the task-fit gate removes wrongly.
Prints per gate: records in, removed, true removals (precision) and wrong records missed (recall).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
from ceiling import TASK, training_set

from rebase.config import TransformConfig
from rebase.datastore.embed import Embedder
from rebase.evaluate import read_eval_set
from rebase.generate.engines import GenerationParams
from rebase.generate.pool import GenerationPool
from rebase.models import resolve_model
from rebase.task import STUDENT_STOP, load_task, student_prompt
from rebase.teacher import gates

_NAVIGATE_SENTENCE = re.compile(
    r"(always face forward|take \d+ steps?( (forward|backward|left|right))?|turn (left|right|around))\.?", re.I
)


def is_navigate(text: str) -> bool:
    """True when the text is a walk in navigate's own sentences and nothing else."""
    sentences = [s for s in re.split(r"(?<=\.)\s+", (text or "").strip()) if s]
    return bool(sentences) and all(_NAVIGATE_SENTENCE.fullmatch(s.strip()) for s in sentences)


def tally(name: str, records: list[dict], bad: list[bool]) -> dict:
    removed = [r["reason"] is not None and r["reason"].startswith(name) for r in records]
    true = sum(r and b for r, b in zip(removed, bad))
    result = {
        "gate": name,
        "records": len(records),
        "bad": sum(bad),
        "removed": sum(removed),
        "true_removals": true,
        "precision": round(true / sum(removed), 3) if any(removed) else None,
        "recall": round(true / sum(bad), 3) if any(bad) else None,
    }
    print(json.dumps(result), flush=True)
    return result


def planted(count: int, scratch: Path) -> list[dict]:
    task = load_task(TASK)
    held_out = {example["input"] for example in read_eval_set(task.eval, task)}
    records, bad = [], []
    for n, example in enumerate(training_set(count, held_out)):
        reasoning, answer = example["output"].rsplit(" So the answer is ", 1)
        answer = answer.rstrip(".")
        wrong = n % 4 in (1, 2)  # half, and as many of each label
        stated = {"Yes": "No", "No": "Yes"}[answer] if wrong else answer
        records.append({"row_uid": f"p{n}", "input": example["input"], "reasoning": reasoning, "answer": stated,
                        "output": stated, "status": "ok", "reason": None})  # fmt: skip
        bad.append(wrong)
    results = []
    markers = gates.conclusion_markers(task)
    for record in records:
        reason = gates.contradiction(task, markers, record)
        record["reason"] = reason
    results.append(tally(gates.CONTRADICTS, records, bad))
    for record in records:
        record.update(status="ok", reason=None)
    config = TransformConfig(retrieved=scratch, task=TASK, out=scratch, max_new_tokens=320)
    teacher = GenerationPool(config, config.teacher)
    prompts = {record["row_uid"]: student_prompt(task, record["input"], few_shot=True) for record in records}
    answers, _ = teacher.answer(
        prompts, scratch / "consistency", GenerationParams(320, 0.0, None, STUDENT_STOP), "again"
    )
    for record in records:
        gates.consistency(task, record, answers[record["row_uid"]]["text"])
    results.append(tally(gates.INCONSISTENT, records, bad))
    return results


def real(directories: list[Path], count: int) -> list[dict]:
    task = load_task(TASK)
    records = []
    for directory in directories:
        for record in pq.read_table(directory / "records.parquet").to_pylist():
            passed_checks = record["status"] == "ok" or any((record["reason"] or "").startswith(g) for g in gates.GATES)
            if passed_checks:
                records.append({**record, "status": "ok", "reason": None})
    held_out = {example["input"] for example in read_eval_set(task.eval, task)}
    made = [{"row_uid": f"p{n}", "input": e["input"], "status": "ok", "reason": None}
            for n, e in enumerate(training_set(count, held_out))]  # fmt: skip
    embedder = Embedder(str(resolve_model("builtin:minilm")))
    example_vectors = embedder.encode([example.input for example in task.examples])
    threshold = gates.fit_threshold(example_vectors, TransformConfig.model_fields["fit_margin"].default)
    everything = records + made
    vectors = embedder.encode([record["input"] or "" for record in everything])
    gates.task_fit(everything, vectors, example_vectors, threshold)
    print(f"task fit threshold {threshold:.3f}", flush=True)
    results = [
        tally(gates.OFF_TASK, records, [not is_navigate(r["input"]) for r in records]) | {"sample": "teacher"},
        tally(gates.OFF_TASK, made, [False] * len(made)) | {"sample": "programmatic"},
    ]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--transformed", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        results = real(args.transformed, args.examples) + planted(args.examples, Path(scratch))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
