"""`rebase train` vs a plain single-process PyTorch/transformers loop, same model, same data, same run.

    python benchmarks/train.py [--examples 48] [--epochs 2] [--batch-size 8] [--skip-two-workers] [--skip-auto]
                               [--skip-baseline] [--accuracy N]

Data: generated navigate-style examples with chain-of-thought answers (about 130 tokens each in the
student's prompt format), the same list for every run. Model: the built-in Gemma 3 270M with LoRA r=16 on
every linear layer, AdamW, fp32 on CPU. Measured:
- stage: `rebase.train.train` on real Ray, 1 worker, DeepSpeed ZeRO-0, `dtype: float32`: training tokens
  (non-padding tokens of every batch) per second of step time, and wall time (Ray start, worker start,
  model load, checkpoints and export included);
- stage, default precision: the same with `dtype: auto` (bfloat16 autocast on a CPU with native bf16),
  beside float32 in the same run, with both loss curves;
- baseline: the same model and LoRA built in this process, batches in the same order, HF's own loss
  (`model(**batch, labels=...)`), `loss.backward()`, `optimizer.step()`: tokens per second of step time;
- two workers: the stage with 2 workers (1 CPU thread each) and ZeRO-2;
- with `--accuracy N`: the students trained at float32 and at `dtype: auto`, each scored by `rebase
  evaluate` (at the default precision, so that only the training precision differs) on the same first N
  held-out BIG-bench navigate examples: accuracy with its 95% Wilson interval, and the share of identical
  predictions.
Prints each figure and the ratios stage/baseline, auto/float32 and two-workers/baseline.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import rebase
from rebase import precision
from rebase.config import TrainConfig
from rebase.models import resolve_model
from rebase.task import load_task
from rebase.train import LoraSettings, build_student, collate, encode_training_set, train

TASK = Path(__file__).resolve().parent.parent / "jobs" / "tasks" / "navigate.yaml"


def examples(count: int) -> list[dict]:
    """Navigate-style examples: a few moves, the position after each, and the answer."""
    rng = random.Random(0)
    made = []
    for _ in range(count):
        x = y = 0
        moves, steps = [], []
        for _ in range(rng.randint(3, 5)):
            n = rng.randint(1, 9)
            direction = rng.choice(["forward", "backward", "left", "right"])
            dx, dy = {"forward": (0, n), "backward": (0, -n), "left": (-n, 0), "right": (n, 0)}[direction]
            x, y = x + dx, y + dy
            moves.append(f"Take {n} steps {direction}.")
            steps.append(f"Take {n} steps {direction}: ({x}, {y}).")
        answer = "Yes" if (x, y) == (0, 0) else "No"
        reasoning = (
            f"We start at (0, 0), facing the positive y-axis. {' '.join(steps)} Since ({x}, {y}) "
            f"{'is' if answer == 'Yes' else 'is not'} (0, 0), we are {'' if answer == 'Yes' else 'not '}where we "
            f"started. So the answer is {answer}."
        )
        made.append({"input": "Always face forward. " + " ".join(moves), "output": reasoning})
    return made


def baseline(rows: list[dict], config: TrainConfig, threads: int) -> dict:
    """A plain loop: no Ray, no DeepSpeed, HF's loss over the full logits; the stage's model, LoRA and rate."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    path = resolve_model(config.student)
    model = build_student(path, LoraSettings.of(config))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.effective_learning_rate)
    pad = AutoTokenizer.from_pretrained(path).pad_token_id
    order = list(rows)
    random.Random(0).shuffle(order)  # as the stage does
    tokens, seconds, losses = 0, 0.0, []
    for _ in range(config.epochs):
        for start in range(0, len(order), config.batch_size):
            chunk = order[start : start + config.batch_size]
            batch = collate(
                {
                    "input_ids": np.array([r["input_ids"] for r in chunk], dtype=object),
                    "labels": np.array([r["labels"] for r in chunk], dtype=object),
                },
                pad,
            )
            began = time.monotonic()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            seconds += time.monotonic() - began
            tokens += int(batch["attention_mask"].sum())
            losses.append(round(loss.item(), 4))
    return {
        "tokens": tokens,
        "seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 1),
        "first_loss": losses[0],
        "final_loss": losses[-1],
    }


def stage(config: TrainConfig, out: Path, workers: int, zero: int, threads: int | None, dtype: str) -> dict:
    update = {"out": out, "workers": workers, "zero_stage": zero, "threads": threads, "dtype": dtype}
    config = config.model_copy(update=update)
    started = time.monotonic()
    summary = train(config)
    return {
        "tokens": summary.train_tokens,
        "tokens_per_second": round(summary.tokens_per_second, 1),
        "wall_seconds": round(time.monotonic() - started, 1),
        "steps": summary.steps,
        "first_loss": summary.first_loss,
        "final_loss": summary.final_loss,
        "losses": [round(loss, 3) for _, loss in summary.losses],
    }


