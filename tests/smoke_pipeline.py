"""A smoke pipeline: every stage on real Ray with the built-in models, on a few generated rows, in minutes.

The datastore is two small jsonl datasets (parity questions close to the task, planet questions far from
it); the task asks whether a number is even; training and evaluation are cut to a few steps and examples."""

from __future__ import annotations

from pathlib import Path

import yaml
from conftest import write_jsonl

# The machinery under test here is the pipeline's; the data gates have their own tests (tests/test_gates.py),
# and on four rows from the 270M teacher they could leave the student nothing to train on.
GATES_OFF = {"consistency": False, "max_label_share": 1.0, "fit_threshold": -1.0, "near_duplicate_similarity": 1.0}
TASK = {
    "name": "parity",
    "instruction": "Given a number, say whether it is even. Answer Yes or No.",
    "examples": [
        {"input": "Is 14 even?", "output": "Yes"},
        {"input": "Is 7 even?", "output": "No"},
        {"input": "Is 30 even?", "output": "Yes"},
    ],
    "labels": ["Yes", "No"],
    "ban": ["files/held_out"],
}


def write_smoke_pipeline(root: Path, name: str = "smoke", student: str | None = None, **sections) -> Path:
    """Data, task file and pipeline file under `root`; `student` replaces the built-in student (a machinery
    test passes the tiny random-weight model); `sections` replace whole pipeline sections."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_jsonl(
        data / "numbers.jsonl",
        [{"question": f"Is {n} an even number?", "answer": "yes" if n % 2 == 0 else "no"} for n in range(40, 64)],
    )
    (data / "numbers.jsonl.description.txt").write_text("Questions about whether whole numbers are even or odd.")
    write_jsonl(
        data / "planets.jsonl",
        [{"question": f"Which planet is number {i} from the sun?", "answer": f"planet {i}"} for i in range(1, 9)],
    )
    (data / "planets.jsonl.description.txt").write_text("Questions about the planets of the solar system.")
    held_out = root / "held_out"
    held_out.mkdir(exist_ok=True)
    write_jsonl(
        held_out / "held_out.jsonl",
        [{"input": f"Is {n} even?", "output": "Yes" if n % 2 == 0 else "No"} for n in range(100, 106)],
    )
    task = root / "parity.yaml"
    task.write_text(yaml.safe_dump(TASK, sort_keys=False))
    pipeline = {
        "name": name,
        "task": str(task),
        "datastore": {"sources": [f"files:{data}"], "embed_concurrency": [1, 1], "embed_threads": 1},
        "retrieve": {"top_k": 12, "exact": True},
        "transform": {"limit": 4, "max_new_tokens": 48, "batch_size": 4, "prompts_per_call": 2, "concurrency": [1, 1]}
        | GATES_OFF,
        "train": {"epochs": 1, "batch_size": 2, "max_length": 96, "learning_rate": 1e-3}
        | ({"student": student} if student else {}),
        "evaluate": {
            "data": f"files:{held_out}",
            "limit": 4,
            "max_new_tokens": 8,
            "compare": "base",
            "concurrency": [1, 1],
        },
        **sections,
    }
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return path
