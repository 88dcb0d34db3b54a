"""The ceiling: what the built-in student learns from navigate examples known to be correct.

    python benchmarks/ceiling.py [--examples 256] [--eval-examples 200] [--levers lora,full,lora-few-shot,lora-4-epochs]

Separates what the student can learn from what a teacher gives it. Training data: navigate examples made
by a program, of both of BIG-bench navigate's kinds ("Always face forward. Take 3 steps left. ..." and
"Turn left. Take 3 steps. Turn around. ..."), with chain-of-thought answers in the task file's style and
correct by construction; half return to the start. None has the input of a held-out example. Each
lever trains a student with `rebase train` (default precision) and scores it with `rebase evaluate`
against every baseline on the same held-out BIG-bench navigate examples: the base in the student's
prompt, the base with navigate's few-shot examples, and the majority label. Prints per lever the
student's accuracy, the best baseline's, and the margin with its 95% paired interval.

Levers: `lora` (r=16, 2 epochs), `full` (every weight, 2 epochs), `lora-few-shot` (the task's examples
in the student's prompt, in training and evaluation), `lora-4-epochs`.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import rebase
from rebase.evaluate import read_eval_set
from rebase.task import load_task

TASK = Path(__file__).resolve().parent.parent / "jobs" / "tasks" / "navigate.yaml"
LEVERS = {
    "lora": {},
    "full": {"full": True},
    # the examples add about 250 prompt tokens; batches of 4 (x2 accumulated, the same 8 per step) keep the
    # training worker's memory in bounds (at 8 x 768 tokens it held 17.7 GB, the logits alone ~6.4 GB)
    "lora-few-shot": {"few_shot": True, "max_length": 768, "batch_size": 4, "gradient_accumulation": 2},
    "lora-4-epochs": {"epochs": 4},
}
_TURNS = {"left": 1, "right": -1, "around": 2}  # quarter turns, counter-clockwise
_HEADINGS = ["the positive y-axis", "the negative x-axis", "the negative y-axis", "the positive x-axis"]
_STEP = [(0, 1), (-1, 0), (0, -1), (1, 0)]  # per heading
_DIRECTIONS = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}


def _steps(n: int) -> str:
    return f"{n} step" if n == 1 else f"{n} steps"


def face_forward(rng: random.Random, home: bool) -> dict:
    """'Always face forward. Take 3 steps left. ...': moves along fixed axes."""
    moves = [(rng.choice(list(_DIRECTIONS)), rng.randint(1, 10)) for _ in range(rng.randint(2, 4))]
    x = sum(_DIRECTIONS[d][0] * n for d, n in moves)
    y = sum(_DIRECTIONS[d][1] * n for d, n in moves)
    if home and (x, y) != (0, 0):  # close the loop with one or two moves
        if x:
            moves.append(("left" if x > 0 else "right", abs(x)))
        if y:
            moves.append(("backward" if y > 0 else "forward", abs(y)))
    text, reasoning, (x, y) = [], [], (0, 0)
    for direction, n in moves:
        x, y = x + _DIRECTIONS[direction][0] * n, y + _DIRECTIONS[direction][1] * n
        text.append(f"Take {_steps(n)} {direction}.")
        reasoning.append(f"Take {_steps(n)} {direction}: ({x}, {y}).")
    return _example("Always face forward. " + " ".join(text), reasoning, (x, y))


def turning(rng: random.Random, home: bool) -> dict:
    """'Turn left. Take 3 steps. Turn around. ...': steps along the current heading."""
    while True:
        actions = [rng.choice(["step", "step", "turn"]) for _ in range(rng.randint(3, 6))]
        heading, x, y, text, reasoning = 0, 0, 0, [], []
        for action in actions:
            if action == "turn":
                turn = rng.choice(list(_TURNS))
                heading = (heading + _TURNS[turn]) % 4
                text.append(f"Turn {turn}.")
                reasoning.append(f"Turn {turn}: now facing {_HEADINGS[heading]}.")
            else:
                n = rng.randint(1, 10)
                x, y = x + _STEP[heading][0] * n, y + _STEP[heading][1] * n
                text.append(f"Take {_steps(n)}.")
                reasoning.append(f"Take {_steps(n)}: ({x}, {y}).")
        if not home or (x, y) == (0, 0):
            break
        if x == 0 or y == 0:  # walk back along the axis we left: turn to face home, then step
            target = _STEP.index((0 if x == 0 else -x // abs(x), 0 if y == 0 else -y // abs(y)))
            turn = {1: "left", 3: "right", 2: "around"}.get((target - heading) % 4)
            if turn:
                heading = target
                text.append(f"Turn {turn}.")
                reasoning.append(f"Turn {turn}: now facing {_HEADINGS[heading]}.")
            n = abs(x) + abs(y)
            x, y = 0, 0
            text.append(f"Take {_steps(n)}.")
            reasoning.append(f"Take {_steps(n)}: (0, 0).")
            break
    return _example(" ".join(text), reasoning, (x, y))


def _example(text: str, reasoning: list[str], end: tuple[int, int]) -> dict:
    home = end == (0, 0)
    closing = (
        f"Since {end} is (0, 0), we are back where we started. So the answer is Yes."
        if home
        else f"Since {end} is not (0, 0), we are not where we started. So the answer is No."
    )
    return {"input": text, "output": f"We start at (0, 0), facing the positive y-axis. {' '.join(reasoning)} {closing}"}


def training_set(count: int, held_out: set[str]) -> list[dict]:
    """`count` examples, half of each kind and half returning home, none with a held-out input."""
    rng, made, seen = random.Random(0), [], set(held_out)
    while len(made) < count:
        make = face_forward if len(made) % 2 == 0 else turning
        example = make(rng, home=(len(made) // 2) % 2 == 0)
        if example["input"] not in seen:
            seen.add(example["input"])
            made.append(example)
    return made


def run_lever(name: str, data: Path, scratch: Path, eval_examples: int, base_answers: Path | None) -> dict:
    student, evaluation = scratch / f"student-{name}", scratch / f"evaluate-{name}"
    settings = {"epochs": 2, "batch_size": 8, "max_length": 384} | LEVERS[name]
    started = time.monotonic()
    summary = rebase.train(data, TASK, student, **settings)
    trained = time.monotonic() - started
    if base_answers is not None:  # the base's answers to the same prompts, from the first lever: reuse
        for identity in base_answers.iterdir():
            if not identity.name.startswith("student-"):
                shutil.copytree(identity, evaluation / "answers" / identity.name)
    scored = rebase.evaluate(student, TASK, evaluation, compare="base", limit=eval_examples, max_new_tokens=160)
    stats = json.loads((evaluation / "stats.json").read_text())
    result = {
        "lever": name,
        "settings": settings,
        "loss": [summary.first_loss, summary.final_loss],
        "train_seconds": round(trained, 1),
        "scores": {stats["roles"][m]: s["accuracy"] for m, s in stats["models"].items()},
        "intervals": {stats["roles"][m]: i["accuracy"] for m, i in stats["intervals"].items()},
        "margin": stats["margin"],
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(result), flush=True)
    print(scored.table(), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--levers", default="lora,full,lora-few-shot,lora-4-epochs")
    args = parser.parse_args()
    levers = [lever.strip() for lever in args.levers.split(",") if lever.strip()]
    unknown = [lever for lever in levers if lever not in LEVERS]
    if unknown:
        parser.error(f"unknown lever {unknown[0]!r}; levers are {', '.join(LEVERS)}")
    task = load_task(TASK)
    held_out = {example["input"] for example in read_eval_set(task.eval, task)}
    examples = training_set(args.examples, held_out)
    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "examples.jsonl"
        data.write_text("".join(json.dumps(example) + "\n" for example in examples))
        results, base_answers = [], None
        for lever in levers:
            results.append(run_lever(lever, data, Path(scratch), args.eval_examples, base_answers))
            base_answers = base_answers or Path(scratch) / f"evaluate-{lever}" / "answers"
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
