"""rebase: Retrieval Based Distillation (ReBase, Ge et al. 2024) as a Ray application.

The Python API: one call per stage, mirroring the command line. Each call takes the stage's config fields
(rebase/config.py) as keyword arguments, optionally on top of a YAML file (`config=`, as `--config`), and
returns the stage's summary. A bad field raises RebaseError naming it. Importing `rebase` starts neither
Ray nor torch: each call imports its stage when it runs.

    import rebase

    rebase.build_datastore(["files:data/*.jsonl"], "out/store")
    summary = rebase.retrieve("out/store", "jobs/tasks/navigate.yaml", "out/retrieved", top_k=500)
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rebase.config import (
    Config,
    DatastoreConfig,
    EvaluateConfig,
    PipelineConfig,
    RetrieveConfig,
    ServeConfig,
    TrainConfig,
    TransformConfig,
    build_config,
    load_config,
)
from rebase.errors import RebaseError

if TYPE_CHECKING:
    from rebase.datastore import BuildSummary
    from rebase.evaluate import EvaluateSummary
    from rebase.pipeline import RunSummary
    from rebase.retrieve import RetrieveSummary
    from rebase.teacher import TransformSummary
    from rebase.train import TrainSummary

__version__ = "0.1.0"
__all__ = [
    "RebaseError",
    "build_datastore",
    "evaluate",
    "retrieve",
    "run",
    "serve",
    "train",
    "transform",
]

PathLike = str | Path


def _stage_config(
    model: type[Config], call: str, config: PathLike | None, given: dict[str, Any], fields: dict[str, Any]
) -> Config:
    """The stage's config from the YAML file `config` (if any) and the keyword arguments (which win), as the
    CLI builds it from --config and flags; `given` holds the positional fields, None where left out. Each call
    validates before importing its stage, so a bad field fails at once."""
    values = {**{name: value for name, value in given.items() if value is not None}, **fields}
    if config is not None:
        return load_config(model, Path(config), values)
    return build_config(model, values, origin=f"rebase.{call}()")


def build_datastore(
    sources: str | Sequence[str] | None = None,
    out: PathLike | None = None,
    *,
    config: PathLike | None = None,
    **fields: Any,
) -> BuildSummary:
    """`rebase datastore build`: ingest the sources (SPECs, one or a list), embed their cells, index them
    into the datastore at `out`; other DatastoreConfig fields (embedder=, index=, ...) as keywords."""
    sources = [sources] if isinstance(sources, str) else sources
    stage_config = _stage_config(DatastoreConfig, "build_datastore", config, {"sources": sources, "out": out}, fields)
    from rebase.datastore import build_datastore as build

    return build(stage_config)


def retrieve(
    datastore: PathLike | None = None,
    task: PathLike | None = None,
    out: PathLike | None = None,
    *,
    config: PathLike | None = None,
    **fields: Any,
) -> RetrieveSummary:
    """`rebase retrieve`: the datastore's top K rows for the task file, written to `out`; other
    RetrieveConfig fields (top_k=, exact=, ...) as keywords."""
    given = {"datastore": datastore, "task": task, "out": out}
    stage_config = _stage_config(RetrieveConfig, "retrieve", config, given, fields)
    from rebase.retrieve import retrieve_stage

    return retrieve_stage(stage_config)


def transform(
    retrieved: PathLike | None = None,
    task: PathLike | None = None,
    out: PathLike | None = None,
    *,
    config: PathLike | None = None,
    **fields: Any,
) -> TransformSummary:
    """`rebase transform`: the teacher turns the retrieved rows into task examples in `out`; other
    TransformConfig fields (teacher=, engine=, limit=, ...) as keywords."""
    given = {"retrieved": retrieved, "task": task, "out": out}
    stage_config = _stage_config(TransformConfig, "transform", config, given, fields)
    from rebase.teacher import transform as transform_stage

    return transform_stage(stage_config)


def train(
    data: PathLike | None = None,
    task: PathLike | None = None,
    out: PathLike | None = None,
    *,
    config: PathLike | None = None,
    **fields: Any,
) -> TrainSummary:
    """`rebase train`: fine-tune the student on the transformed examples (or a data file) into `out`;
    other TrainConfig fields (student=, epochs=, full=, ...) as keywords."""
    given = {"data": data, "task": task, "out": out}
    stage_config = _stage_config(TrainConfig, "train", config, given, fields)
    from rebase.train import train as train_stage

    return train_stage(stage_config)


def evaluate(
    model: PathLike | None = None,
    task: PathLike | None = None,
    out: PathLike | None = None,
    *,
    config: PathLike | None = None,
    **fields: Any,
) -> EvaluateSummary:
    """`rebase evaluate`: score the model on the task's held-out data into `out`; other EvaluateConfig
    fields (data=, compare=, limit=, ...) as keywords."""
    given = {"model": None if model is None else str(model), "task": task, "out": out}
    stage_config = _stage_config(EvaluateConfig, "evaluate", config, given, fields)
    from rebase.evaluate import evaluate as evaluate_stage

    return evaluate_stage(stage_config)


def serve(
    model: PathLike | list[PathLike] | None = None,
    *,
    config: PathLike | None = None,
    ready: Callable[[str], None] | None = None,
    **fields: Any,
) -> None:
    """`rebase serve`: serve the model (or a list of students, sharing one endpoint) as an OpenAI-compatible
    endpoint and block until Ctrl-C; `ready(url)` is called once it answers. Other ServeConfig fields (host=,
    port=, task=, base=, ...) as keywords."""
    # one path or a list of them: ServeConfig reads either
    stage_config = _stage_config(ServeConfig, "serve", config, {"model": model}, fields)
    from rebase.serve import serve_student

    serve_student(stage_config, ready=ready)


def run(
    config: PathLike | None = None,
    *,
    from_stage: str | None = None,
    only: str | None = None,
    root: PathLike | None = None,
    **fields: Any,
) -> RunSummary:
    """`rebase run`: every stage of the pipeline file `config` (or of PipelineConfig fields given as
    keywords, which also override the file's: run_dir=, ...) in one run directory, skipping finished ones.
    `from_stage` and `only` are `--from` and `--only`; relative outputs go under `root` (default: here)."""
    pipeline = _stage_config(PipelineConfig, "run", config, {}, fields)
    from rebase.pipeline import run_pipeline

    return run_pipeline(pipeline, from_stage=from_stage, only=only, root=None if root is None else Path(root))


class _Package(types.ModuleType):
    """This package's module type. Importing a stage module binds it on its package under its own name
    (`import rebase.train` sets `rebase.train`), which would replace the API call of that name; so the
    calls keep their names, and the stage modules are reached by import (`from rebase.train import ...`)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in __all__ and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
