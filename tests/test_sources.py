"""Datastore sources (rebase/datastore/sources.py) on small files written in tmp_path; no network, no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rebase.datastore.sources import (
    Dataset,
    RowFile,
    bigbench_references,
    bigbench_row,
    check_csv_header,
    file_dataset_ids,
    open_source,
)
from rebase.errors import RebaseError


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_parquet(path: Path, table: pa.Table, **options) -> Path:
    pq.write_table(table, path, **options)
    return path


def read_all(row_file: RowFile, wanted: set[int]) -> list[tuple[int, dict | None, str]]:
    return list(row_file.read(wanted))


def datasets_of(spec: str, description: str | None = None) -> list[Dataset]:
    return list(open_source(spec, description).datasets())


# ---------------------------------------------------------------- open_source errors


def test_unknown_kind_names_the_kind_and_the_known_kinds():
    with pytest.raises(RebaseError) as error:
        open_source("s3:bucket/data.parquet")
    message = str(error.value)
    assert "unknown source kind 's3'" in message
    assert "bigbench" in message and "files:PATH_OR_GLOB" in message and "hf:DATASET_ID" in message


def test_files_without_a_path_is_rejected():
    with pytest.raises(RebaseError, match=r"'files:' names no path; use files:PATH_OR_GLOB"):
        open_source("files:")


def test_glob_matching_nothing_is_rejected(tmp_path):
    pattern = str(tmp_path / "*.parquet")
    with pytest.raises(RebaseError) as error:
        open_source(f"files:{pattern}")
    message = str(error.value)
    assert message.startswith(f"files:{pattern}: ")
    assert f"file matches {pattern}" in message


def test_directory_without_row_files_matches_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("not rows")
    with pytest.raises(RebaseError) as error:
        open_source(f"files:{tmp_path}")
    assert f"file matches {tmp_path}" in str(error.value)


def test_glob_takes_data_files_and_leaves_sidecars(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"q": "x"}])
    (tmp_path / "description.txt").write_text("Folder description")
    datasets = datasets_of(f"files:{tmp_path}/*")
    assert [(d.dataset_id, d.description) for d in datasets] == [("files/rows", "Folder description")]


def test_empty_file_is_rejected_by_name(tmp_path):
    (tmp_path / "good.jsonl").write_text('{"a": 1}\n')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RebaseError) as error:
        open_source(f"files:{tmp_path}/*.jsonl")
    assert str(error.value) == f"{empty}: the file is empty"


def test_unsupported_extension_is_rejected_by_name(tmp_path):
    sheet = tmp_path / "table.xlsx"
    sheet.write_bytes(b"PK\x03\x04")
    with pytest.raises(RebaseError) as error:
        open_source(f"files:{sheet}")
    assert str(error.value) == f"{sheet}: unsupported file type; use parquet, jsonl or csv"


# ---------------------------------------------------------------- file_dataset_ids


def test_dataset_ids_are_file_stems_when_unique(tmp_path):
    paths = [tmp_path / "train.parquet", tmp_path / "sub" / "extra.jsonl"]
    assert file_dataset_ids(paths) == ["files/train", "files/extra"]


def test_dataset_ids_add_parent_folders_to_tell_equal_stems_apart(tmp_path):
    # One depth for all files: the first depth at which every id is unique.
    paths = [tmp_path / "a" / "data.csv", tmp_path / "b" / "data.csv", tmp_path / "other.csv"]
    assert file_dataset_ids(paths) == ["files/a/data", "files/b/data", f"files/{tmp_path.name}/other"]


def test_dataset_ids_go_up_as_many_folders_as_needed(tmp_path):
    paths = [tmp_path / "x" / "same" / "data.csv", tmp_path / "y" / "same" / "data.csv"]
    assert file_dataset_ids(paths) == ["files/x/same/data", "files/y/same/data"]


def test_dataset_ids_drop_only_the_last_suffix(tmp_path):
    assert file_dataset_ids([tmp_path / "data.v2.csv"]) == ["files/data.v2"]


def test_dataset_ids_tell_apart_equal_stems_with_different_formats(tmp_path):
    ids = file_dataset_ids([tmp_path / "data.csv", tmp_path / "data.jsonl"])
    assert len(set(ids)) == 2


# ---------------------------------------------------------------- check_csv_header


@pytest.mark.parametrize(
    "header",
    [["id", "2020"], ["id", "-1.5"], ["id", ""], ["id", "   "], ["id", "name", "id"], ["id", " id "], []],
)
def test_csv_header_rejects_numeric_empty_and_duplicate_names(header):
    with pytest.raises(RebaseError) as error:
        check_csv_header("data/table.csv", header)
    assert str(error.value).startswith("data/table.csv: the first line does not look like a header")
    assert "add a header row" in str(error.value)


@pytest.mark.parametrize("header", [["id", "name"], ["question", "answer", "label_2020"], ["x"]])
def test_csv_header_accepts_distinct_names(header):
    assert check_csv_header("table.csv", header) is None


# ---------------------------------------------------------------- RowFile: JSONL


def test_jsonl_count_skips_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\n   \n{"a": 2}\n{"a": 3}')
    assert RowFile(str(path), "jsonl").count() == 3


def test_jsonl_reads_only_the_wanted_rows_in_order(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"n": i} for i in range(6)])
    rows = read_all(RowFile(str(path), "jsonl"), {4, 1, 5})
    assert rows == [(1, {"n": 1}, ""), (4, {"n": 4}, ""), (5, {"n": 5}, "")]


def test_jsonl_malformed_and_non_object_lines_are_none_with_their_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n\nnot json\n[1, 2]\n"text"\n{"a": 6}\n')
    row_file = RowFile(str(path), "jsonl")
    assert row_file.count() == 5
    rows = read_all(row_file, {0, 1, 2, 3, 4})
    # Row numbers skip the blank line 2; reasons name the line in the file.
    assert [(number, row) for number, row, _ in rows] == [(0, {"a": 1}), (1, None), (2, None), (3, None), (4, {"a": 6})]
    assert rows[1][2].startswith("line 3: not JSON (")
    assert rows[2][2] == "line 4: a JSON list, not an object"
    assert rows[3][2] == "line 5: a JSON str, not an object"
    assert rows[0][2] == rows[4][2] == ""


def test_jsonl_malformed_rows_that_are_not_wanted_are_not_reported(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{broken\n{"a": 3}\n')
    assert read_all(RowFile(str(path), "jsonl"), {0, 2}) == [(0, {"a": 1}, ""), (2, {"a": 3}, "")]


def test_jsonl_line_that_is_not_utf8_is_none_with_its_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": "caf\xe9"}\n{"a": 2}\n')
    rows = read_all(RowFile(str(path), "jsonl"), {0, 1})
    assert [(number, row) for number, row, _ in rows] == [(0, None), (1, {"a": 2})]
    assert rows[0][2].startswith("line 1: ")


# ---------------------------------------------------------------- RowFile: CSV


def test_csv_count_and_read(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('question,answer\nWhat is 2+2?,4\n\n"Say ""hi""",hi\nCapital of France?,Paris\n')
    row_file = RowFile(str(path), "csv")
    assert row_file.count() == 3
    assert read_all(row_file, {0, 1, 2}) == [
        (0, {"question": "What is 2+2?", "answer": "4"}, ""),
        (1, {"question": 'Say "hi"', "answer": "hi"}, ""),
        (2, {"question": "Capital of France?", "answer": "Paris"}, ""),
    ]
    assert read_all(row_file, {2}) == [(2, {"question": "Capital of France?", "answer": "Paris"}, "")]


