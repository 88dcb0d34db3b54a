"""`rebase run PIPELINE.yaml`: every stage of one task in one run directory, skipping finished stages.

The run directory holds `pipeline.yaml` (the settings as run), `run.json` (each stage's state, settings
hash and timings), one subdirectory per stage (`datastore/`, `retrieve/`, `transform/`, `train/`,
`evaluate/`, `serve/`), each with `_SUCCESS` and `stats.json` once finished, and the report
(`report.html`, `report.md`, `report/`). A stage resumes from what it already wrote (answers cached by
transform and evaluate, Ray Train checkpoints, datastore blocks), so a killed run re-run with the same
command goes on where it stopped; `--from STAGE` throws that stage and every later one away and redoes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import yaml

from rebase.config import STAGES, PipelineConfig, load_config
from rebase.errors import RebaseError
from rebase.io import read_json_object, write_json_atomic
from rebase.stage import LOCK, STATS, SUCCESS, StageDir, is_finished

_OWN_FILES = frozenset({"pipeline.yaml", "run.json", "report.html", "report.md", "report", *STAGES})
REDO = "to redo"  # a stage's state after --from: its outputs stay until it starts again
# What a redone stage keeps: the teacher's and the evaluated models' answers (keyed by prompt, model and
# settings, so still valid); everything else in its directory is made again.
_CACHES = {"transform": frozenset({"answers", "judged", "consistency"}), "evaluate": frozenset({"answers"})}


@dataclass
class RunSummary:
    name: str
    run_dir: Path
    ran: list[str]
    skipped: list[str]
    seconds: float
    evaluation: str  # the evaluate stage's scores by role and the margin over the best baseline, if it ran

    def line(self) -> str:
        return (
            f"run {self.name}: {len(self.ran)} stage(s) run, {len(self.skipped)} already done, "
            f"{self.seconds:.0f} s"
            + (f"; {self.evaluation}" if self.evaluation else "")
            + f"; report {self.run_dir / 'report.html'}"
        )


def load_pipeline(path: Path) -> PipelineConfig:
    """Read a pipeline file; its relative paths are relative to the current directory, as on the CLI."""
    from rebase.config import load_config

    return load_config(PipelineConfig, path)


def anchor_outputs(config: PipelineConfig, root: Path | None) -> PipelineConfig:
    """The config with its output paths (run_dir, the datastore's out) made absolute under `root` (default:
    the current directory). A Ray job runs in an uploaded copy of the working directory, so its outputs go
    under the `--root` it is given instead, where they outlive the job."""
    base = (root or Path.cwd()).expanduser().resolve()
    run_dir = base / (config.run_dir or config.default_run_dir).expanduser()
    datastore = dict(config.datastore)
    for key in ("out", "path"):
        if key in datastore:
            datastore[key] = str(base / Path(datastore[key]).expanduser())
    return config.model_copy(update={"run_dir": run_dir, "datastore": datastore})


def run_pipeline(
    config: PipelineConfig,
    run_dir: Path | None = None,
    from_stage: str | None = None,
    only: str | None = None,
    root: Path | None = None,
) -> RunSummary:
    """Run the pipeline's stages in order in the run directory; finished stages with the same settings
    are skipped, an unfinished one resumes. `from_stage` redoes that stage and all after it; `only` runs
    one stage (its predecessors must be finished). Relative output paths are under `root` (default: here)."""
    started = time.monotonic()
    if run_dir is not None:
        config = config.model_copy(update={"run_dir": run_dir})
    config = anchor_outputs(config, root)
    run_dir = config.run_dir
    stages = config.stages()
    for name, value in (("--from", from_stage), ("--only", only)):
        if value is not None and value not in stages:
            raise RebaseError(f"{name} {value}: this pipeline's stages are {', '.join(stages)}")
    if from_stage is not None and only is not None and from_stage != only:
        raise RebaseError(
            f"--from {from_stage} and --only {only} name different stages: --from redoes a stage and every later "
            "one, --only runs one stage; give one of them, or the same stage to both"
        )
    from rebase.task import load_task

    load_task(config.task)  # a bad task file fails now, not after the datastore is built
    if "path" in config.datastore and not (Path(config.datastore["path"]) / "manifest.json").exists():
        raise RebaseError(f"datastore path {config.datastore['path']} is not a datastore (no manifest.json)")
    _run_state(run_dir, config)  # refuses a foreign directory or another run before the lock is taken
    with StageDir(run_dir, "a rebase run", _OWN_FILES, flag="--run-dir").writing():
        state = _open_run_dir(run_dir, config)
        return _run_stages(config, state, stages, from_stage, only, started)


def _run_stages(
    config: PipelineConfig, state: dict, stages: list[str], from_stage: str | None, only: str | None, started: float
) -> RunSummary:
    """The stages in order, in the locked run directory (see `run_pipeline`)."""
    run_dir = config.run_dir
    if from_stage is not None:
        _forget(run_dir, state, stages[stages.index(from_stage) :])
    ran, skipped = [], []
    for stage in stages:
        if only is not None and stage != only:
            if stages.index(stage) < stages.index(only) and not _finished(run_dir, stage):
                raise RebaseError(f"--only {only}: stage {stage} has not finished; run it first")
            continue
        stage_config = config.stage_config(stage, run_dir)
        settings = _settings_hash(stage_config, run_dir)
        entry = state["stages"].get(stage, {})
        if stage != "serve" and _finished(run_dir, stage):
            if entry.get("settings") not in (None, settings, _settings_hash(stage_config)):  # or as hashed before
                raise RebaseError(
                    f"stage {stage} finished with other settings than {config.name}'s now; "
                    f"run with --from {stage} to redo it and the stages after it"
                )
            print(f"[{stage}] finished earlier ({entry.get('seconds', 0):.0f} s); skipped", flush=True)
            skipped.append(stage)
            continue
        if entry.get("state") == REDO:
            _clear(run_dir / stage, _CACHES.get(stage, frozenset()) | {LOCK})
        print(f"[{stage}] {'resuming' if (run_dir / stage).exists() else 'starting'}", flush=True)
        _mark(run_dir, state, stage, state="running", settings=settings, pid=os.getpid(), started=_now(), finished=None)
        stage_started = time.monotonic()
        try:
            _run_stage(stage, stage_config, run_dir, existing_store="path" in config.datastore)
        except KeyboardInterrupt:
            if stage != "serve":
                _mark(run_dir, state, stage, state="interrupted", finished=_now())
                _write_report(run_dir)
                raise
            print("rebase: stopped serving", file=sys.stderr, flush=True)  # Ctrl-C is how serving ends
        except BaseException as error:
            _mark(run_dir, state, stage, state="failed", error=str(error)[:500], finished=_now())
            _write_report(run_dir)
            raise
        seconds = round(time.monotonic() - stage_started, 1)
        finished = "stopped" if stage == "serve" else "done"
        _mark(run_dir, state, stage, state=finished, seconds=seconds, finished=_now(), error=None)
        print(f"[{stage}] {finished} after {seconds:.0f} s", flush=True)
        ran.append(stage)
        _write_report(run_dir)
    if _report_stale(run_dir):  # a Ctrl-C while it was written, or a report deleted: made again
        _write_report(run_dir)
    return RunSummary(config.name, run_dir, ran, skipped, time.monotonic() - started, _evaluation(run_dir))


def _open_run_dir(run_dir: Path, config: PipelineConfig) -> dict:
    """The run's state, with the pipeline as run written beside it (see `_run_state`)."""
    state = _run_state(run_dir, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "pipeline.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    write_json_atomic(run_dir / "run.json", state)
    return state


def _run_state(run_dir: Path, config: PipelineConfig) -> dict:
    """The run's state, read only; a directory holding another run or foreign files is refused, never
    overwritten."""
    run_json = run_dir / "run.json"
    if run_json.exists():
        state = _read_state(run_json)
        if state.get("name") != config.name:
            raise RebaseError(
                f"{run_dir} holds run {state.get('name')!r}, not {config.name!r}; choose another --run-dir"
            )
    elif run_dir.exists() and any(path.name != LOCK for path in run_dir.iterdir()):
        raise RebaseError(f"{run_dir} is not empty and is no rebase run; choose another --run-dir")
    else:
        state = {"name": config.name, "task": str(config.task), "stages": {}}
    StageDir(run_dir, "a rebase run", _OWN_FILES, flag="--run-dir").refuse_foreign()
    return state


def _read_state(run_json: Path) -> dict:
    """A run's run.json; one clear error when it is damaged."""
    state = read_json_object(run_json)
    if not isinstance(state.get("stages"), dict):
        raise RebaseError(f"{run_json} is damaged (no stages); restore it, or start the run in a new --run-dir")
    return state


def _forget(run_dir: Path, state: dict, stages: list[str]) -> None:
    """Mark the named stages to be redone: no longer finished, their outputs kept until each one starts
    again (then `_clear` empties it but for its answer caches). A shared datastore is never touched."""
    for stage in stages:
        if stage in state["stages"] or (run_dir / stage).exists():  # a stage never started stays "not started"
            (run_dir / stage / SUCCESS).unlink(missing_ok=True)
            state["stages"][stage] = {"state": REDO}
    write_json_atomic(run_dir / "run.json", state)


def _clear(stage_dir: Path, keep: frozenset[str]) -> None:
    """Empty a stage directory that is about to be redone, but for the caches named in `keep`: answers are
    keyed by their prompt, model and settings, so the redone stage reuses those that still apply."""
    if not stage_dir.is_dir():
        return
    for path in stage_dir.iterdir():
        if path.name in keep:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


def _finished(run_dir: Path, stage: str) -> bool:
    return is_finished(run_dir / stage)


def _mark(run_dir: Path, run: dict, stage: str, **fields) -> None:
    run["stages"].setdefault(stage, {}).update(fields)
    write_json_atomic(run_dir / "run.json", run)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# Settings added after run directories existed, with their defaults: hashed only when set to something else,
# so stages finished before they existed stay finished.
_ADDED_LATER = {"dtype": "auto", "embed_dtype": "auto"}


def _settings_hash(stage_config, run_dir: Path | None = None) -> str:
    """A stage's settings as a short hash. Paths inside `run_dir` enter relative to it, so a run directory
    moved or copied elsewhere keeps its finished stages (without `run_dir`: the absolute form runs made
    before this hashed, still accepted)."""
    values = stage_config.model_dump(mode="json")
    values = {key: value for key, value in values.items() if _ADDED_LATER.get(key, object()) != value}
    if run_dir is not None:
        values = {key: _relative(value, run_dir) for key, value in values.items()}
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _relative(value, run_dir: Path):
    """A path inside the run directory as `RUN/...`; anything else as it is."""
    if isinstance(value, str) and os.path.isabs(value):
        try:
            return "RUN/" + Path(value).relative_to(run_dir).as_posix()
        except ValueError:
            return value
    return value


def _run_stage(stage: str, stage_config, run_dir: Path, existing_store: bool) -> None:
    """Call the stage's own function (the same one its `rebase` command calls) and print its summary."""
    if stage == "datastore":
        _datastore_stage(stage_config, run_dir / "datastore", build=not existing_store)
    elif stage == "retrieve":
        from rebase.retrieve import retrieve_stage

        print(retrieve_stage(stage_config).line())
    elif stage == "transform":
        from rebase.teacher import transform

        print(transform(stage_config).line())
    elif stage == "train":
        from rebase.train import train

        print(train(stage_config).line())
    elif stage == "evaluate":
        from rebase.evaluate import evaluate

        summary = evaluate(stage_config)
        print(summary.table())
        print(summary.line())
    else:
        _serve_stage(stage_config, run_dir / "serve")


def _datastore_stage(config, stage_dir: Path, build: bool) -> None:
    """Build (or only check, for `path:`) the datastore; the stage directory records where it is."""
    from rebase.datastore import build_datastore, datastore_info

    built = {}
    if build:
        summary = build_datastore(config)
        print(summary.line())
        built = {
            "embedded": summary.embedded,
            "build_seconds": {k: round(v, 1) for k, v in summary.stage_seconds.items()},
        }
    info = datastore_info(config.out)
    stats = {"path": str(config.out), "embedder": info["embedder"]["name"], **info["counts"], **built}
    stage = StageDir(stage_dir, "a datastore stage", frozenset({STATS, SUCCESS}))
    stage.begin("")
    stage.finish(stats)


def _serve_stage(config, stage_dir: Path) -> None:
    """Serve the student until Ctrl-C; the stage directory records the endpoint while it is up."""
    from rebase.serve import serve_student

    stage_dir.mkdir(parents=True, exist_ok=True)

    def ready(url: str) -> None:
        write_json_atomic(stage_dir / "stats.json", {"url": url, "models": config.model, "since": _now()})

    serve_student(config, ready)


def _write_report(run_dir: Path) -> None:
    from rebase.report import write_report

    write_report(run_dir)


def _report_stale(run_dir: Path) -> bool:
    """Whether report.html or report.md is missing or older than a stage that finished."""
    reports = [run_dir / "report.html", run_dir / "report.md"]
    if not all(report.is_file() for report in reports):
        return True
    finished = [(run_dir / stage / SUCCESS).stat().st_mtime for stage in STAGES if _finished(run_dir, stage)]
    return max(finished, default=0.0) > min(report.stat().st_mtime for report in reports)


def _evaluation(run_dir: Path) -> str:
    """'accuracy student 0.425, base 0.025, ...; margin +0.05 accuracy over majority (95% ...)' from the
    evaluate stage, or "" if it has not run."""
    from rebase.evaluate import Margin

    stats_path = run_dir / "evaluate" / "stats.json"
    if not stats_path.exists():
        return ""
    stats = read_json_object(stats_path)
    metric = "accuracy" if any("accuracy" in scores for scores in stats["models"].values()) else "f1"
    scores = ", ".join(
        f"{stats['roles'].get(name, name)} {values[metric]:.3f}"
        for name, values in stats["models"].items()
        if metric in values
    )
    margin = stats.get("margin")
    return f"{metric} {scores}" + (f"; margin {Margin(**margin).text()}" if margin else "")


def run_status(run_dir: Path) -> list[dict]:
    """Each stage's state, seconds and headline figures, read from the run directory alone."""
    run_json = run_dir / "run.json"
    if not run_json.exists():
        raise RebaseError(f"{run_dir} is not a rebase run (no run.json)")
    state = _read_state(run_json)
    planned_path = run_dir / "pipeline.yaml"
    config = load_config(PipelineConfig, planned_path) if planned_path.exists() else None
    stages = config.stages() if config else list(state["stages"])
    rows = []
    for stage in stages:
        entry = state["stages"].get(stage, {})
        status = entry.get("state", "not started")
        if status == "running" and not _alive(entry.get("pid")):
            status = "interrupted"
        if stage != "serve" and _finished(run_dir, stage):
            status = "done"
        rows.append(
            {
                "stage": stage,
                "state": status,
                "seconds": entry.get("seconds"),
                "figures": _figures(run_dir, stage),
                "error": entry.get("error"),
            }
        )
    return rows


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _figures(run_dir: Path, stage: str) -> str:
    """One line of the figures a person checks first for a stage."""
    stats_path = run_dir / stage / "stats.json"
    if not stats_path.exists():
        return ""
    stats = read_json_object(stats_path)
    if stage == "datastore":
        return f"{stats['datasets']:,} datasets, {stats['rows']:,} rows, {stats['cells']:,} cells ({stats['path']})"
    if stage == "retrieve":
        return f"{stats['rows']:,} rows ({stats['mode']})"
    if stage == "transform":
        statuses = stats.get("statuses", {})
        others = ", ".join(f"{name} {count}" for name, count in sorted(statuses.items()) if name != "ok")
        return f"{statuses.get('ok', 0)} ok of {stats['rows']} rows" + (f" ({others})" if others else "")
    if stage == "train":
        summary = stats["summary"]
        loss = f"loss {summary['first_loss']:.3f} -> {summary['final_loss']:.3f}"
        return f"{summary['examples']} examples, {summary['steps']} steps, {loss}"
    if stage == "evaluate":
        return f"{_evaluation(run_dir)} on {stats['examples']} examples"
    return f"serving at {stats['url']}" if "url" in stats else ""
