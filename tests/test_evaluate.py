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
    best_margin,
    exact_match,
    label_correct,
    majority_label,
    normalise_answer,
    predicted_label,
    read_eval_set,
    score,
    token_f1,
)
from rebase.intervals import bootstrap_mean, paired_margin, score_interval, wilson
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
    assert label_correct("We end at (0, 0). So the answer is yes.", ["... So the answer is Yes."], labels) == 1.0
    assert label_correct("So the answer is No.", ["So the answer is Yes."], labels) == 0.0
    assert label_correct("I cannot tell.", ["So the answer is Yes."], labels) == 0.0


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
    assert label_correct("No, we are not.", ["No"], labels) == 1.0


def test_every_acceptable_reference_counts():
    counting = TaskSpec(name="t", instruction="Count.", examples=[{"input": "a", "output": "2"}])
    references = [["three", "3"], ["two", "2"], ["one", "1"]]
    predictions = ["So the answer is 3.", "two", "So the answer is 4."]
    assert score(counting, predictions, references) == {"exact_match": 0.6667, "f1": 0.6667}
    assert label_correct("So the answer is yes.", ["No", "Yes"], ["Yes", "No"]) == 1.0


def test_eval_set_takes_list_outputs_as_alternatives_and_refuses_a_sample_larger_than_the_source(tmp_path):
    write_jsonl(
        tmp_path / "eval.jsonl", [{"input": "How many?", "output": ["three", "3"]}, {"input": "x", "output": "1"}]
    )
    task = TaskSpec(name="t", instruction="Count.", examples=[{"input": "a", "output": "2"}])
    examples = read_eval_set(f"files:{tmp_path / 'eval.jsonl'}", task)
    assert {e["input"]: e["references"] for e in examples} == {"How many?": ["three", "3"], "x": ["1"]}
    with pytest.raises(RebaseError, match=r"has 2 examples to evaluate on; --limit 3 asks for more"):
        read_eval_set(f"files:{tmp_path / 'eval.jsonl'}", task, limit=3)


@pytest.mark.slow  # reads the BIG-bench archive (downloaded from PyPI on a fresh machine)
def test_bigbench_eval_set_keeps_every_target():
    task = TaskSpec(name="t", instruction="Count.", examples=[{"input": "a", "output": "2"}])
    examples = read_eval_set("bigbench:object_counting", task)
    assert len(examples) == 1000
    # BIG-bench gives each count as a word and as digits; both count as right
    assert all(len(e["references"]) == 2 and e["references"][1].isdigit() for e in examples)


def test_predicted_label_on_student_outputs_of_several_shapes():
    labels = ["Yes", "No"]
    shapes = {
        # a label, then the reasoning behind it, after "the answer is"
        "Joe chose the second box. Therefore, the answer is Yes, Joe's first choice caused him to win a dollar.": "Yes",
        "We start at (0, 0), facing the positive y-axis. Take 3 steps: (0, 3). Turn around. Take 3 steps: "
        "(0, 0). Since (0, 0) is (0, 0), we are where we started. So the answer is Yes.": "Yes",
        "So the answer is: No": "No",
        "So the answer is **No**.": "No",
        "No\n### Input: Take 2 steps.": "No",
        "The answer is not clear. We start at (0, 0).": None,
        "We start at (0, 0). Take 5 steps: (0, 5). Take 5 steps: (0, 10). Since (0, 10) is not (0, 0), we": None,
    }
    for prediction, label in shapes.items():
        assert predicted_label(prediction, labels) == label, prediction
    assert predicted_label("So the answer is not entailment, as", ["entailment", "not entailment"]) == "not entailment"


def test_wilson_and_bootstrap_intervals():
    # Wilson for 45 of 100, by hand: centre (0.45 + z^2/200) / (1 + z^2/100) = 0.45185, half-width 0.09570
    assert wilson(45, 100) == (0.3561, 0.5476)
    assert wilson(0, 10) == (0.0, 0.2775) and wilson(0, 0) == (0.0, 1.0)
    assert score_interval([1.0, 0.0] * 50) == wilson(50, 100)
    low, high = score_interval([0.5, 0.25, 1.0, 0.0] * 25)  # F1-like values: bootstrap around the mean 0.4375
    assert 0.35 < low < 0.4375 < high < 0.53
    assert bootstrap_mean([0.7] * 5) == (0.7, 0.7) and bootstrap_mean([0.2, 0.9]) == bootstrap_mean([0.2, 0.9])
    assert paired_margin([1.0] * 10, [1.0] * 10) == (0.0, 0.0, 0.0)
    value, low, high = paired_margin([1.0] * 60 + [0.0] * 40, [1.0] * 40 + [0.0] * 60)
    assert value == 0.2 and 0.1 < low < 0.2 < high < 0.3


