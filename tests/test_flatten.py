"""Rows to cells (rebase/datastore/flatten.py): hand-computed expectations, no Ray."""

from __future__ import annotations

import hashlib

import pytest

from rebase.datastore.flatten import (
    LIST_ITEMS_FLATTENED,
    cell_id,
    description_id,
    even_sample,
    flatten_row,
    row_uid,
    value_id,
)

# ---------------------------------------------------------------- flatten_row


def test_flat_row_of_strings_keeps_every_column():
    assert flatten_row({"question": "What is 2+2?", "answer": "4"}, 100) == {
        "question": "What is 2+2?",
        "answer": "4",
    }


def test_nested_mappings_join_keys_with_dots():
    row = {"meta": {"source": {"name": "wiki", "year": 2020}}, "text": "hi"}
    assert flatten_row(row, 100) == {"meta.source.name": "wiki", "meta.source.year": "2020", "text": "hi"}


def test_list_of_strings_becomes_one_json_text():
    assert flatten_row({"tags": ["red", "grün"]}, 100) == {"tags": '["red", "grün"]'}


def test_list_of_numbers_and_booleans_becomes_json_of_their_texts():
    # Every item goes through the same scalar-to-text rule as a plain cell, so numbers are quoted.
    assert flatten_row({"values": [1, 2.5, True]}, 100) == {"values": '["1", "2.5", "True"]'}


def test_none_and_binary_items_are_dropped_from_a_list_of_scalars():
    assert flatten_row({"values": ["a", None, b"\x00", "b"]}, 100) == {"values": '["a", "b"]'}


def test_list_of_only_dropped_items_gives_no_cell():
    assert flatten_row({"values": [None, b"x"], "empty": []}, 100) == {}


def test_list_of_records_gives_indexed_columns():
    row = {"answers": [{"text": "Paris", "start": 3}, {"text": "paris"}]}
    assert flatten_row(row, 100) == {"answers.0.text": "Paris", "answers.0.start": "3", "answers.1.text": "paris"}


def test_list_of_records_keeps_only_the_first_eight_items():
    row = {"items": [{"n": i} for i in range(12)]}
    cells = flatten_row(row, 100)
    assert LIST_ITEMS_FLATTENED == 8
    assert cells == {f"items.{i}.n": str(i) for i in range(8)}


def test_list_of_lists_gives_one_json_text_per_inner_list():
    assert flatten_row({"grid": [[1, 2], ["x"]]}, 100) == {"grid.0": '["1", "2"]', "grid.1": '["x"]'}


def test_class_label_ids_become_names():
    names = {"label": ["negative", "positive"]}
    assert flatten_row({"label": 1, "text": "great"}, 100, names) == {"label": "positive", "text": "great"}
    assert flatten_row({"label": 0}, 100, names) == {"label": "negative"}


def test_class_label_minus_one_and_out_of_range_ids_are_dropped():
    names = {"label": ["negative", "positive"]}
    assert flatten_row({"label": -1, "text": "t"}, 100, names) == {"text": "t"}
    assert flatten_row({"label": 2, "text": "t"}, 100, names) == {"text": "t"}


def test_class_label_names_apply_only_to_their_column():
    names = {"label": ["negative", "positive"]}
    assert flatten_row({"label": 1, "stars": 1}, 100, names) == {"label": "positive", "stars": "1"}


def test_class_label_names_apply_to_each_item_of_a_list():
    names = {"labels": ["anger", "joy", "fear"]}
    assert flatten_row({"labels": [2, -1, 0, 7]}, 100, names) == {"labels": '["fear", "anger"]'}


def test_class_label_names_use_the_dotted_key_of_nested_columns():
    names = {"answer.label": ["no", "yes"]}
    assert flatten_row({"answer": {"label": 1}}, 100, names) == {"answer.label": "yes"}


def test_boolean_in_a_class_label_column_is_not_an_id():
    names = {"flag": ["zero", "one"]}
    assert flatten_row({"flag": True}, 100, names) == {"flag": "True"}


def test_string_in_a_class_label_column_is_kept_as_text():
    names = {"label": ["negative", "positive"]}
    assert flatten_row({"label": "1"}, 100, names) == {"label": "1"}


def test_bytes_none_empty_and_nan_values_are_skipped():
    row = {
        "image": b"\x89PNG",
        "buffer": bytearray(b"abc"),
        "view": memoryview(b"abc"),
        "missing": None,
        "empty": "",
        "blank": "   ",
        "score": float("nan"),
        "empty_record": {},
        "kept": "x",
    }
    assert flatten_row(row, 100) == {"kept": "x"}


def test_booleans_become_true_and_false():
    assert flatten_row({"a": True, "b": False}, 100) == {"a": "True", "b": "False"}


def test_numbers_become_their_python_text():
    assert flatten_row({"i": 0, "f": 0.1, "big": 10**20, "neg": -3.0}, 100) == {
        "i": "0",
        "f": "0.1",
        "big": "100000000000000000000",
        "neg": "-3.0",
    }


def test_strings_are_stripped_of_surrounding_whitespace():
    assert flatten_row({"text": "  hello world \n"}, 100) == {"text": "hello world"}


