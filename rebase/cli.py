"""The `rebase` command. Bad input prints one line and exits 2; Ctrl-C exits 130 and keeps finished work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from rebase.errors import RebaseError


def _concurrency(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError("expected MIN,MAX (for example 1,4)") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rebase", description="Retrieval Based Distillation on Ray")
    commands = parser.add_subparsers(dest="command", required=True)

    datastore = commands.add_parser("datastore", help="build and inspect the retrieval datastore")
    datastore_commands = datastore.add_subparsers(dest="datastore_command", required=True)
    build = datastore_commands.add_parser(
        "build",
        help="ingest sources, embed their cells, index them",
        description="SPEC is bigbench[:task,...], files:PATH_OR_GLOB (parquet, jsonl, csv) or hf:DATASET_ID[:CONFIG].",
    )
    build.add_argument("--config", type=Path, help="YAML file of DatastoreConfig fields; flags override it")
    build.add_argument("--source", dest="sources", action="append", metavar="SPEC", help="repeatable")
    build.add_argument("--out", type=Path, help="datastore directory (created, or extended if it exists)")
    build.add_argument("--embedder", help="builtin:minilm (default), a local directory or an HF id")
    build.add_argument("--index", choices=["auto", "flat", "ivf", "hnsw"])
    build.add_argument("--rows-per-dataset", type=int, dest="rows_per_dataset")
    build.add_argument("--max-value-chars", type=int, dest="max_value_chars")
    build.add_argument("--description", help="description for files: sources that have no sidecar")
    build.add_argument("--block-rows", type=int, dest="block_rows")
    build.add_argument("--embed-batch-size", type=int, dest="embed_batch_size")
    build.add_argument("--embed-concurrency", type=_concurrency, dest="embed_concurrency", metavar="MIN,MAX")
    build.add_argument("--embed-threads", type=int, dest="embed_threads")
    build.add_argument("--embed-max-tokens", type=int, dest="embed_max_tokens")
    build.add_argument("--shard-vectors", type=int, dest="shard_vectors")

    retrieve = commands.add_parser("retrieve", help="score every datastore row for a task; keep the top K")
    retrieve.add_argument("--config", type=Path, help="YAML file of RetrieveConfig fields; flags override it")
    retrieve.add_argument("--datastore", type=Path)
    retrieve.add_argument("--task", type=Path, help="task YAML file")
    retrieve.add_argument("--out", type=Path, help="retrieved directory to write")
    retrieve.add_argument("--top-k", type=int, dest="top_k", help="rows to keep (default 3000)")
    retrieve.add_argument("--exact", action="store_const", const=True, help="score every row (default: ANN candidates)")
    retrieve.add_argument("--depth", type=int, help="nearest values per query vector and shard (default 4000)")
    retrieve.add_argument(
        "--dataset-rows",
        type=int,
        dest="dataset_rows",
        help="rows of the datasets whose descriptions are closest to the instruction, also re-scored "
        "(default 2 x top-k)",
    )
    retrieve.add_argument("--per-dataset-cap", type=int, dest="per_dataset_cap", help="most rows from one dataset")
    retrieve.add_argument("--embedder", help="must match the datastore's embedder")

    transform = commands.add_parser("transform", help="the teacher turns retrieved rows into task examples")
    transform.add_argument("--config", type=Path, help="YAML file of TransformConfig fields; flags override it")
    transform.add_argument("--retrieved", type=Path, help="retrieved directory (from rebase retrieve)")
    transform.add_argument("--task", type=Path, help="task YAML file")
    transform.add_argument("--out", type=Path, help="transformed directory (created, or resumed)")
    transform.add_argument(
        "--teacher", help="builtin:gemma3-270m (default), a model directory, an HF id, or a served name"
    )
    transform.add_argument("--engine", choices=["transformers", "vllm", "openai"])
    transform.add_argument("--limit", type=int, help="only the best-ranked N rows (a cheap trial)")
    transform.add_argument("--base-url", dest="base_url", help="engine openai: the endpoint's /v1 URL")
    transform.add_argument("--batch-size", type=int, dest="batch_size", help="prompts decoded together")
    transform.add_argument("--prompts-per-call", type=int, dest="prompts_per_call", help="the unit written to disk")
    transform.add_argument("--concurrency", type=_concurrency, metavar="MIN,MAX", help="teacher actors")
    transform.add_argument("--threads", type=int, help="torch threads per CPU actor")
    transform.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")
    transform.add_argument("--temperature", type=float)
    transform.add_argument("--judge", action="store_true", default=None, help="second pass: yes/no fit check")
    transform.add_argument(
        "--unconstrained", dest="constrained", action="store_false", default=None, help="no constrained decoding"
    )

    train = commands.add_parser("train", help="Ray Train + DeepSpeed fine-tune the student on the teacher's examples")
    train.add_argument("--config", type=Path, help="YAML file of TrainConfig fields; flags override it")
    train.add_argument("--data", type=Path, help="transformed directory, or a jsonl/parquet/csv of input,output")
    train.add_argument("--task", type=Path, help="task YAML file")
    train.add_argument("--out", type=Path, help="student directory (created, or resumed)")
    train.add_argument("--student", help="builtin:gemma3-270m (default), a model directory or an HF id")
    train.add_argument("--full", action="store_true", default=None, help="fine-tune every weight, not LoRA")
    train.add_argument("--lora-rank", type=int, dest="lora_rank")
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int, dest="max_steps", help="stop after N optimizer steps")
    train.add_argument("--learning-rate", type=float, dest="learning_rate")
    train.add_argument("--batch-size", type=int, dest="batch_size", help="examples per worker per step")
    train.add_argument("--gradient-accumulation", type=int, dest="gradient_accumulation")
    train.add_argument("--max-length", type=int, dest="max_length", help="tokens per example")
    train.add_argument("--few-shot", action="store_true", default=None, dest="few_shot")
    train.add_argument("--zero-stage", type=int, dest="zero_stage", help="DeepSpeed ZeRO stage 0-3")
    train.add_argument("--workers", type=int, help="Ray Train workers")
    train.add_argument("--device", choices=["auto", "cpu", "gpu"])
    train.add_argument("--threads", type=int, help="torch threads per CPU worker")
    train.add_argument("--storage-path", dest="storage_path", help="checkpoints: a directory or a cloud URI")
    train.add_argument("--checkpoint-every", type=int, dest="checkpoint_every", help="steps (default: per epoch)")

    evaluate = commands.add_parser("evaluate", help="score a model on held-out data, optionally beside another")
    evaluate.add_argument("--config", type=Path, help="YAML file of EvaluateConfig fields; flags override it")
    evaluate.add_argument("--model", help="student directory, built-in, HF id, or served name (engine openai)")
    evaluate.add_argument("--task", type=Path, help="task YAML file")
    evaluate.add_argument("--data", help="held-out data SPEC (default: the task file's eval)")
    evaluate.add_argument("--out", type=Path, help="evaluation directory (created, or resumed)")
    evaluate.add_argument("--compare", help="a second model; 'base' is the student's base model")
    evaluate.add_argument("--limit", type=int, help="a fixed sample of N examples")
    evaluate.add_argument("--few-shot", action="store_true", default=None, dest="few_shot")
    evaluate.add_argument("--engine", choices=["transformers", "vllm", "openai"])
    evaluate.add_argument("--base-url", dest="base_url", help="engine openai: the endpoint's /v1 URL")
    evaluate.add_argument("--batch-size", type=int, dest="batch_size", help="prompts decoded together")
    evaluate.add_argument("--concurrency", type=_concurrency, metavar="MIN,MAX", help="generation actors")
    evaluate.add_argument("--threads", type=int, help="torch threads per CPU actor")
    evaluate.add_argument("--max-new-tokens", type=int, dest="max_new_tokens")

    serve = commands.add_parser("serve", help="serve a model as an OpenAI-compatible endpoint (Ray Serve)")
    serve.add_argument("--config", type=Path, help="YAML file of ServeConfig fields; flags override it")
    serve.add_argument("--model", help="student directory, built-in or HF id")
    serve.add_argument("--task", type=Path, help="task file: adds /tasks/NAME/v1/... routes taking raw inputs")
    serve.add_argument("--engine", choices=["transformers", "vllm"], help="vllm: Ray Serve LLM on GPU nodes")
    serve.add_argument("--name", help="the model name clients send (default: the directory's name)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--min-replicas", type=int, dest="min_replicas")
    serve.add_argument("--max-replicas", type=int, dest="max_replicas")
    serve.add_argument("--max-batch-size", type=int, dest="max_batch_size", help="requests decoded together")
    serve.add_argument("--threads", type=int, help="torch threads per CPU replica")

    from rebase.config import STAGES

    run = commands.add_parser("run", help="every stage of a pipeline file in one run directory; re-run resumes")
    run.add_argument("pipeline", type=Path, help="pipeline YAML file (jobs/configs/demo.yaml)")
    run.add_argument(
        "--run-dir", type=Path, dest="run_dir", help="run directory (default: the file's, else out/runs/NAME)"
    )
    run.add_argument("--from", dest="from_stage", choices=STAGES, help="redo this stage and every later one")
    run.add_argument("--only", choices=STAGES, help="run this one stage (the ones before it must be finished)")
    run.add_argument(
        "--root", type=Path, help="directory relative output paths are under (default: here; a Ray job's submit dir)"
    )

    status = commands.add_parser("status", help="each stage of a run: state, time, headline figures")
    status.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    status.add_argument("--json", action="store_true", help="print the states as JSON")

    info = datastore_commands.add_parser("info", help="describe a datastore")
    info.add_argument("directory", type=Path)
    info.add_argument("--json", action="store_true", help="print the description as JSON")
    return parser


def _stage_config(model, args: argparse.Namespace, needs: str):
    """A stage's config from --config FILE and the flags named after its fields (flags win)."""
    from rebase.config import build_config, load_config

    overrides = {name: getattr(args, name, None) for name in model.model_fields}
    if args.config:
        return load_config(model, args.config, overrides)
    required = [name for name, info in model.model_fields.items() if info.is_required()]
    if any(overrides.get(name) is None for name in required):
        raise RebaseError(f"{args.command} needs {needs} (or --config FILE)")
    return build_config(model, {key: value for key, value in overrides.items() if value is not None})