def test_majority_label_and_the_margin_over_the_best_baseline():
    task = load_task("jobs/tasks/navigate.yaml")
    examples = [{"references": [answer]} for answer in ["No", "Yes", "No"]]
    assert majority_label(task, examples) == "No"
    free = TaskSpec(name="t", instruction="i", examples=[{"input": "a", "output": "b"}])
    assert majority_label(free, examples) is None
    per_example = {
        "student": {"accuracy": [1.0, 1.0, 0.0, 1.0]},
        "base": {"accuracy": [0.0, 0.0, 0.0, 0.0]},
        "few-shot": {"accuracy": [1.0, 0.0, 0.0, 1.0]},
        "majority": {"accuracy": [0.0, 1.0, 0.0, 0.0]},
    }
    roles = {"student": "student", "base": "base", "few-shot": "base few-shot", "majority": "majority"}
    margin = best_margin("accuracy", per_example, roles)
    assert (margin.over, margin.role, margin.value) == ("few-shot", "base few-shot", 0.25)
    assert margin.low <= 0.25 <= margin.high
    assert margin.text().startswith("+0.250 accuracy over base few-shot (95% ")
    assert best_margin("accuracy", {"student": per_example["student"]}, {"student": "student"}) is None


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


def test_an_out_holding_another_evaluation_is_refused_and_kept(tmp_path, capsys):
    """Seen in a probe: `rebase evaluate` overwrote another model's evaluation in its --out, exit 0."""
    out = tmp_path / "evaluation"
    out.mkdir()
    other = {"task": "navigate", "data": "bigbench:navigate", "fingerprint": "0123456789abcdef"}
    (out / "stats.json").write_text(json.dumps(other | {"models": {"out/another-student": {"accuracy": 0.6}}}))
    (out / "predictions.parquet").write_bytes(b"another model's predictions")
    (out / "_SUCCESS").write_text("")
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    argv = ["evaluate", "--model", "builtin:gemma3-270m", "--task", "jobs/tasks/navigate.yaml", "--out", str(out)]
    assert main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error == (
        f"rebase: error: --out {out} holds another evaluation (navigate on bigbench:navigate: out/another-student); "
        "choose another --out"
    )
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before


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
    assert "builtin:gemma3-270m (few-shot) (base few-shot)" in printed and "margin over the best baseline" in printed
    summary = json.loads((out / "stats.json").read_text())
    assert summary["examples"] == 6
    assert set(summary["roles"].values()) == {"student", "base", "base few-shot", "majority"}
    predictions = pq.read_table(out / "predictions.parquet").to_pylist()
    assert len(predictions) == 24  # 6 examples x (student, base, base few-shot, majority label)
    few_shot = [p for p in predictions if p["role"] == "base few-shot"]
    # the few-shot base saw the task's examples: its answers differ from the base's in the student's prompt
    assert [p["prediction"] for p in few_shot] != [p["prediction"] for p in predictions if p["role"] == "base"]
    majority = [p for p in predictions if p["role"] == "majority"]
    assert len({p["prediction"] for p in majority}) == 1
    best = max(
        (name for name, role in summary["roles"].items() if role != "student"),
        key=lambda name: summary["models"][name]["accuracy"],
    )
    margin = summary["margin"]
    assert margin["over"] == best and margin["metric"] == "accuracy"
    assert margin["value"] == round(
        summary["models"][str(config.out)]["accuracy"] - summary["models"][best]["accuracy"], 4
    )
    assert margin["low"] <= margin["value"] <= margin["high"]
    low, high = summary["intervals"][str(config.out)]["accuracy"]
    assert low <= summary["models"][str(config.out)]["accuracy"] <= high
    student = [p for p in predictions if p["role"] == "student"]
    # trained on this format for 8 steps, the student answers in it; its score is what the rows say
    assert all(p["prediction"].startswith("We start at (0, 0)") for p in student)
    assert summary["models"][str(config.out)]["accuracy"] == round(sum(p["correct"] for p in student) / 6, 4)
    parts = sorted(path.name for path in (out / "answers").rglob("part-*.parquet"))

    assert main(argv) == 0  # every answer is cached: nothing is generated again
    assert sorted(path.name for path in (out / "answers").rglob("part-*.parquet")) == parts
    assert json.loads((out / "stats.json").read_text())["models"] == summary["models"]
    assert main([*argv[:-2], "--max-new-tokens", "30"]) == 2  # other settings: another evaluation, refused
    assert "holds another evaluation" in capsys.readouterr().err
    assert json.loads((out / "stats.json").read_text())["models"] == summary["models"]
