"""Metrics on known cases, the student's prompt format, held-out data, and `rebase evaluate` on real Ray
with the built-in model beside a student trained in this session."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from conftest import navigate_examples, write_jsonl

from rebase.cli import main
from rebase.errors import RebaseError
from rebase.evaluate import (
    exact_match,
    label_correct,
    normalise_answer,
    predicted_label,
    read_eval_set,
    score,
    token_f1,
)
from rebase.task import TaskSpec, load_task, student_prompt


def test_normalise_answer_as_squad_does():
    assert normalise_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert normalise_answer("An apple, a pear") == "apple pear"


def test_exact_match_uses_the_final_answer():
    assert exact_match("We reason a while. So the answer is Paris.", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("the Louvre", ["Orsay", "Louvre"]) == 1.0


def test_token_f1_hand_computed():
    # prediction tokens {cat, sat}; reference {cat, sat, down}: precision 1, recall 2/3, F1 0.8
    assert token_f1("the cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert token_f1("the cat sat", ["dog", "cat"]) == pytest.approx(2 / 3)  # best reference: p 1/2, r 1
    assert token_f1("", [""]) == 1.0
    assert token_f1("cat", [""]) == 0.0


def test_label_accuracy_on_chain_of_thought_outputs():
    labels = ["Yes", "No"]
    assert label_correct("We end at (0, 0). So the answer is yes.", "... So the answer is Yes.", labels) == 1.0
    assert label_correct("So the answer is No.", "So the answer is Yes.", labels) == 0.0
    assert label_correct("I cannot tell.", "So the answer is Yes.", labels) == 0.0


def test_score_picks_metrics_by_task():
    labelled = TaskSpec(name="t", instruction="i", examples=[{"input": "a", "output": "Yes"}], labels=["Yes", "No"])
    assert score(labelled, ["Yes", "so the answer is no", "maybe"], [["Yes"], ["Yes"], ["No"]]) == {
        "exact_match": 0.3333,
        "accuracy": 0.3333,
    }
    free = TaskSpec(name="t", instruction="i", examples=[{"input": "a", "output": "b"}])
    assert score(free, ["the cat sat", "Paris"], [["a cat sat down"], ["paris"]]) == {"exact_match": 0.5, "f1": 0.9}
    with pytest.raises(ValueError):
        score(free, [], [])


def test_student_prompt_format():
    task = TaskSpec(name="t", instruction="Say yes or no.", examples=[{"input": "Is ice cold?", "output": "Yes"}])
    assert student_prompt(task, " Is fire cold? ") == (
        "### Instruction:\nSay yes or no.\n\n### Input:\nIs fire cold?\n\n### Response:\n"
    )
    assert student_prompt(task, "Is fire cold?", few_shot=True) == (
        "### Instruction:\nSay yes or no.\n\n### Examples:\nInput: Is ice cold?\nResponse: Yes\n\n"
        "### Input:\nIs fire cold?\n\n### Response:\n"
    )


def test_predicted_label_from_answers_first_lines_and_leading_words():
    labels = ["Yes", "No"]
    assert predicted_label("We end at (0, 0). So the answer is yes.", labels) == "Yes"
    assert predicted_label("No\n\nBecause we moved.", labels) == "No"
    assert predicted_label("Yes, we are back at the start.", labels) == "Yes"
    assert predicted_label("Maybe. The answer is unclear", labels) is None
    assert predicted_label("", labels) is None
    assert label_correct("No, we are not.", "No", labels) == 1.0


def test_eval_set_maps_answers_to_labels_and_samples_a_fixed_subset(tmp_path):
    rows = [{"input": f"Take {n} steps.", "output": "True" if n % 2 else "False"} for n in range(30)]
    rows += [{"input": "Take 3 steps.", "output": "True"}, {"input": " ", "output": "False"}]  # duplicate, empty
    write_jsonl(tmp_path / "eval.jsonl", rows)
    task = load_task("jobs/tasks/navigate.yaml")
    examples = read_eval_set(f"files:{tmp_path / 'eval.jsonl'}", task)
    assert len(examples) == 30 and {e["reference"] for e in examples} == {"Yes", "No"}
    assert {e["input"]: e["reference"] for e in examples}["Take 3 steps."] == "Yes"
    sample = read_eval_set(f"files:{tmp_path / 'eval.jsonl'}", task, limit=10)
    assert sample == read_eval_set(f"files:{tmp_path / 'eval.jsonl'}", task, limit=10) == examples[:10]
    write_jsonl(tmp_path / "empty.jsonl", [{"input": "x"}])
    with pytest.raises(RebaseError, match="has no rows with an input and an output"):
        read_eval_set(f"files:{tmp_path / 'empty.jsonl'}", task)


def test_eval_answers_must_name_labels():
    with pytest.raises(ValueError, match="not one of the labels"):
        TaskSpec(
            name="t",
            instruction="i",
            examples=[{"input": "a", "output": "Yes"}],
            labels=["Yes"],
            eval_answers={"True": "Sure"},
        )


def test_bad_evaluation_input_is_one_line(tmp_path, capsys):
    (tmp_path / "task.yaml").write_text("name: t\ninstruction: Say yes.\nexamples: [{input: a, output: b}]\n")
    cases = [
        (
            ["evaluate", "--model", "builtin:gemma3-270m", "--task", str(tmp_path / "task.yaml"), "--out", "x"],
            "names no eval source; pass --data SPEC",
        ),
        (
            [
                "evaluate",
                "--model",
                "builtin:gemma3-270m",
                "--task",
                "jobs/tasks/navigate.yaml",
                "--out",
                "x",
                "--compare",
                "base",
            ],
            "--compare base needs a student made by rebase train",
        ),
        (
            [
                "evaluate",
                "--model",
                "builtin:gemma3-270m",
                "--task",
                "jobs/tasks/navigate.yaml",
                "--out",
                "x",
                "--data",
                f"files:{tmp_path / 'none.jsonl'}",
            ],
            "none.jsonl",
        ),
        (["evaluate", "--task", "jobs/tasks/navigate.yaml"], "evaluate needs --model"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        error = capsys.readouterr().err.strip()
        assert error.startswith("rebase: error:") and message in error and len(error.splitlines()) == 1, error


@pytest.mark.slow
def test_evaluate_a_student_beside_its_base_then_resume(trained_student, tmp_path, capsys):
    config, _ = trained_student
    held_out = navigate_examples(6, start=16)  # inputs the training set (examples 0-15) does not hold
    write_jsonl(tmp_path / "eval.jsonl", held_out)
    out = tmp_path / "evaluation"
    argv = ["evaluate", "--model", str(config.out), "--task", "jobs/tasks/navigate.yaml", "--out", str(out)]
    argv += ["--data", f"files:{tmp_path / 'eval.jsonl'}", "--compare", "base", "--max-new-tokens", "24"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "(student)" in printed and "builtin:gemma3-270m (base)" in printed and "accuracy" in printed
    summary = json.loads((out / "stats.json").read_text())
    assert summary["examples"] == 6 and set(summary["roles"].values()) == {"student", "base"}
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(predictions) == 12
    student = [p for p in predictions if p["role"] == "student"]
    # trained on this format for 8 steps, the student answers in it; its score is what the rows say
    assert all(p["prediction"].startswith("We start at (0, 0)") for p in student)
    assert summary["models"][str(config.out)]["accuracy"] == round(sum(p["correct"] for p in student) / 6, 4)
    parts = sorted(path.name for path in (out / "answers").rglob("part-*.parquet"))

    assert main(argv) == 0  # every answer is cached: nothing is generated again
    assert sorted(path.name for path in (out / "answers").rglob("part-*.parquet")) == parts
    assert json.loads((out / "stats.json").read_text())["models"] == summary["models"]