def _datastore_build(args: argparse.Namespace) -> int:
    from rebase.config import DatastoreConfig
    from rebase.datastore import build_datastore

    args.command = "datastore build"
    summary = build_datastore(_stage_config(DatastoreConfig, args, "--source SPEC and --out DIR"))
    print(summary.line())
    return 0


def _transform(args: argparse.Namespace) -> int:
    from rebase.config import TransformConfig
    from rebase.teacher import transform

    summary = transform(_stage_config(TransformConfig, args, "--retrieved DIR, --task TASK.yaml and --out DIR"))
    print(summary.line())
    return 0


def _train(args: argparse.Namespace) -> int:
    from rebase.config import TrainConfig
    from rebase.train import train

    summary = train(_stage_config(TrainConfig, args, "--data DIR_OR_FILE, --task TASK.yaml and --out DIR"))
    print(summary.line())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rebase.config import EvaluateConfig
    from rebase.evaluate import evaluate

    summary = evaluate(_stage_config(EvaluateConfig, args, "--model MODEL, --task TASK.yaml and --out DIR"))
    print(summary.table())
    print(summary.line())
    return 0


def _serve(args: argparse.Namespace) -> int:
    from rebase.config import ServeConfig
    from rebase.serve import serve_student

    serve_student(_stage_config(ServeConfig, args, "--model MODEL"))
    return 0


