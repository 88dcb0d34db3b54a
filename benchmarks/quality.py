"""Quality per task: the whole pipeline with the built-in models, the student against every baseline.

    python benchmarks/quality.py --datastore DIR [--tasks navigate,sports_understanding,date_understanding]
                                 [--rows 64] [--eval-examples 200] [--out DIR]

For each task file in jobs/tasks (those named), `rebase run` with the built-in teacher and student on an
existing datastore (DIR, e.g. the demo's `out/runs/navigate-demo/datastore/store`): retrieve the top 1,000
rows (exact; the task's own dataset is banned), transform the best `--rows` with every data gate on,
fine-tune the student on the `ok` records as the demo does, and score it on `--eval-examples` held-out
examples of the task's own BIG-bench data beside the base in the student's prompt, the base with the
task's few-shot examples and the majority label. When the gates leave nothing to train on, the task's
line says so and the base with its few-shot examples is scored alone, beside the majority label.
Prints per task the gate counts, every score with its 95% interval, the student's margin over the best
baseline and the time; runs resume from `--out` (default a folder under ~/.cache/rebase/quality).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
TASKS = REPO / "jobs" / "tasks"


def pipeline(task: str, datastore: Path, rows: int, eval_examples: int) -> dict:
    return {
        "name": f"quality-{task}",
        "task": str(TASKS / f"{task}.yaml"),
        "datastore": {"path": str(datastore)},
        "retrieve": {"top_k": 1000, "exact": True},
        "transform": {"limit": rows, "max_new_tokens": 320, "prompts_per_call": rows},
        "train": {"epochs": 2, "batch_size": 4, "learning_rate": 1.0e-3},
        "evaluate": {"compare": "base", "limit": eval_examples, "max_new_tokens": 160, "prompts_per_call": 50},
    }


def run_task(task: str, args: argparse.Namespace) -> dict:
    started = time.monotonic()
    root = args.out / task
    root.mkdir(parents=True, exist_ok=True)
    path = root / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline(task, args.datastore.resolve(), args.rows, args.eval_examples)))
    command = [sys.executable, "-m", "rebase", "run", str(path), "--run-dir", str(root / "run")]
    result = subprocess.run(command, capture_output=True, text=True)
    run_dir = root / "run"
    transform = json.loads((run_dir / "transform" / "stats.json").read_text())
    outcome = {"task": task, "statuses": transform["statuses"], "gates": transform["gates"]}
    if result.returncode != 0:
        error = (result.stderr.strip().splitlines() or ["?"])[-1]
        if "no ok records" not in error:
            raise SystemExit(f"{task}: rebase run failed: {error}")
        outcome["student"] = None
        outcome["note"] = error
        evaluation = root / "base-few-shot"  # scored as "model": the base with the task's examples
        subprocess.run(
            [sys.executable, "-m", "rebase", "evaluate", "--model", "builtin:gemma3-270m", "--task",
             str(TASKS / f"{task}.yaml"), "--out", str(evaluation), "--few-shot", "--limit", str(args.eval_examples),
             "--max-new-tokens", "160"],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
    else:
        evaluation = run_dir / "evaluate"
    stats = json.loads((evaluation / "stats.json").read_text())
    metric = next(iter(next(iter(stats["models"].values())).keys() - {"exact_match"}), "exact_match")
    outcome |= {
        "examples": stats["examples"],
        "metric": metric,
        "scores": {f"{stats['roles'][m]}: {m}": s[metric] for m, s in stats["models"].items()},
        "intervals": {f"{stats['roles'][m]}: {m}": i[metric] for m, i in stats["intervals"].items()},
        "margin": stats["margin"] if outcome.get("student", True) is not None else None,  # no student, no margin
        "seconds": round(time.monotonic() - started, 1),
    }
    print(json.dumps(outcome), flush=True)
    return outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datastore", type=Path, required=True)
    parser.add_argument("--tasks", default="navigate,sports_understanding,date_understanding")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--eval-examples", type=int, default=200)
    cache = Path(os.environ.get("REBASE_CACHE", Path.home() / ".cache" / "rebase"))
    parser.add_argument("--out", type=Path, default=cache / "quality")
    args = parser.parse_args()
    results = [run_task(task.strip(), args) for task in args.tasks.split(",") if task.strip()]
    for outcome in results:
        print(f"\n{outcome['task']}: {outcome['examples']} examples, {outcome['metric']}, {outcome['seconds']:.0f} s")
        print(f"  records {outcome['statuses']}; gates {outcome['gates']}")
        for name, value in outcome["scores"].items():
            low, high = outcome["intervals"][name]
            print(f"  {name:<55} {value:.3f} [{low:.3f}, {high:.3f}]")
        if outcome.get("margin"):
            margin = outcome["margin"]
            print(f"  margin over {margin['over']} ({margin['role']}): {margin['value']:+.3f} "
                  f"[{margin['low']:+.3f}, {margin['high']:+.3f}]")  # fmt: skip
        if outcome.get("note"):
            print(f"  no student: {outcome['note']}")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
