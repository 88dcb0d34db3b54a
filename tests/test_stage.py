"""The stage-directory protocol: never write over somebody else's files, refuse other inputs, resume."""

from __future__ import annotations

import json

import pytest

from rebase.errors import RebaseError
from rebase.stage import StageDir, is_finished, read_stats

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