def _run(args: argparse.Namespace) -> int:
    from rebase.pipeline import load_pipeline, run_pipeline

    summary = run_pipeline(load_pipeline(args.pipeline), args.run_dir, args.from_stage, args.only, args.root)
    print(summary.line())
    return 0


def _status(args: argparse.Namespace) -> int:
    from rebase.pipeline import run_status

    rows = run_status(args.run_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        seconds = f"{row['seconds']:.0f} s" if row["seconds"] is not None else "-"
        detail = row["figures"] or (row["error"] or "")
        print(f"{row['stage']:<10} {row['state']:<12} {seconds:>7}  {detail}")
    return 0


def _datastore_info(args: argparse.Namespace) -> int:
    from rebase.datastore import datastore_info

    info = datastore_info(args.directory)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    counts = info["counts"]
    embedder = info["embedder"]
    print(f"datastore   {info['path']}  (created {info['created']}, updated {info['updated']})")
    print(f"embedder    {embedder['name']}  dim={embedder['dimension']}  normalized={embedder['normalized']}")
    settings = "  ".join(f"{key}={value}" for key, value in info["settings"].items())
    print(f"settings    {settings}  index={info['index']}")
    print(
        f"contents    {counts['datasets']:,} datasets, {counts['rows']:,} rows, {counts['cells']:,} cells, "
        f"{counts['distinct_values']:,} distinct values, {counts['skipped_rows']:,} malformed rows skipped"
    )
    print(f"index       {counts['shards']} shard(s), {counts['vectors']:,} vectors")
    print(f"disk        {info['bytes_on_disk'] / 1e6:,.1f} MB")
    print("sources")
    for source in info["sources"]:
        kinds = ",".join(sorted({s["kind"] for s in source["shards"]})) or "-"
        print(
            f"  {source['spec']:<40} {source['state']:<9} {source['datasets']:>6,} datasets {source['rows']:>9,} rows "
            f"{source['cells']:>10,} cells  shards: {len(source['shards'])} ({kinds})"
        )
    if info["largest_datasets"]:
        print("largest datasets")
        for dataset_id, rows in info["largest_datasets"]:
            print(f"  {dataset_id:<60} {rows:>7,} rows")
    return 0


def _retrieve(args: argparse.Namespace) -> int:
    from rebase.config import RetrieveConfig
    from rebase.retrieve import retrieve_stage

    print(retrieve_stage(_stage_config(RetrieveConfig, args, "--datastore DIR, --task TASK.yaml and --out DIR")).line())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {
        ("datastore", "build"): _datastore_build,
        ("datastore", "info"): _datastore_info,
        ("retrieve", None): _retrieve,
        ("transform", None): _transform,
        ("train", None): _train,
        ("evaluate", None): _evaluate,
        ("serve", None): _serve,
        ("run", None): _run,
        ("status", None): _status,
    }
    try:
        return handlers[(args.command, getattr(args, "datastore_command", None))](args)
    except RebaseError as error:
        print(f"rebase: error: {error}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`rebase datastore info DIR | head`): stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        if args.command == "serve":
            print("rebase: stopped serving", file=sys.stderr)
            return 0
        print("rebase: interrupted; finished work is kept, run the same command again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
