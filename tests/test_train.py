"""Training data for the student: reading it, and encoding examples with the loss on the response only."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rebase.errors import RebaseError
from rebase.train import IGNORE_INDEX, encode_example, read_training_set


def test_reads_ok_records_of_a_transformed_directory(tmp_path):
    records = [
        {"input": "a", "output": "A", "status": "ok"},
        {"input": "b", "output": "B", "status": "rejected"},
        {"input": "c", "output": "C", "status": "ok"},
    ]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "records.parquet")
    assert read_training_set(tmp_path) == [{"input": "a", "output": "A"}, {"input": "c", "output": "C"}]


def test_an_all_rejected_training_set_is_one_clear_error(tmp_path):
    records = [{"input": "b", "output": "B", "status": "rejected"}, {"input": "d", "output": None, "status": "failed"}]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "records.parquet")
    with pytest.raises(RebaseError, match=r"has no ok records to train on \(1 failed, 1 rejected\)"):
        read_training_set(tmp_path)
    with pytest.raises(RebaseError, match="not a transformed directory"):
        read_training_set(tmp_path / "..")


def test_plain_files_of_input_and_output(tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"input": "q", "output": "a"}) + "\n\n")
    (tmp_path / "d.csv").write_text("input,output\nq,a\n , empty\n")
    pq.write_table(pa.table({"input": ["q"], "output": ["a"]}), tmp_path / "d.parquet")
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        assert read_training_set(tmp_path / name) == [{"input": "q", "output": "a"}]
    (tmp_path / "bad.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(RebaseError, match="every row needs 'input' and 'output'"):
        read_training_set(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(RebaseError, match="cannot read training data"):
        read_training_set(tmp_path / "broken.jsonl")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(RebaseError, match="no examples"):
        read_training_set(tmp_path / "empty.jsonl")
    (tmp_path / "d.txt").write_text("q a")
    with pytest.raises(RebaseError, match="must be a transformed directory"):
        read_training_set(tmp_path / "d.txt")
    with pytest.raises(RebaseError, match="not found"):
        read_training_set(tmp_path / "missing.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from rebase.models import resolve_model

    return AutoTokenizer.from_pretrained(resolve_model("builtin:gemma3-270m"))


@pytest.mark.slow  # the built-in's tokenizer: converted from the GGUF on a fresh machine (about a minute)
def test_loss_only_on_the_response_and_its_end(tokenizer):
    prompt, response = "### Input:\nIs ice cold?\n\n### Response:\n", "Yes"
    encoded = encode_example(tokenizer, prompt, response, max_length=64)
    prompt_ids = tokenizer(prompt)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    assert prompt_ids[0] == tokenizer.bos_token_id
    assert encoded.input_ids == prompt_ids + response_ids + [tokenizer.eos_token_id]
    assert encoded.labels == [IGNORE_INDEX] * len(prompt_ids) + response_ids + [tokenizer.eos_token_id]
    assert not encoded.truncated


@pytest.mark.slow
def test_truncation_cuts_the_response_and_is_reported(tokenizer):
    prompt = "Say a long thing:"
    response = "one two three four five six seven eight nine ten"
    length = len(tokenizer(prompt)["input_ids"])
    cut = encode_example(tokenizer, prompt, response, max_length=length + 3)
    assert cut.truncated and len(cut.input_ids) == length + 3
    assert cut.labels[:length] == [IGNORE_INDEX] * length and IGNORE_INDEX not in cut.labels[length:]
    assert encode_example(tokenizer, prompt, response, max_length=length) is None