def test_values_longer_than_max_value_chars_are_truncated():
    assert flatten_row({"text": "abcdefghij", "short": "abcd"}, 4) == {"text": "abcd", "short": "abcd"}


def test_truncation_applies_to_list_json_and_label_names():
    names = {"label": ["positive"]}
    cells = flatten_row({"tags": ["aaa", "bbb"], "label": 0}, 5, names)
    assert cells == {"tags": '["aaa', "label": "posit"}


def test_flatten_row_does_not_change_its_input():
    row = {"a": {"b": [1, 2]}, "c": [{"d": "x"}]}
    flatten_row(row, 100)
    assert row == {"a": {"b": [1, 2]}, "c": [{"d": "x"}]}


# ---------------------------------------------------------------- ids


def test_row_uid_is_the_blake2b_of_its_parts():
    # Ids are stored in datastores, so the recipe must not drift: blake2b-64 over parts joined by \x1f.
    expected = hashlib.blake2b(b"files/a\x1fdefault\x1ftrain\x1f7", digest_size=8).hexdigest()
    assert row_uid("files/a", "default", "train", 7) == expected
    assert len(expected) == 16


def test_row_uid_is_stable_and_changes_with_every_part():
    base = row_uid("files/a", "default", "train", 7)
    assert row_uid("files/a", "default", "train", 7) == base
    changed = {
        row_uid("files/b", "default", "train", 7),
        row_uid("files/a", "other", "train", 7),
        row_uid("files/a", "default", "test", 7),
        row_uid("files/a", "default", "train", 8),
    }
    assert base not in changed
    assert len(changed) == 4


def test_row_uid_parts_cannot_run_into_each_other():
    assert row_uid("ab", "c", "train", 1) != row_uid("a", "bc", "train", 1)
    assert row_uid("d", "c", "train", 11) != row_uid("d", "c", "train1", 1)


def test_cell_id_is_stable_and_depends_on_row_and_column():
    uid = row_uid("files/a", "default", "train", 0)
    other_uid = row_uid("files/a", "default", "train", 1)
    assert cell_id(uid, "question") == cell_id(uid, "question")
    assert cell_id(uid, "question") != cell_id(uid, "answer")
    assert cell_id(uid, "question") != cell_id(other_uid, "question")
    expected = hashlib.blake2b(f"{uid}\x1fquestion".encode(), digest_size=8).hexdigest()
    assert cell_id(uid, "question") == expected


def test_value_id_is_a_signed_int64_of_the_blake2b():
    digest = hashlib.blake2b(b"value\x1fhello", digest_size=8).digest()
    assert value_id("hello") == int.from_bytes(digest, "little", signed=True)


def test_value_id_is_stable_and_distinct_per_text():
    assert value_id("Paris") == value_id("Paris")
    assert value_id("Paris") != value_id("paris")
    assert value_id("") != value_id(" ")


def test_value_ids_fill_the_signed_int64_range():
    ids = [value_id(f"text {i}") for i in range(200)]
    assert all(isinstance(i, int) and -(2**63) <= i < 2**63 for i in ids)
    # Signed, not unsigned: about half of 200 hashes are negative, none above the int64 maximum.
    assert any(i < 0 for i in ids)
    assert any(i > 0 for i in ids)
    assert len(set(ids)) == 200


@pytest.mark.parametrize("text", ["", "Paris", "a longer description of a dataset"])
def test_description_id_is_kept_apart_from_value_id(text):
    assert description_id(text) != value_id(text)
    assert description_id(text) == description_id(text)
    digest = hashlib.blake2b(f"description\x1f{text}".encode(), digest_size=8).digest()
    assert description_id(text) == int.from_bytes(digest, "little", signed=True)


# ---------------------------------------------------------------- even_sample


def test_even_sample_takes_all_rows_when_fewer_than_the_cap():
    assert even_sample(3, 10) == [0, 1, 2]
    assert even_sample(5, 5) == [0, 1, 2, 3, 4]
    assert even_sample(0, 10) == []


def test_even_sample_hand_computed_cases():
    # i * num_rows // cap for i in 0..cap-1
    assert even_sample(10, 4) == [0, 2, 5, 7]
    assert even_sample(7, 3) == [0, 2, 4]
    assert even_sample(1000, 1) == [0]
    assert even_sample(11, 10) == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize(("num_rows", "cap"), [(10, 4), (1001, 1000), (123_457, 1000), (10**9, 7)])
def test_even_sample_gives_cap_distinct_increasing_indices_spread_evenly(num_rows, cap):
    sample = even_sample(num_rows, cap)
    assert len(sample) == cap
    assert sample[0] == 0
    assert all(a < b for a, b in zip(sample, sample[1:]))
    assert sample[-1] < num_rows
    # Evenly spread: consecutive gaps differ by at most one row from num_rows / cap.
    gaps = [b - a for a, b in zip(sample, sample[1:])]
    assert all(num_rows // cap <= gap <= num_rows // cap + 1 for gap in gaps)
    # ... and the sample reaches into the last stretch of rows.
    assert sample[-1] >= num_rows - num_rows // cap - 1
