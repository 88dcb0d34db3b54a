"""The data gates (rebase/teacher/gates.py): each pure function on hand-made records, then the whole set
inside `rebase transform` on planted teacher answers. The planted answers sit in the stage's own answer
caches, as a teacher would have left them, so the transform re-derives its records from them without
loading a teacher; the embeddings are the real built-in MiniLM's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_transform import write_retrieved

from rebase.config import TransformConfig, build_config
from rebase.errors import RebaseError
from rebase.generate.pool import ANSWER_SCHEMA
from rebase.task import load_task, student_prompt
from rebase.teacher import gates, transform
from rebase.teacher.prompts import prompt_hash, transform_prompt

NAVIGATE = Path(__file__).parents[1] / "jobs" / "tasks" / "navigate.yaml"


def record(uid: str, answer: str, status: str = "ok", reasoning: str | None = None, text: str = "x") -> dict:
    return {"row_uid": uid, "input": text, "answer": answer, "output": answer, "reasoning": reasoning,
            "status": status, "reason": None}  # fmt: skip


def unit(*rows: list[float]) -> np.ndarray:
    vectors = np.array(rows, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


# ------------------------------------------------------------------ the pure gates


def test_fit_threshold_is_the_least_nearest_example_similarity_less_the_margin():
    examples = unit([1, 0, 0], [0.8, 0.6, 0], [0, 0.6, 0.8])
    # nearest-other similarities: 0.8, 0.8, 0.36 (the third is 0.36 from the second, 0 from the first)
    assert gates.fit_threshold(examples, 0.1) == pytest.approx(0.26)
    assert gates.fit_threshold(examples, 0.0) == pytest.approx(0.36)
    assert gates.fit_threshold(unit([1, 0, 0]), 0.1) is None  # one example: nothing to derive it from


def test_task_fit_rejects_only_ok_records_below_the_threshold():
    examples = unit([1, 0], [0.8, 0.6])
    records = [record("a", "Yes"), record("b", "No"), record("c", "No", status="rejected")]
    vectors = unit([0.6, 0.8], [0, 1], [0, 1])  # best similarities 0.96 and 0.6, 0.6
    gates.task_fit(records, vectors, examples, 0.7)
    assert [r["status"] for r in records] == ["ok", "rejected", "rejected"]
    assert records[1]["reason"] == "off task: input similarity 0.60 to the task's examples is below 0.70"
    assert records[2]["reason"] is None  # already rejected by something else: left as it was


def test_conclusion_markers_come_from_the_task_examples():
    assert gates.conclusion_markers(load_task(NAVIGATE)) == {"No": {"not"}, "Yes": {"back"}}


def test_contradiction_between_the_reasoning_and_the_answer():
    task = load_task(NAVIGATE)
    markers = gates.conclusion_markers(task)
    # the case seen in a demo run: the reasoning concludes "not where we started", then the record says Yes
    wrong = "Take 4 steps: (-10, 5). Since (-10, 5) is (0, 0), we are not where we started. Take 2 steps: (-10, 7)."
    assert gates.contradiction(task, markers, record("a", "Yes", reasoning=wrong)) == (
        "reasoning contradicts the answer: the reasoning ends toward 'No', the record says 'Yes'"
    )
    assert gates.contradiction(task, markers, record("a", "No", reasoning=wrong)) is None
    right = "Turn around: (0, 0). Since (0, 0) is not (1, 0)... no: (0, 0) is (0, 0), we are back where we started."
    assert gates.contradiction(task, markers, record("a", "Yes", reasoning=right)) is None  # own marker present
    silent = "We walk about and stop."
    assert gates.contradiction(task, markers, record("a", "Yes", reasoning=silent)) is None
    stated = "We end at (0, 2). So the answer is No"
    assert gates.contradiction(task, markers, record("a", "Yes", reasoning=stated)) == (
        "reasoning contradicts the answer: the reasoning says the answer is 'No', the record 'Yes'"
    )


def test_near_duplicates_keep_the_better_ranked_record():
    records = [record("a", "Yes"), record("b", "No", status="rejected"), record("c", "Yes"), record("d", "No")]
    vectors = unit([1, 0], [1, 0], [0.99, 0.141], [0, 1])  # c is 0.99 like a; b was rejected before
    gates.near_duplicates(records, vectors, 0.97)
    assert [r["status"] for r in records] == ["ok", "rejected", "duplicate", "ok"]
    assert records[2]["reason"] == "near duplicate: of row a (similarity 0.99)"


def test_consistency_keeps_agreeing_answers_only():
    task = load_task(NAVIGATE)
    agrees, differs, silent = record("a", "Yes"), record("b", "Yes"), record("c", "No")
    gates.consistency(task, agrees, "We start at (0, 0). Turn around: (0, 0). So the answer is Yes.\n\nInput: x")
    gates.consistency(task, differs, "We end at (0, 4). So the answer is No.")
    gates.consistency(task, silent, "We walk and walk.")
    assert [r["status"] for r in (agrees, differs, silent)] == ["ok", "rejected", "rejected"]
    assert differs["reason"] == "inconsistent: asked again, the teacher answers 'No', not 'Yes'"
    assert silent["reason"] == "inconsistent: asked again, the teacher gives no answer"
    free = load_task(NAVIGATE).model_copy(update={"labels": None})
    answer = {**record("d", None), "output": "Paris"}
    gates.consistency(free, answer, "The capital is Paris.")  # no "answer is": the whole text, which differs
    assert answer["status"] == "rejected"


def test_label_balance_trims_the_worst_ranked_of_a_label_over_its_share():
    records = [record(str(n), label) for n, label in enumerate(["Yes", "Yes", "No", "Yes", "Yes", "No", "Yes"])]
    gates.balance_labels(records, 0.6)  # 5 Yes, 2 No: at most 3 Yes keep Yes <= 60%
    assert [r["status"] for r in records] == ["ok", "ok", "ok", "ok", "rejected", "ok", "rejected"]
    assert records[4]["reason"] == "label balance: 'Yes' would be over 60% of the ok records"
    lone = [record("a", "Yes"), record("b", "Yes")]
    gates.balance_labels(lone, 0.6)  # one label is all there is: a student taught it only learns to say it
    assert [r["status"] for r in lone] == ["rejected", "rejected"]
    three = [record(str(n), label) for n, label in enumerate(["a", "a", "b", "c"])]
    gates.balance_labels(three, 0.5)
    assert [r["status"] for r in three] == ["ok", "ok", "ok", "ok"]  # 2 of 4 is not over half
    gates.balance_labels(lone := [record("a", "Yes")], 1.0)
    assert lone[0]["status"] == "ok"  # 1.0: the gate is off


# ------------------------------------------------------------------ planted answers through rebase transform

_WALK = "We start at (0, 0), facing the positive y-axis."
PLANTED = [  # (input, reasoning, answer, what the teacher answers when asked again, expected status, reason)
    ("Take 2 steps. Turn around. Take 2 steps.",
     f"{_WALK} Take 2 steps: (0, 2). Turn around. Take 2 steps: (0, 0). Since (0, 0) is (0, 0), we are back "
     "where we started.", "Yes", "Yes", "ok", None),
    ("Always face forward. Take 3 steps left. Take 1 step forward.",
     f"{_WALK} Take 3 steps left: (-3, 0). Take 1 step forward: (-3, 1). Since (-3, 1) is not (0, 0), we are not "
     "where we started.", "No", "No", "ok", None),
    ("[(3, -4), (5, 2), (7, 1)]",
     f"{_WALK} The points are far apart, so we are back where we started.", "Yes", "Yes", "rejected", "off task"),
    ("Take 5 steps. Turn right. Take 3 steps.",
     f"{_WALK} Take 5 steps: (0, 5). Turn right: facing the positive x-axis. Take 3 steps: (3, 5). Since (3, 5) "
     "is (0, 0), we are not where we started. Take 1 step: (4, 5).", "Yes", "Yes", "rejected",
     "reasoning contradicts the answer"),
    ("Take 2 steps. Then turn around. Take 2 steps.",
     f"{_WALK} Take 2 steps: (0, 2). Turn around. Take 2 steps: (0, 0). Since (0, 0) is (0, 0), we are back where "
     "we started.", "Yes", "Yes", "duplicate", "near duplicate"),
    ("Take 7 steps. Turn left. Turn left. Take 7 steps.",
     f"{_WALK} Take 7 steps: (0, 7). Turn left twice: facing the negative y-axis. Take 7 steps: (0, 0). Since "
     "(0, 0) is (0, 0), we are back where we started.", "Yes", "No", "rejected", "inconsistent"),
    ("Always face forward. Take 4 steps backward. Take 4 steps forward.",
     f"{_WALK} Take 4 steps backward: (0, -4). Take 4 steps forward: (0, 0). Since (0, 0) is (0, 0), we are back "
     "where we started.", "Yes", "Yes", "ok", None),
    ("Turn right. Take 5 steps. Turn around. Take 5 steps.",
     f"{_WALK} Turn right: facing the positive x-axis. Take 5 steps: (5, 0). Turn around. Take 5 steps: (0, 0). "
     "Since (0, 0) is (0, 0), we are back where we started.", "Yes", "Yes", "ok", None),
    ("Always face forward. Take 6 steps right. Take 2 steps forward. Take 6 steps left.",
     f"{_WALK} Take 6 steps right: (6, 0). Take 2 steps forward: (6, 2). Take 6 steps left: (0, 2). Since (0, 2) "
     "is not (0, 0), we are not where we started.", "No", "No", "ok", None),
    ("Take 1 step. Turn around. Take 1 step.",
     f"{_WALK} Take 1 step: (0, 1). Turn around. Take 1 step: (0, 0). Since (0, 0) is (0, 0), we are back where "
     "we started.", "Yes", "Yes", "rejected", "label balance"),
]  # fmt: skip


def _plant(directory: Path, answers: dict[str, str]) -> None:
    directory.mkdir(parents=True)
    rows = [
        {"prompt_hash": h, "text": text, "prompt_tokens": 100, "completion_tokens": 50, "finish_reason": "stop",
         "seconds": 0.1}
        for h, text in answers.items()
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA), directory / "part-planted.parquet")


def test_planted_bad_records_are_removed_and_good_ones_kept(tmp_path):
    """Ten navigate answers: five good, one of each kind the gates exist for (an input off the task, reasoning
    that concludes the other answer, a near copy of a better-ranked input, an answer the teacher does not
    give again, one Yes too many for the 60% share). The records say which gate removed each."""
    rows = [{"question": f"row {n}", "answer": "x"} for n in range(len(PLANTED))]
    retrieved = write_retrieved(tmp_path / "retrieved", rows)
    out = tmp_path / "transformed"
    values = {"retrieved": retrieved, "task": NAVIGATE, "out": out, "dtype": "float32", "max_new_tokens": 320}
    # Two planted walks are BIG-bench navigate evaluation items word for word, which decontamination would
    # take out first (tests/test_decontaminate.py); here the gates alone are under test.
    values["decontaminate"] = False
    config = build_config(TransformConfig, values)
    task = load_task(NAVIGATE)
    settings = {"max_new_tokens": 320, "temperature": 0.0, "constrained": True}
    first, again = {}, {}
    for row, (text, reasoning, answer, second, _, _) in zip(rows, PLANTED):
        prompt = transform_prompt(task, row, config.max_value_chars)
        first[prompt_hash(prompt, config.teacher, settings)] = json.dumps(
            {"input": text, "reasoning": reasoning, "output": answer}
        )
        asked = student_prompt(task, text, few_shot=True)
        again[prompt_hash(asked, config.teacher, {"consistency": True, **settings})] = (
            f"{_WALK} ... So the answer is {second}.\n\nInput: Take 1 step."
        )
    _plant(out / "answers", first)
    _plant(out / "consistency", again)

    summary = transform(config)
    assert summary.sent == 0  # every answer came from the caches: no teacher was loaded
    found = pq.read_table(out / "records.parquet").to_pylist()
    assert [(r["status"], r["reason"] and r["reason"].split(":")[0]) for r in found] == [
        (status, gate) for *_, status, gate in PLANTED
    ]
    assert found[4]["reason"].startswith("near duplicate: of row uid0001 (similarity 0.9")
    stats = json.loads((out / "stats.json").read_text())
    assert stats["gates"] == {
        "off task": 1,
        "reasoning contradicts the answer": 1,
        "near duplicate": 1,
        "inconsistent": 1,
        "label balance": 1,
    }
    assert stats["statuses"] == {"ok": 5, "rejected": 4, "duplicate": 1}
    assert 0.5 < stats["fit_threshold"] < 0.9  # derived from navigate's three example inputs
    assert stats["settings"]["max_label_share"] == 0.6
    assert "label balance 1" in summary.line()

    # Off, the gates pass what they stopped (a new directory: gate settings are part of its fingerprint).
    open_out = tmp_path / "open"
    _plant(open_out / "answers", first)
    off = {"consistency": False, "max_label_share": 1.0, "near_duplicate_similarity": 1.0, "fit_threshold": -1.0}
    transform(build_config(TransformConfig, {**values, "out": open_out, **off}))
    statuses = [r["status"] for r in pq.read_table(open_out / "records.parquet").to_pylist()]
    assert statuses.count("ok") == 9  # all but the contradiction, which is no setting


@pytest.mark.parametrize(
    "flag, value, field",
    [
        ("--fit-margin", "-0.1", "fit_margin"),
        ("--fit-threshold", "1.5", "fit_threshold"),
        ("--near-duplicate-similarity", "0", "near_duplicate_similarity"),
        ("--max-label-share", "1.2", "max_label_share"),
    ],
)
def test_gate_settings_out_of_range_are_one_line_and_exit_2(tmp_path, flag, value, field):
    retrieved = write_retrieved(tmp_path / "retrieved", [{"question": "q", "answer": "a"}])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("earlier work")
    command = [sys.executable, "-m", "rebase", "transform", "--retrieved", str(retrieved), "--task", str(NAVIGATE)]
    result = subprocess.run([*command, "--out", str(out), flag, value], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and field in lines[0], result.stderr
    assert (out / "keep.txt").read_text() == "earlier work"


def test_gate_settings_are_validated_in_the_config():
    with pytest.raises(RebaseError, match="field 'max_label_share'"):
        build_config(TransformConfig, {"retrieved": "r", "task": "t", "out": "o", "max_label_share": 0})
