"""The stage-directory protocol: never write over somebody else's files, refuse other inputs, resume."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import run_rebase
from test_transform import NAVIGATE_ROWS, write_retrieved

from rebase.errors import RebaseError
from rebase.stage import LOCK, StageDir, is_finished, read_stats

NAVIGATE = str(Path(__file__).parents[1] / "jobs" / "tasks" / "navigate.yaml")

OWN = frozenset({"records.parquet", "stats.json", "_SUCCESS"})


def test_a_missing_empty_or_own_directory_is_accepted(tmp_path):
    assert StageDir(tmp_path / "missing", "a rebase transform", OWN).check("f1") is None
    assert StageDir(tmp_path, "a rebase transform", OWN).check("f1") is None
    (tmp_path / "records.parquet").write_text("")
    (tmp_path / ".stats.json.x1y2.tmp").write_text("")  # left by a write that was killed
    assert StageDir(tmp_path, "a rebase transform", OWN).check("f1") is None


def test_a_file_or_foreign_files_are_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RebaseError, match=f"^--out {tmp_path} holds files that are not a rebase transform; choose"):
        StageDir(tmp_path, "a rebase transform", OWN).check("f1")
    with pytest.raises(RebaseError, match="^--run-dir .*notes.txt is a file; choose a directory$"):
        StageDir(tmp_path / "notes.txt", "a rebase run", OWN, flag="--run-dir").refuse_foreign()
    with pytest.raises(RebaseError, match="is not empty and is not a rebase student; choose another$"):
        StageDir(tmp_path, "a rebase student", None, fingerprint_file="run.json").check("f1")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_finish_marks_done_and_a_rerun_with_other_inputs_is_refused(tmp_path):
    stage = StageDir(tmp_path / "out", "a rebase transform", OWN)
    assert stage.check("f1") is None
    stage.begin("f1")
    assert not is_finished(stage.path)
    stage.finish({"fingerprint": "f1", "rows": 3})
    assert is_finished(stage.path) and read_stats(stage.path) == {"fingerprint": "f1", "rows": 3}
    assert stage.check("f1") == {"fingerprint": "f1", "rows": 3}
    with pytest.raises(RebaseError, match="holds a rebase transform made from other inputs or settings"):
        stage.check("f2")
    stage.begin("f1")  # a re-run unmarks the directory until it finishes again
    assert not is_finished(stage.path) and stage.check("f1") is None


def test_a_separate_fingerprint_file_is_written_first(tmp_path):
    stage = StageDir(tmp_path / "student", "a rebase student", None, fingerprint_file="run.json")
    stage.begin("f1", student="gemma")
    (stage.path / "model.safetensors").write_text("")  # files the stage cannot list in advance
    assert json.loads((stage.path / "run.json").read_text()) == {"fingerprint": "f1", "student": "gemma"}
    assert stage.check("f1") is None  # begun, not finished: resume
    with pytest.raises(RebaseError, match="made from other inputs"):
        stage.check("f2")
    stage.finish({"fingerprint": "f1"})
    assert stage.check("f1") == {"fingerprint": "f1"}
    assert read_stats(tmp_path / "nowhere") == {}


HOLDER = """
import sys, time
from pathlib import Path
from rebase.stage import StageDir
with StageDir(Path(sys.argv[1]), "a test", None).writing():
    print("held", flush=True)
    time.sleep(120)
"""


def _hold(directory):
    """Another process holding the lock of `directory` until it is killed."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(directory)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_second_writer_is_refused_naming_the_holder_and_a_dead_holders_lock_is_taken_over(tmp_path):
    """Seen in a probe: two identical `rebase transform` on one --out, or two `rebase run` of one pipeline,
    both did all the work. Now the second is refused in one line naming the first."""
    out = tmp_path / "transformed"
    retrieved = write_retrieved(tmp_path / "retrieved", NAVIGATE_ROWS)
    holder = _hold(out)
    try:
        result = run_rebase("transform", "--retrieved", str(retrieved), "--task", NAVIGATE, "--out", str(out))
        assert result.returncode == 2, result.stderr[-2000:]
        assert result.stderr.strip().splitlines() == [
            f"rebase: error: --out {out} is being written by process {holder.pid} on {socket.gethostname()} "
            f"(since {(out / LOCK).read_text().split('(since ')[1]}; wait for it to end, or stop it"
        ]
        pipeline = tmp_path / "pipeline.yaml"
        pipeline.write_text(yaml.safe_dump({"name": "p", "task": NAVIGATE, "datastore": {"sources": ["bigbench"]}}))
        run_dir = tmp_path / "run"
        run_holder = _hold(run_dir)
        result = run_rebase("run", str(pipeline), "--run-dir", str(run_dir))
        run_holder.kill()
        run_holder.wait()
        assert result.returncode == 2 and f"--run-dir {run_dir} is being written by process {run_holder.pid}" in (
            result.stderr
        )
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # The holder died (kill -9): its lock went with it, and the next writer takes it over.
    with StageDir(out, "a test", None).writing():
        assert (out / LOCK).read_text().startswith(f"process {os.getpid()} on ")
        with StageDir(out, "a test", None).writing():  # the same process again: no conflict with itself
            pass


def test_a_refused_early_writer_leaves_no_directory_behind(tmp_path):
    with pytest.raises(RuntimeError), StageDir(tmp_path / "new", "a test", None).writing():
        raise RuntimeError("refused before writing anything")
    assert not (tmp_path / "new").exists()