def test_csv_row_with_the_wrong_field_count_is_none(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n1,2,3\n4\n5,6\n")
    rows = read_all(RowFile(str(path), "csv"), {0, 1, 2, 3})
    assert rows == [
        (0, {"a": "1", "b": "2"}, ""),
        (1, None, "row 2: 3 fields, header has 2"),
        (2, None, "row 3: 1 fields, header has 2"),
        (3, {"a": "5", "b": "6"}, ""),
    ]


def test_csv_with_a_numeric_first_line_is_rejected_on_read(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("1,2\n3,4\n")
    with pytest.raises(RebaseError, match="does not look like a header"):
        read_all(RowFile(str(path), "csv"), {0})


def test_csv_count_matches_the_records_read_with_a_multiline_field(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('text,label\n"line one\nline two",a\nplain,b\n')
    row_file = RowFile(str(path), "csv")
    rows = read_all(row_file, set(range(10)))
    assert [row for _, row, _ in rows] == [
        {"text": "line one\nline two", "label": "a"},
        {"text": "plain", "label": "b"},
    ]
    assert row_file.count() == 2


def test_csv_with_a_byte_order_mark_has_clean_column_names(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes("\ufeffid,name\n1,Ann\n".encode())
    assert read_all(RowFile(str(path), "csv"), {0}) == [(0, {"id": "1", "name": "Ann"}, "")]


def test_csv_header_names_are_stripped_in_rows(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("name, age\nAnn,31\n")
    assert read_all(RowFile(str(path), "csv"), {0}) == [(0, {"name": "Ann", "age": "31"}, "")]


def test_csv_that_is_not_utf8_is_a_rebase_error(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_bytes(b"name,city\nAnn,K\xf6ln\n")
    with pytest.raises(RebaseError, match="rows.csv"):
        read_all(RowFile(str(path), "csv"), {0})


# ---------------------------------------------------------------- RowFile: parquet


def test_parquet_count_and_read_across_batches(tmp_path):
    # 5,000 rows in row groups of 1,000: reading crosses the reader's 4,096-row batches.
    table = pa.table({"n": list(range(5000)), "text": [f"row {i}" for i in range(5000)]})
    path = write_parquet(tmp_path / "rows.parquet", table, row_group_size=1000)
    row_file = RowFile(str(path), "parquet")
    assert row_file.count() == 5000
    rows = read_all(row_file, {4999, 0, 4095, 4096, 2500})
    assert rows == [(n, {"n": n, "text": f"row {n}"}, "") for n in [0, 2500, 4095, 4096, 4999]]


def test_parquet_nested_values_come_back_as_python_values(tmp_path):
    table = pa.table({"meta": [{"a": 1, "b": "x"}], "tags": [["p", "q"]], "blob": [b"\x00\x01"]})
    path = write_parquet(tmp_path / "rows.parquet", table)
    assert read_all(RowFile(str(path), "parquet"), {0}) == [
        (0, {"meta": {"a": 1, "b": "x"}, "tags": ["p", "q"], "blob": b"\x00\x01"}, "")
    ]


def huggingface_metadata(features: dict) -> dict[bytes, bytes]:
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def test_class_label_names_come_from_huggingface_schema_metadata(tmp_path):
    features = {
        "text": {"dtype": "string", "_type": "Value"},
        "label": {"names": ["negative", "positive"], "_type": "ClassLabel"},
        "topic": {"names": ["sport", "news", "art"], "_type": "ClassLabel"},
    }
    table = pa.table({"text": ["good"], "label": [1], "topic": [2]})
    table = table.replace_schema_metadata(huggingface_metadata(features))
    path = write_parquet(tmp_path / "train.parquet", table)
    row_file = RowFile(str(path), "parquet")
    assert row_file.label_names() == {"label": ["negative", "positive"], "topic": ["sport", "news", "art"]}
    dataset = Dataset("files/train", "default", "d", "", files=[row_file])
    assert dataset.label_names() == {"label": ["negative", "positive"], "topic": ["sport", "news", "art"]}


@pytest.mark.parametrize(
    "metadata",
    [None, {b"other": b"{}"}, {b"huggingface": b"not json"}, {b"huggingface": b'{"info": {}}'}],
)
def test_parquet_without_usable_huggingface_metadata_has_no_label_names(tmp_path, metadata):
    table = pa.table({"label": [1]})
    if metadata is not None:
        table = table.replace_schema_metadata(metadata)
    path = write_parquet(tmp_path / "train.parquet", table)
    assert RowFile(str(path), "parquet").label_names() == {}


def test_label_names_of_text_files_are_empty(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"label": 1}])
    assert RowFile(str(path), "jsonl").label_names() == {}


def test_class_label_names_of_a_label_sequence(tmp_path):
    features = {
        "labels": {"feature": {"names": ["anger", "joy"], "_type": "ClassLabel"}, "_type": "Sequence"},
    }
    table = pa.table({"labels": [[0, 1]]}).replace_schema_metadata(huggingface_metadata(features))
    path = write_parquet(tmp_path / "train.parquet", table)
    assert RowFile(str(path), "parquet").label_names() == {"labels": ["anger", "joy"]}


# ---------------------------------------------------------------- Dataset.read


def test_dataset_read_maps_global_row_numbers_to_files_and_splits(tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", [{"n": f"train {i}"} for i in range(3)])
    test = write_jsonl(tmp_path / "test.jsonl", [{"n": f"test {i}"} for i in range(2)])
    dataset = Dataset(
        "files/x",
        "default",
        "d",
        "",
        files=[RowFile(str(train), "jsonl", split="train"), RowFile(str(test), "jsonl", split="test")],
    )
    assert dataset.count() == [3, 2]
    assert list(dataset.read([4, 1, 3])) == [
        ("train", 1, {"n": "train 1"}, ""),
        ("test", 0, {"n": "test 0"}, ""),
        ("test", 1, {"n": "test 1"}, ""),
    ]


def test_dataset_read_of_in_memory_rows_follows_the_wanted_order():
    rows = [("train", {"n": 0}), ("train", {"n": 1}), ("train", {"n": 2})]
    dataset = Dataset("bigbench/x", "default", "d", "Apache-2.0", rows=rows)
    assert dataset.count() == [3]
    assert list(dataset.read([2, 0])) == [("train", 2, {"n": 2}, ""), ("train", 0, {"n": 0}, "")]


# ---------------------------------------------------------------- bigbench_row


def test_bigbench_row_with_a_target_string():
    assert bigbench_row({"input": "2+2?", "target": "4"}) == {"input": "2+2?", "output": "4"}


def test_bigbench_row_with_a_target_list_takes_the_first():
    assert bigbench_row({"input": "q", "target": ["first", "second"]}) == {"input": "q", "output": "first"}


def test_bigbench_row_with_only_target_scores_takes_the_best_choice():
    example = {"input": "Is fire cold?", "target_scores": {"yes": 0, "no": 1, "maybe": 0.5}}
    assert bigbench_row(example) == {"input": "Is fire cold?", "output": "no", "choices": ["yes", "no", "maybe"]}


def test_bigbench_row_ties_in_target_scores_take_the_first_listed():
    example = {"input": "q", "target_scores": {"a": 0, "b": 1, "c": 1}}
    assert bigbench_row(example)["output"] == "b"


def test_bigbench_row_keeps_the_target_and_lists_the_choices():
    example = {"input": "q", "target": "c", "target_scores": {"a": 1, "c": 0}}
    assert bigbench_row(example) == {"input": "q", "output": "c", "choices": ["a", "c"]}


def test_bigbench_row_with_an_empty_target_list_falls_back_to_scores():
    example = {"input": "q", "target": [], "target_scores": {"x": 0, "y": 1}}
    assert bigbench_row(example) == {"input": "q", "output": "y", "choices": ["x", "y"]}


def test_bigbench_references_are_every_acceptable_answer():
    assert bigbench_references({"input": "q", "target": ["three", "3"]}) == ["three", "3"]
    assert bigbench_references({"input": "q", "target": " 4 "}) == ["4"]
    assert bigbench_references({"input": "q", "target_scores": {"a": 0, "b": 1, "c": 1}}) == ["b", "c"]
    assert bigbench_references({"input": "q", "target": [], "target_scores": {"x": 0, "y": 1}}) == ["y"]
    assert bigbench_references({"input": "q", "target": "c", "target_scores": {"a": 1, "c": 0}}) == ["c"]
    assert bigbench_references({"input": "q"}) == []


# ---------------------------------------------------------------- files: datasets and descriptions


def test_files_source_yields_one_dataset_per_file(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"q": "x"}])
    (tmp_path / "a.csv").write_text("q\nx\ny\n")
    source = open_source(f"files:{tmp_path}")
    assert (source.spec, source.kind) == (f"files:{tmp_path}", "files")
    datasets = list(source.datasets())
    assert [(d.dataset_id, d.config, d.license) for d in datasets] == [
        ("files/a", "default", ""),
        ("files/b", "default", ""),
    ]
    assert [(f.path, f.format, f.split) for d in datasets for f in d.files] == [
        (str(tmp_path / "a.csv"), "csv", "train"),
        (str(tmp_path / "b.jsonl"), "jsonl", "train"),
    ]
    assert [d.count() for d in datasets] == [[2], [1]]


def test_files_source_glob_selects_only_matching_files(tmp_path):
    write_jsonl(tmp_path / "keep.jsonl", [{"q": "x"}])
    (tmp_path / "skip.csv").write_text("q\nx\n")
    assert [d.dataset_id for d in datasets_of(f"files:{tmp_path}/*.jsonl")] == ["files/keep"]


def test_description_falls_back_to_the_file_stem(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", [{"q": "x"}])
    assert [d.description for d in datasets_of(f"files:{tmp_path}")] == ["reviews"]


def test_description_from_the_argument(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", [{"q": "x"}])
    datasets = datasets_of(f"files:{tmp_path}", description="Product reviews with star ratings")
    assert [d.description for d in datasets] == ["Product reviews with star ratings"]


def test_description_from_a_directory_description_txt(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", [{"q": "x"}])
    (tmp_path / "description.txt").write_text("  Folder description\n")
    datasets = datasets_of(f"files:{tmp_path}", description="argument description")
    assert [d.description for d in datasets] == ["Folder description"]


def test_description_from_a_file_sidecar_wins(tmp_path):
    write_jsonl(tmp_path / "reviews.jsonl", [{"q": "x"}])
    write_jsonl(tmp_path / "other.jsonl", [{"q": "x"}])
    (tmp_path / "reviews.jsonl.description.txt").write_text("Reviews sidecar\n")
    (tmp_path / "description.txt").write_text("Folder description")
    datasets = datasets_of(f"files:{tmp_path}", description="argument description")
    assert {d.dataset_id: d.description for d in datasets} == {
        "files/reviews": "Reviews sidecar",
        "files/other": "Folder description",
    }


# ---------------------------------------------------------------- Source.fingerprint


def test_fingerprint_is_stable_when_nothing_changed(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"q": "x"}])
    first = open_source(f"files:{tmp_path}").fingerprint
    assert open_source(f"files:{tmp_path}").fingerprint == first
    assert len(first) == 64


def test_fingerprint_changes_when_a_file_changes(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"q": "x"}])
    before = open_source(f"files:{tmp_path}").fingerprint
    write_jsonl(path, [{"q": "y"}])
    assert open_source(f"files:{tmp_path}").fingerprint != before


def test_fingerprint_changes_when_a_file_is_added(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"q": "x"}])
    before = open_source(f"files:{tmp_path}").fingerprint
    write_jsonl(tmp_path / "more.jsonl", [{"q": "x"}])
    assert open_source(f"files:{tmp_path}").fingerprint != before


def test_fingerprint_changes_with_the_description_argument(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"q": "x"}])
    assert open_source(f"files:{tmp_path}", "one").fingerprint != open_source(f"files:{tmp_path}", "two").fingerprint


def test_fingerprint_changes_when_a_description_sidecar_changes(tmp_path):
    write_jsonl(tmp_path / "rows.jsonl", [{"q": "x"}])
    sidecar = tmp_path / "rows.jsonl.description.txt"
    sidecar.write_text("first description")
    before = open_source(f"files:{tmp_path}").fingerprint
    sidecar.write_text("second description")
    assert open_source(f"files:{tmp_path}").fingerprint != before
