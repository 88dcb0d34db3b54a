"""Wall time per stage of a pipeline run, and the share of it spent outside model compute.

    python benchmarks/pipeline.py --fresh                 # run jobs/configs/demo.yaml as on a fresh machine
    python benchmarks/pipeline.py --run-dir out/runs/navigate-demo    # only read a finished run

`--fresh` runs `rebase run jobs/configs/demo.yaml` with an empty cache (`REBASE_CACHE`: BIG-bench is
downloaded and the built-in Gemma converted again) and an empty output root, timed from the command's
start to its exit. Model compute per stage, from what the stages record:
- datastore: the embedding step (`build_seconds.embed`; it includes the embedding actors' start-up);
- transform, evaluate: the engine's time inside each generation call (the `seconds` of every cached answer);
- train: training tokens over training tokens per second (forward, backward and optimizer steps only).
Everything else (Ray start-up, model loads, reading and writing data, checkpoints, export, the report) is
"outside". Prints a table and the outside share of the whole run's wall time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def answer_seconds(directory: Path) -> float:
    """The engine's seconds over every answer cached under `directory` (each call's time split over its answers)."""
    files = sorted(directory.rglob("part-*.parquet")) if directory.exists() else []
    return sum(sum(pq.read_table(f, columns=["seconds"]).column("seconds").to_pylist()) for f in files)


def model_seconds(run_dir: Path, stage: str) -> float | None:
    stats_path = run_dir / stage / "stats.json"
    if not stats_path.exists():
        return None
    stats = json.loads(stats_path.read_text())
    if stage == "datastore":
        return stats.get("build_seconds", {}).get("embed", 0.0)
    if stage in ("transform", "evaluate"):
        return answer_seconds(run_dir / stage / "answers")
    if stage == "train":
        summary = stats["summary"]
        return summary["train_tokens"] / summary["tokens_per_second"] if summary["tokens_per_second"] else 0.0
    return None


def report(run_dir: Path, wall: float | None) -> None:
    state = json.loads((run_dir / "run.json").read_text())
    print(f"{'stage':<10} {'wall s':>8} {'model s':>8} {'outside s':>10} {'outside':>8}")
    total_wall = total_model = 0.0
    for stage, entry in state["stages"].items():
        seconds = entry.get("seconds") or 0.0
        compute = model_seconds(run_dir, stage)
        total_wall += seconds
        if compute is None:
            print(f"{stage:<10} {seconds:>8.1f} {'-':>8}")
            continue
        total_model += compute
        share = (seconds - compute) / seconds if seconds else 0.0
        print(f"{stage:<10} {seconds:>8.1f} {compute:>8.1f} {seconds - compute:>10.1f} {share:>8.0%}")
    wall = wall or total_wall
    print(f"{'stages':<10} {total_wall:>8.1f} {total_model:>8.1f} {total_wall - total_model:>10.1f}")
    if wall > total_wall:
        print(f"command wall {wall:.1f} s (start-up and exit outside the stages: {wall - total_wall:.1f} s)")
    print(f"outside model compute: {(wall - total_model) / wall:.0%} of {wall / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="a finished run to read")
    parser.add_argument("--fresh", action="store_true", help="run the demo with an empty cache and output root")
    parser.add_argument("--config", type=Path, default=REPO / "jobs" / "configs" / "demo.yaml")
    args = parser.parse_args()
    if args.fresh == bool(args.run_dir):
        parser.error("give --fresh or --run-dir")
    wall = None
    run_dir = args.run_dir
    if args.fresh:
        root = Path(tempfile.mkdtemp(prefix="rebase-demo-"))
        env = {**os.environ, "REBASE_CACHE": str(root / "cache")}
        started = time.monotonic()
        command = [sys.executable, "-m", "rebase", "run", str(args.config), "--root", str(root)]
        subprocess.run(command, cwd=REPO, env=env, check=True)
        wall = time.monotonic() - started
        run_dir = next((root / "out" / "runs").iterdir())
    report(run_dir, wall)


if __name__ == "__main__":
    main()
