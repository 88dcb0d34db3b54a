"""The `rebase` command. Bad input prints one line and exits 2; Ctrl-C exits 130 and keeps finished work."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import NoReturn, get_args

from pydantic import BaseModel

from rebase.config import (
    STAGES,
    DatastoreConfig,
    DecontaminationConfig,
    Engine,
    EvaluateConfig,
    GenerationConfig,
    IndexKind,
    RetrieveConfig,
    ServeConfig,
    TrainConfig,
    TransformConfig,
    build_config,
    load_config,
)
from rebase.errors import RebaseError
from rebase.precision import Precision


def _concurrency(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    try:
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError("expected MIN,MAX (for example 1,4)") from None


def _option(parser: argparse.ArgumentParser, model: type[BaseModel], name: str, *flags: str, **kwargs) -> None:
    """Add the flag that sets `model`'s field `name` (default `--field-name`). Its help is the field's
    description (or `help`) and the field's default, both read from config.py, so neither can drift."""
    field = model.model_fields[name]
    text = kwargs.pop("help", None) or field.description
    # None and booleans: the description says what the default does ("default: once per epoch")
    if not field.is_required() and field.default is not None and not isinstance(field.default, bool):
        text = f"{text} (default {field.default})"
    kwargs.setdefault("dest", name)
    parser.add_argument(*(flags or (f"--{name.replace('_', '-')}",)), help=text.replace("%", "%%"), **kwargs)


def _config_flag(parser: argparse.ArgumentParser, model: type[BaseModel]) -> None:
    parser.add_argument("--config", type=Path, help=f"YAML file of {model.__name__} fields; flags override it")


def _datastore_parser(commands) -> None:
    datastore = commands.add_parser("datastore", help="build and inspect the retrieval datastore")
    datastore_commands = datastore.add_subparsers(dest="datastore_command", required=True)
    build = datastore_commands.add_parser(
        "build",
        help="ingest sources, embed their cells, index them",
        description="SPEC is bigbench[:task,...], files:PATH_OR_GLOB (parquet, jsonl, csv) or hf:DATASET_ID[:CONFIG].",
    )
    _config_flag(build, DatastoreConfig)
    _option(build, DatastoreConfig, "sources", "--source", action="append", metavar="SPEC", help="one SPEC; repeatable")
    _option(build, DatastoreConfig, "out", type=Path)
    _option(build, DatastoreConfig, "embedder")
    _option(build, DatastoreConfig, "index", choices=get_args(IndexKind))
    for name in ("rows_per_dataset", "max_value_chars", "block_rows", "embed_batch_size", "embed_threads"):
        _option(build, DatastoreConfig, name, type=int)
    _option(build, DatastoreConfig, "description")
    _option(build, DatastoreConfig, "embed_concurrency", type=_concurrency, metavar="MIN,MAX")
    _option(build, DatastoreConfig, "embed_max_tokens", type=int)
    _option(build, DatastoreConfig, "embed_dtype", choices=get_args(Precision))
    _option(build, DatastoreConfig, "shard_vectors", type=int)
    info = datastore_commands.add_parser("info", help="describe a datastore")
    info.add_argument("directory", type=Path)
    info.add_argument("--json", action="store_true", help="print the description as JSON")


def _retrieve_parser(commands) -> None:
    retrieve = commands.add_parser("retrieve", help="score every datastore row for a task; keep the top K")
    _config_flag(retrieve, RetrieveConfig)
    for name in ("datastore", "task", "out"):
        _option(retrieve, RetrieveConfig, name, type=Path)
    for name in ("top_k", "depth", "dataset_rows", "per_dataset_cap"):
        _option(retrieve, RetrieveConfig, name, type=int)
    _option(retrieve, RetrieveConfig, "exact", action="store_const", const=True)
    _option(retrieve, RetrieveConfig, "embedder")
    _option(
        retrieve,
        RetrieveConfig,
        "match_kind",
        "--no-match-kind",
        action="store_false",
        default=None,
        help="keep rows of every kind (words, numbers, code), not only those of the task's inputs",
    )
    _decontamination_options(retrieve, RetrieveConfig)


