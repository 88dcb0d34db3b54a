"""Parsing teacher answers leniently and validating records strictly (statuses and reasons)."""

from __future__ import annotations

from rebase.task import TaskSpec
from rebase.teacher.parse import check_records, judge_verdict, parse_completion

FIELDS = ("input", "output")


def test_valid_json():
    assert parse_completion('{"input": "q", "output": "a"}', FIELDS) == ({"input": "q", "output": "a"}, None)


def test_json_in_a_code_fence_with_chatter_around():
    text = 'Sure! Here it is:\n```json\n{"input": "q", "output": "a"}\n```\nHope this helps {not json}'
    assert parse_completion(text, FIELDS) == ({"input": "q", "output": "a"}, None)


def test_trailing_text_and_leading_braces():
    text = 'I think {this} is it: {"input": "q", "output": 42} and some more text }'
    assert parse_completion(text, FIELDS) == ({"input": "q", "output": "42"}, None)


def test_broken_json_missing_fields_and_non_text_values():
    assert parse_completion('{"input": "q", "output": "a"', FIELDS) == (None, "broken JSON (Expecting ',' delimiter)")
    assert parse_completion("no json at all", FIELDS) == (None, "no JSON object in the answer")
    assert parse_completion('{"input": "q"}', FIELDS) == (None, "JSON object without 'output'")
    assert parse_completion('{"input": "q", "output": ["a"]}', FIELDS) == (None, "field 'output' is not text")


def labelled_task() -> TaskSpec:
    return TaskSpec(
        name="nli",
        instruction="Entailment?",
        examples=[{"input": "P: a. H: b.", "output": "b follows from a. So the answer is entailment."}],
        labels=["entailment", "neutral", "contradiction"],
    )


def answer(uid: str, text: str, **extra) -> dict:
    return {"row_uid": uid, "text": text, **extra}


def test_records_get_statuses_and_reasons_in_rank_order():
    task = labelled_task()
    records = check_records(
        task,
        [
            answer("r1", '{"input": "P: x. H: y.", "reasoning": "y is x.", "output": "Entailment."}'),
            answer("r2", '{"input": "P: u. H: v.", "reasoning": "unclear", "output": "maybe"}'),
            answer("r3", '{"input": "p: x.  h: y!", "reasoning": "same again", "output": "neutral"}'),
            answer("r4", '{"input": "P: a. H: b.", "reasoning": "copied", "output": "entailment"}'),
            answer("r5", '{"input": "  ", "reasoning": "r", "output": "neutral"}'),
            answer("r6", '{"input": "P: long', finish_reason="length"),
            {"row_uid": "r7", "error": "RateLimitError 429"},
        ],
    )
    summary = [(r["row_uid"], r["status"], r["reason"]) for r in records]
    assert summary == [
        ("r1", "ok", None),
        ("r2", "rejected", "answer 'maybe' is not one of the labels"),
        ("r3", "duplicate", "same input as row r1"),
        ("r4", "rejected", "copies few-shot example 1"),
        ("r5", "rejected", "empty input"),
        ("r6", "parse_error", "broken JSON (Unterminated string starting at) (cut off at the token limit)"),
        ("r7", "failed", "RateLimitError 429"),
    ]
    # The label is written in its canonical spelling; the student learns reasoning then the answer.
    assert records[0]["answer"] == "entailment"
    assert records[0]["output"] == "y is x. So the answer is entailment."
    assert records[0]["reasoning"] == "y is x."


def test_plain_task_records_keep_the_output_as_written():
    task = TaskSpec(name="qa", instruction="Answer.", examples=[{"input": "Q: a?", "output": "A"}])
    [record] = check_records(task, [answer("r1", '{"input": "Q: b?", "output": "B"}')])
    assert (record["status"], record["output"], record["reasoning"], record["answer"]) == ("ok", "B", None, None)


def test_judge_verdicts():
    assert judge_verdict(" Yes, it fits.") is True
    assert judge_verdict("no") is False
    assert judge_verdict("It depends") is None
    assert judge_verdict("") is None


def test_near_copies_of_a_few_shot_example_are_rejected():
    task = TaskSpec(
        name="navigate",
        instruction="Back at the start?",
        examples=[
            {
                "input": "Take 1 step forward. Take 10 steps left. Take 4 steps forward.",
                "output": "Take 1 step forward: (0, 1). Take 10 steps left: (-10, 1). Take 4 steps forward: "
                "(-10, 5). Since (-10, 5) is not (0, 0), we are not where we started. So the answer is No.",
            }
        ],
        labels=["Yes", "No"],
    )
    copied_reasoning = (
        "Take 1 step forward: (0, 1). Take 10 steps left: (-10, 1). Take 4 steps forward: (-10, 5). "
        "Since (-10, 5) is (0, 0), we are not where we started."
    )
    records = check_records(
        task,
        [
            answer("r1", f'{{"input": "Go two steps north.", "reasoning": "{copied_reasoning}", "output": "Yes"}}'),
            answer(
                "r2",
                '{"input": "Take 1 step forward. Take 10 steps left! Take 4 steps forward", '
                '"reasoning": "We move around.", "output": "No"}',
            ),
            answer(
                "r3",
                '{"input": "Go two steps north, then two south.", "reasoning": "North 2: (0, 2). South 2: '
                '(0, 0). Since (0, 0) is (0, 0), we are back.", "output": "Yes"}',
            ),
        ],
    )
    assert [(r["status"], r["reason"]) for r in records] == [
        ("rejected", "copies the reasoning of few-shot example 1"),
        ("rejected", "copies few-shot example 1"),
        ("ok", None),
    ]
