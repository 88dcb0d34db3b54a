"""Distillation data: the training set a student learns from, and examples encoded with the loss on the
response only. (The Ray Train + DeepSpeed recipe that uses these is the rest of the distillation issue.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from rebase.errors import RebaseError

IGNORE_INDEX = -100  # labels at this value carry no loss (PyTorch's cross-entropy default)


def read_training_set(path: Path) -> list[dict]:
    """(input, output) pairs from a transformed directory (its `ok` records) or from a jsonl, parquet or
    csv file with `input` and `output` columns (teacher data made elsewhere); one clear error if none."""
    path = Path(path)
    if path.is_dir():
        records = path / "records.parquet"
        if not records.exists():
            raise RebaseError(f"{path} is not a transformed directory (no records.parquet); run rebase transform")
        rows = pq.read_table(records, columns=["input", "output", "status"]).to_pylist()
        pairs = [{"input": r["input"], "output": r["output"]} for r in rows if r["status"] == "ok"]
        if not pairs:
            statuses: dict[str, int] = {}
            for row in rows:
                statuses[row["status"]] = statuses.get(row["status"], 0) + 1
            found = ", ".join(f"{count} {status}" for status, count in sorted(statuses.items())) or "no records"
            raise RebaseError(f"{path} has no ok records to train on ({found})")
        return pairs
    if not path.is_file():
        raise RebaseError(f"training data not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        elif suffix == ".parquet":
            rows = pq.read_table(path).to_pylist()
        elif suffix == ".csv":
            rows = pa_csv.read_csv(path).to_pylist()
        else:
            raise RebaseError(f"{path}: training data must be a transformed directory, .jsonl, .parquet or .csv")
    except (json.JSONDecodeError, OSError, ValueError) as error:
        raise RebaseError(f"{path}: cannot read training data ({type(error).__name__})") from None
    if rows and not all(isinstance(r, dict) and "input" in r and "output" in r for r in rows):
        raise RebaseError(f"{path}: every row needs 'input' and 'output'")
    pairs = [
        {"input": str(r["input"]), "output": str(r["output"])}
        for r in rows
        if str(r["input"] or "").strip() and str(r["output"] or "").strip()
    ]
    if not pairs:
        raise RebaseError(f"{path} holds no examples with a non-empty input and output")
    return pairs


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool


def encode_example(tokenizer, prompt: str, response: str, max_length: int) -> Encoded | None:
    """Token ids of prompt + response + EOS, with labels only on the response and EOS (the student learns
    to answer and to stop, not to repeat prompts). Longer than `max_length`: the response is cut at the
    end (`truncated`); None when not even one response token fits."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        return None
    truncated = len(response_ids) > room
    response_ids = response_ids[:room]
    return Encoded(
        input_ids=prompt_ids + response_ids,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response_ids,
        truncated=truncated,
    )