def _decontamination_options(parser: argparse.ArgumentParser, model: type[DecontaminationConfig]) -> None:
    """The flags `retrieve` and `transform` share: the comparison with the task's evaluation set."""
    _option(
        parser,
        model,
        "decontaminate",
        "--no-decontaminate",
        action="store_false",
        default=None,
        help="do not compare with the task's evaluation set",
    )
    _option(parser, model, "contamination_ngram", type=int)
    _option(parser, model, "contamination_similarity", type=float)


def _generation_options(parser: argparse.ArgumentParser, model: type[GenerationConfig]) -> None:
    """The flags `transform` and `evaluate` share: how text is generated."""
    _option(parser, model, "engine", choices=get_args(Engine))
    _option(parser, model, "base_url")
    _option(parser, model, "batch_size", type=int)
    _option(parser, model, "concurrency", type=_concurrency, metavar="MIN,MAX")
    _option(parser, model, "threads", type=int)
    _option(parser, model, "max_new_tokens", type=int)
    _option(parser, model, "dtype", choices=get_args(Precision))


def _transform_parser(commands) -> None:
    transform = commands.add_parser("transform", help="the teacher turns retrieved rows into task examples")
    _config_flag(transform, TransformConfig)
    for name in ("retrieved", "task", "out"):
        _option(transform, TransformConfig, name, type=Path)
    _option(transform, TransformConfig, "teacher")
    _option(transform, TransformConfig, "limit", type=int)
    _generation_options(transform, TransformConfig)
    _option(transform, TransformConfig, "prompts_per_call", type=int)
    _option(transform, TransformConfig, "temperature", type=float)
    _option(transform, TransformConfig, "judge", action="store_true", default=None)
    _option(
        transform,
        TransformConfig,
        "constrained",
        "--unconstrained",
        action="store_false",
        default=None,
        help="no constrained decoding",
    )
    _option(transform, TransformConfig, "embedder")
    for name in ("fit_margin", "fit_threshold", "near_duplicate_similarity", "max_label_share"):
        _option(transform, TransformConfig, name, type=float)
    _option(
        transform,
        TransformConfig,
        "consistency",
        "--no-consistency",
        action="store_false",
        default=None,
        help="skip the consistency gate (the teacher answering its own inputs again)",
    )
    _decontamination_options(transform, TransformConfig)
    for name in ("rpm", "tpm"):
        _option(transform, TransformConfig, name, type=int)
    for name in ("price_input_per_million", "price_output_per_million"):
        _option(transform, TransformConfig, name, type=float)
    transform.add_argument(
        "--dry-run",
        action="store_true",
        help="print the prompts to send, their tokens and projected cost; call no teacher, write nothing",
    )


def _train_parser(commands) -> None:
    train = commands.add_parser("train", help="Ray Train + DeepSpeed fine-tune the student on the teacher's examples")
    _config_flag(train, TrainConfig)
    for name in ("data", "task", "out"):
        _option(train, TrainConfig, name, type=Path)
    _option(train, TrainConfig, "student")
    _option(train, TrainConfig, "full", action="store_true", default=None)
    for name in ("lora_rank", "epochs", "max_steps", "batch_size", "gradient_accumulation", "max_length"):
        _option(train, TrainConfig, name, type=int)
    _option(train, TrainConfig, "learning_rate", type=float)
    _option(train, TrainConfig, "few_shot", action="store_true", default=None)
    for name in ("zero_stage", "workers", "threads", "checkpoint_every"):
        _option(train, TrainConfig, name, type=int)
    _option(train, TrainConfig, "device", choices=get_args(TrainConfig.model_fields["device"].annotation))
    _option(train, TrainConfig, "storage_path")
    _option(train, TrainConfig, "dtype", choices=get_args(Precision))