def accuracy(students: dict[str, Path], scratch: Path, examples: int) -> dict:
    """Each student's accuracy on the same held-out examples, and how often the two predict the same text."""
    import pyarrow.parquet as pq

    from rebase.intervals import wilson

    runs, predictions = {}, {}
    for name, student in students.items():
        out = scratch / f"evaluate-{name}"
        rebase.evaluate(student, TASK, out, limit=examples, max_new_tokens=160, prompts_per_call=examples)
        rows = pq.read_table(out / "predictions.parquet").to_pylist()
        predictions[name] = [row["prediction"] for row in rows]
        correct = sum(bool(row["correct"]) for row in rows)
        runs[name] = {
            "examples": len(rows),
            "accuracy": round(correct / len(rows), 3),
            "accuracy_95": wilson(correct, len(rows)),
        }
        print(f"student trained at {name}:", json.dumps(runs[name]), flush=True)
    first, second = predictions.values()
    runs["identical_predictions_share"] = round(sum(a == b for a, b in zip(first, second)) / len(first), 3)
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=48)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--skip-two-workers", action="store_true")
    parser.add_argument("--skip-auto", action="store_true", help="no run at the default precision (dtype auto)")
    parser.add_argument("--skip-baseline", action="store_true", help="no plain loop (no stage/baseline ratio)")
    parser.add_argument(
        "--accuracy",
        type=int,
        default=0,
        metavar="N",
        help="score the float32 and auto students on N navigate examples",
    )
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    pairs = examples(args.examples)
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as scratch:
        data = Path(scratch) / "examples.jsonl"
        data.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
        config = TrainConfig(data=data, task=TASK, out=scratch, epochs=args.epochs, batch_size=args.batch_size)
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(config.student))
        rows = encode_training_set(load_task(TASK), pairs, tokenizer, config.max_length).rows
        mean_tokens = round(sum(len(r["input_ids"]) for r in rows) / len(rows))
        results: dict = {"examples": len(rows), "mean_tokens": mean_tokens}
        # The baseline runs in a child process so that its model's memory is returned before the stage's
        # workers load theirs (glibc keeps a freed model's pages in this process otherwise).
        if not args.skip_baseline:
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
                results["baseline"] = child.submit(baseline, rows, config, threads).result()
            print("baseline", results["baseline"], flush=True)
        results["stage_1_worker_zero0"] = stage(config, Path(scratch) / "one", 1, 0, None, "float32")
        print("stage, 1 worker, ZeRO-0, float32", results["stage_1_worker_zero0"], flush=True)
        if not args.skip_auto:
            results["stage_auto"] = stage(config, Path(scratch) / "auto", 1, 0, None, "auto")
            results["stage_auto"]["precision"] = precision.resolve("auto", "cpu")
            print("stage, 1 worker, ZeRO-0, dtype auto", results["stage_auto"], flush=True)
        if not args.skip_two_workers:
            results["stage_2_workers_zero2"] = stage(config, Path(scratch) / "two", 2, 2, 1, "float32")
            print("stage, 2 workers, ZeRO-2", results["stage_2_workers_zero2"], flush=True)
        if args.accuracy and not args.skip_auto:
            students = {"float32": Path(scratch) / "one", "auto": Path(scratch) / "auto"}
            results["student_accuracy"] = accuracy(students, Path(scratch), args.accuracy)
    base = results.get("baseline", {}).get("tokens_per_second")
    if base:
        results["ratio_stage_vs_baseline"] = round(results["stage_1_worker_zero0"]["tokens_per_second"] / base, 2)
    auto = results.get("stage_auto")
    if auto:
        fp32 = results["stage_1_worker_zero0"]["tokens_per_second"]
        results["ratio_auto_vs_float32"] = round(auto["tokens_per_second"] / fp32, 2)
    two = results.get("stage_2_workers_zero2")
    if two and base:
        results["ratio_two_workers_vs_baseline"] = round(two["tokens_per_second"] / base, 2)
    print(json.dumps(results, indent=2))
    if base:
        print(
            f"rebase train (1 worker, ZeRO-0) vs plain loop: {results['ratio_stage_vs_baseline']}x training "
            "tokens/s (target at least 0.8x)"
        )
    if auto:
        print(f"rebase train, dtype auto ({auto['precision']}) vs float32: {results['ratio_auto_vs_float32']}x")


if __name__ == "__main__":
    main()
