"""Task files: the shipped ones load; bad ones fail with one line naming the file and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from rebase.errors import RebaseError
from rebase.task import load_task

TASKS = Path(__file__).resolve().parents[1] / "jobs" / "tasks"


def test_shipped_tasks_load_and_ban_their_own_data():
    tasks = {path.stem: load_task(path) for path in sorted(TASKS.glob("*.yaml"))}
    assert {"nli", "squad", "boolean_expressions", "navigate", "date_understanding", "sports_understanding"} <= set(
        tasks
    )
    for name in ("boolean_expressions", "navigate", "date_understanding", "sports_understanding"):
        task = tasks[name]
        assert task.name == name and f"bigbench/{name}" in task.ban
        assert all(example.output.endswith(".") and "So the answer is" in example.output for example in task.examples)
    assert tasks["nli"].labels == ["entailment", "neutral", "contradiction"]
    for task in tasks.values():
        if task.labels:  # every example's final answer is one of the labels
            for example in task.examples:
                answer = example.output.rsplit("the answer is", 1)[-1].strip(" .")
                assert answer in task.labels, (task.name, answer)


def write(tmp_path, text):
    path = tmp_path / "task.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("name: t\ninstruction: do\nexamples: []\n", "examples"),
        ("name: t\ninstruction: '  '\nexamples: [{input: a, output: b}]\n", "instruction"),
        ("name: t\ninstruction: do\nexamples: [{input: a, output: ''}]\n", "examples.0.output"),
        ("name: t\ninstruction: do\nexamples: [{input: a}]\n", "examples.0.output"),
        (
            "name: t\ninstruction: do\nexamples: " + str([{"input": str(i), "output": "o"} for i in range(9)]) + "\n",
            "examples",
        ),
        ("name: t\ninstruction: do\nexamples: [{input: a, output: b}]\nlabels: [x, x]\n", "labels"),
        ("name: t\ninstruction: do\nexamples: [{input: a, output: b}]\nban: ['']\n", "ban"),
        ("name: 'a b'\ninstruction: do\nexamples: [{input: a, output: b}]\n", "name"),
        ("name: t\ninstruction: do\nexamples: [{input: a, output: b}]\nextra: 1\n", "extra"),
    ],
)
def test_bad_task_files_name_file_and_field(tmp_path, text, field):
    path = write(tmp_path, text)
    with pytest.raises(RebaseError) as error:
        load_task(path)
    assert str(error.value).startswith(f"{path}: field '{field}'")


def test_bans_are_trimmed_of_a_trailing_slash(tmp_path):
    task = load_task(
        write(tmp_path, "name: t\ninstruction: do\nexamples: [{input: a, output: b}]\nban: [bigbench/x/]\n")
    )
    assert task.ban == ["bigbench/x"]
