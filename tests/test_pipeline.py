"""`rebase run` and `rebase status`: the pipeline file, the run directory's rules, skipping, --from and --only.

The whole smoke pipeline (every stage with real models) runs as a Ray job in test_jobs.py; here the
datastore and retrieval stages run for real on a small store, in seconds."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import run_rebase as rebase
from smoke_pipeline import write_smoke_pipeline

from rebase.config import PipelineConfig, build_config
from rebase.errors import RebaseError
from rebase.pipeline import load_pipeline, run_pipeline, run_status


def pipeline_values(**sections) -> dict:
    return {"name": "p", "task": "jobs/tasks/navigate.yaml", "datastore": {"sources": ["bigbench"]}, **sections}


@pytest.mark.parametrize(
    "sections, message",
    [
        ({"train": {"out": "elsewhere"}}, "train.out is set by the pipeline"),
        ({"transform": {"retrieved": "x"}}, "transform.retrieved is set by the pipeline"),
        ({"train": {"epochz": 2}}, "train.epochz: Extra inputs are not permitted"),
        ({"transform": {"limit": 0}}, "transform.limit: Input should be greater than or equal to 1"),
        ({"evaluate": {"engine": "openai"}}, "evaluate: engine openai needs base_url"),
        ({"datastore": {"path": "x", "sources": ["bigbench"]}}, "give either path"),
        ({"name": "no spaces please"}, "name"),
        ({"serve": {"port": 0}}, "serve.port: Input should be greater than or equal to 1"),
    ],
)
def test_bad_pipeline_files_name_the_stage_and_field(sections, message):
    with pytest.raises(RebaseError, match=message):
        build_config(PipelineConfig, pipeline_values(**sections), "p.yaml")


def test_stages_are_wired_through_the_run_directory():
    config = build_config(PipelineConfig, pipeline_values(evaluate=None, serve={"port": 8123}))
    assert config.stages() == ["datastore", "retrieve", "transform", "train", "serve"]
    run = Path("/runs/p")
    assert config.stage_config("datastore", run).out == run / "datastore" / "store"
    assert config.stage_config("retrieve", run).datastore == run / "datastore" / "store"
    assert config.stage_config("transform", run).retrieved == run / "retrieve"
    assert config.stage_config("train", run).data == run / "transform"
    assert config.stage_config("serve", run).model == [str(run / "train")]
    assert config.stage_config("serve", run).port == 8123


def test_the_cli_reports_bad_input_in_one_line(tmp_path):
    missing = rebase("run", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [f"rebase: error: config file not found: {tmp_path / 'none.yaml'}"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(pipeline_values(train={"zero_stage": 5})))
    result = rebase("run", str(bad))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "train.zero_stage" in result.stderr
    not_a_run = rebase("status", str(tmp_path))
    assert not_a_run.returncode == 2
    assert not_a_run.stderr.strip() == f"rebase: error: {tmp_path} is not a rebase run (no run.json)"


def test_a_foreign_or_other_run_directory_is_refused(tmp_path):
    config = load_pipeline(write_smoke_pipeline(tmp_path / "in"))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RebaseError, match="is not empty and is no rebase run"):
        run_pipeline(config, foreign)
    assert (foreign / "notes.txt").read_text() == "mine" and sorted(p.name for p in foreign.iterdir()) == ["notes.txt"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"name": "another", "stages": {}}))
    with pytest.raises(RebaseError, match="holds run 'another', not 'smoke'"):
        run_pipeline(config, other)
    with pytest.raises(RebaseError, match="--only train: stage datastore has not finished"):
        run_pipeline(config, tmp_path / "fresh", only="train")


def test_contradictory_from_and_only_are_refused_before_anything_is_touched(tmp_path):
    """Seen in a probe: `--from transform --only retrieve` deleted transform/ and its answer cache, ran
    nothing and exited 0. Now refused first; a run directory holding a finished stage stays as it was."""
    pipeline = write_smoke_pipeline(tmp_path / "in")
    run_dir = tmp_path / "run"
    (run_dir / "transform" / "answers").mkdir(parents=True)
    (run_dir / "transform" / "answers" / "part-1.parquet").write_bytes(b"the teacher's answers")
    (run_dir / "transform" / "_SUCCESS").write_text("")
    (run_dir / "run.json").write_text(json.dumps({"name": "smoke", "stages": {"transform": {"state": "done"}}}))
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = rebase("run", str(pipeline), "--run-dir", str(run_dir), "--from", "transform", "--only", "retrieve")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rebase: error: --from transform and --only retrieve name different stages: --from redoes a stage and "
        "every later one, --only runs one stage; give one of them, or the same stage to both"
    ]
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


def test_stages_run_skip_and_redo_on_real_ray(tmp_path, capsys):
    pipeline = write_smoke_pipeline(tmp_path / "in")
    config = load_pipeline(pipeline)
    run_dir = tmp_path / "run"
    first = run_pipeline(config, run_dir, only="datastore")
    assert first.ran == ["datastore"]
    first = run_pipeline(config, run_dir, only="retrieve")
    assert (first.ran, first.skipped) == (["retrieve"], [])
    stats = json.loads((run_dir / "retrieve" / "stats.json").read_text())
    assert stats["rows"] == 12 and stats["mode"] == "exact"
    state = json.loads((run_dir / "run.json").read_text())
    assert [state["stages"][s]["state"] for s in ("datastore", "retrieve")] == ["done", "done"]
    assert state["stages"]["retrieve"]["seconds"] > 0
    assert (run_dir / "report.html").exists() and (run_dir / "pipeline.yaml").exists()

    # A re-run skips finished stages; a report lost (a Ctrl-C while it was written) is made again.
    (run_dir / "report.html").unlink()
    again = run_pipeline(config, run_dir, only="retrieve")
    assert (again.ran, again.skipped) == ([], ["retrieve"])
    assert "[retrieve] finished earlier" in capsys.readouterr().out
    assert (run_dir / "report.html").is_file()
    os.utime(run_dir / "report.md", (1, 1))  # older than the stages: stale, so rebuilt
    run_pipeline(config, run_dir, only="retrieve")
    assert (run_dir / "report.md").stat().st_mtime > 1

    # A copied run directory keeps its finished stages (seen in a probe: every stage was refused, since the
    # settings hashes held absolute paths, and the suggested --from threw the work away).
    moved = tmp_path / "elsewhere" / "run"
    shutil.copytree(run_dir, moved)
    copied = run_pipeline(config, moved, only="retrieve")
    assert (copied.ran, copied.skipped) == ([], ["retrieve"])
    assert json.loads((moved / "run.json").read_text())["stages"]["retrieve"]["state"] == "done"

    # Changed settings of a finished stage are refused until --from redoes it (and only what follows).
    changed = yaml.safe_load(pipeline.read_text())
    changed["retrieve"]["top_k"] = 5
    pipeline.write_text(yaml.safe_dump(changed))
    with pytest.raises(RebaseError, match="stage retrieve finished with other settings .* --from retrieve"):
        run_pipeline(load_pipeline(pipeline), run_dir, only="retrieve")
    store_built = (run_dir / "datastore" / "_SUCCESS").stat().st_mtime
    redone = run_pipeline(load_pipeline(pipeline), run_dir, from_stage="retrieve", only="retrieve")
    assert redone.ran == ["retrieve"]
    assert json.loads((run_dir / "retrieve" / "stats.json").read_text())["rows"] == 5
    assert (run_dir / "datastore" / "_SUCCESS").stat().st_mtime == store_built

    rows = {row["stage"]: row for row in run_status(run_dir)}
    assert rows["datastore"]["state"] == "done" and "2 datasets, 32 rows, 64 cells" in rows["datastore"]["figures"]
    assert rows["retrieve"]["state"] == "done" and rows["retrieve"]["figures"] == "5 rows (exact)"
    assert [rows[s]["state"] for s in ("transform", "train", "evaluate")] == ["not started"] * 3
    printed = rebase("status", str(run_dir))
    assert printed.returncode == 0 and printed.stdout.splitlines()[1].startswith("retrieve   done")


def test_a_bad_task_file_or_datastore_path_fails_before_any_stage(tmp_path):
    pipeline = write_smoke_pipeline(tmp_path / "in")
    values = yaml.safe_load(pipeline.read_text())
    values["task"] = str(tmp_path / "missing.yaml")
    pipeline.write_text(yaml.safe_dump(values))
    result = rebase("run", str(pipeline), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "missing.yaml" in result.stderr and not (tmp_path / "run").exists()
    values = yaml.safe_load(write_smoke_pipeline(tmp_path / "in").read_text())
    values["datastore"] = {"path": str(tmp_path / "nowhere")}
    with pytest.raises(RebaseError, match="nowhere is not a datastore"):
        run_pipeline(build_config(PipelineConfig, values), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_redo_keeps_later_outputs_until_they_run_and_the_teachers_answers_after(tmp_path, capsys):
    """--from marks stages to redo without deleting them; when one starts again it is emptied but for its
    answer caches, so a transform redone with another gate setting sends the teacher nothing."""
    pipeline = write_smoke_pipeline(tmp_path / "in")
    run_dir = tmp_path / "run"
    for stage in ("datastore", "retrieve", "transform"):
        run_pipeline(load_pipeline(pipeline), run_dir, only=stage)
    answers = {p.name: p.stat().st_mtime_ns for p in (run_dir / "transform" / "answers").glob("*.parquet")}
    assert answers and (run_dir / "transform" / "records.parquet").exists()

    run_pipeline(load_pipeline(pipeline), run_dir, from_stage="retrieve", only="retrieve")
    # transform is to be redone, but nothing of it is gone until it runs again
    assert (run_dir / "transform" / "records.parquet").exists() and not (run_dir / "transform" / "_SUCCESS").exists()
    assert {row["stage"]: row["state"] for row in run_status(run_dir)}["transform"] == "to redo"

    changed = yaml.safe_load(pipeline.read_text())
    changed["transform"]["max_label_share"] = 0.9  # a gate setting: the prompts, and so the answers, are the same
    pipeline.write_text(yaml.safe_dump(changed))
    capsys.readouterr()
    redone = run_pipeline(load_pipeline(pipeline), run_dir, only="transform")
    assert redone.ran == ["transform"]
    assert "0 sent, 4 answered before" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (run_dir / "transform" / "answers").glob("*.parquet")} == answers
    stats = json.loads((run_dir / "transform" / "stats.json").read_text())
    assert stats["settings"]["max_label_share"] == 0.9
