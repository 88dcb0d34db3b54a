"""Shared file helpers: the rule that keeps every stage from writing over somebody else's files."""

from __future__ import annotations

import pytest

from rebase.errors import RebaseError
from rebase.io import check_stage_dir

OWN = {"records.parquet", "stats.json", "_SUCCESS"}


def test_a_missing_empty_or_own_directory_is_accepted(tmp_path):
    check_stage_dir(tmp_path / "missing", OWN, "a rebase transform")
    check_stage_dir(tmp_path, OWN, "a rebase transform")
    (tmp_path / "stats.json").write_text("{}")
    (tmp_path / ".stats.json.x1y2.tmp").write_text("")  # left by a write that was killed
    check_stage_dir(tmp_path, OWN, "a rebase transform")


def test_a_file_or_foreign_files_are_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RebaseError, match=f"^--out {tmp_path} holds files that are not a rebase transform; choose"):
        check_stage_dir(tmp_path, OWN, "a rebase transform")
    with pytest.raises(RebaseError, match="^--run-dir .*notes.txt is a file; choose a directory$"):
        check_stage_dir(tmp_path / "notes.txt", OWN, "a rebase run", flag="--run-dir")
    assert (tmp_path / "notes.txt").read_text() == "mine"