def _evaluate_parser(commands) -> None:
    evaluate = commands.add_parser("evaluate", help="score a model on held-out data, optionally beside another")
    _config_flag(evaluate, EvaluateConfig)
    _option(evaluate, EvaluateConfig, "model")
    _option(evaluate, EvaluateConfig, "task", type=Path)
    _option(evaluate, EvaluateConfig, "data")
    _option(evaluate, EvaluateConfig, "out", type=Path)
    _option(evaluate, EvaluateConfig, "compare")
    _option(evaluate, EvaluateConfig, "limit", type=int)
    _option(evaluate, EvaluateConfig, "few_shot", action="store_true", default=None)
    _generation_options(evaluate, EvaluateConfig)


def _serve_parser(commands) -> None:
    serve = commands.add_parser("serve", help="serve students as one OpenAI-compatible endpoint (Ray Serve)")
    _config_flag(serve, ServeConfig)
    _option(
        serve,
        ServeConfig,
        "model",
        action="append",
        metavar="MODEL",
        help=(ServeConfig.model_fields["model"].description + "; repeatable"),
    )
    _option(serve, ServeConfig, "base")
    _option(serve, ServeConfig, "task", type=Path)
    _option(serve, ServeConfig, "engine", choices=get_args(ServeConfig.model_fields["engine"].annotation))
    _option(serve, ServeConfig, "name")
    _option(serve, ServeConfig, "host")
    _option(serve, ServeConfig, "dtype", choices=get_args(Precision))
    for name in ("port", "min_replicas", "max_replicas", "max_batch_size", "threads"):
        _option(serve, ServeConfig, name, type=int)


class _Parser(argparse.ArgumentParser):
    """A flag argparse cannot read (`--rpm lots`, an unknown flag) is one line and exit 2, as every other bad
    input is; `--help` shows the usage. Subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="rebase", description="Retrieval Based Distillation on Ray")
    commands = parser.add_subparsers(dest="command", required=True)
    _datastore_parser(commands)
    _retrieve_parser(commands)
    _transform_parser(commands)
    _train_parser(commands)
    _evaluate_parser(commands)
    _serve_parser(commands)

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
    return parser


def _stage_config(model, args: argparse.Namespace, needs: str):
    """A stage's config from --config FILE and the flags named after its fields (flags win)."""
    overrides = {name: getattr(args, name, None) for name in model.model_fields}
    if args.config:
        return load_config(model, args.config, overrides)
    required = [name for name, info in model.model_fields.items() if info.is_required()]
    if any(overrides.get(name) is None for name in required):
        raise RebaseError(f"{args.command} needs {needs} (or --config FILE)")
    return build_config(model, {key: value for key, value in overrides.items() if value is not None})


def _datastore_build(args: argparse.Namespace) -> int:
    from rebase.datastore import build_datastore

    args.command = "datastore build"
    summary = build_datastore(_stage_config(DatastoreConfig, args, "--source SPEC and --out DIR"))
    print(summary.line())
    return 0


def _transform(args: argparse.Namespace) -> int:
    from rebase.teacher import dry_run, transform

    config = _stage_config(TransformConfig, args, "--retrieved DIR, --task TASK.yaml and --out DIR")
    if args.dry_run:
        print(dry_run(config))
        return 0
    summary = transform(config)
    print(summary.line())
    return 0


def _train(args: argparse.Namespace) -> int:
    from rebase.train import train

    summary = train(_stage_config(TrainConfig, args, "--data DIR_OR_FILE, --task TASK.yaml and --out DIR"))
    print(summary.line())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from rebase.evaluate import evaluate

    summary = evaluate(_stage_config(EvaluateConfig, args, "--model MODEL, --task TASK.yaml and --out DIR"))
    print(summary.table())
    print(summary.line())
    return 0


def _serve(args: argparse.Namespace) -> int:
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
