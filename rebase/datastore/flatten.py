"""Rows to cells, as in the paper: nested keys joined with '.', class-label ids to names, long values
truncated, binary and empty values skipped. Plain functions, no Ray."""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from typing import Any

LIST_ITEMS_FLATTENED = 8  # lists of records keep their first items as key.0.field, key.1.field, ...


def stable_hash(*parts: str, size: int = 8) -> bytes:
    return hashlib.blake2b("\x1f".join(parts).encode("utf-8"), digest_size=size).digest()


def row_uid(dataset_id: str, config: str, split: str, row_number: int) -> str:
    """Stable id of a source row: the same dataset, config, split and row number give the same id."""
    return stable_hash(dataset_id, config, split, str(row_number)).hex()


def cell_id(row_uid_: str, column: str) -> str:
    return stable_hash(row_uid_, column).hex()


def _faiss_id(digest: bytes) -> int:
    """A signed 64-bit id from a digest; never -1, which FAISS uses for "no result"."""
    number = int.from_bytes(digest, "little", signed=True)
    return -2 if number == -1 else number


def value_id(text: str) -> int:
    """Signed 64-bit id of a cell value (FAISS ids are int64); equal texts share one id and one vector."""
    return _faiss_id(stable_hash("value", text))


def description_id(text: str) -> int:
    """Id of a dataset description; kept apart from value ids so descriptions never enter the cell index."""
    return _faiss_id(stable_hash("description", text))


def even_sample(num_rows: int, cap: int) -> list[int]:
    """Row numbers of an even sample of at most `cap` rows out of `num_rows` (all rows if fewer)."""
    if num_rows <= cap:
        return list(range(num_rows))
    return [(i * num_rows) // cap for i in range(cap)]


def _scalar_text(value: Any) -> str | None:
    if value is None or isinstance(value, (bytes, bytearray, memoryview)):
        return None
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        return None if math.isnan(value) else repr(value)
    text = str(value).strip()
    return text or None


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, (Mapping, list, tuple))


def flatten_row(
    row: Mapping[str, Any],
    max_value_chars: int,
    label_names: Mapping[str, list[str]] | None = None,
) -> dict[str, str]:
    """One row as {column: text}. Nested mappings give 'a.b' columns; lists of scalars become one JSON
    text; lists of records give 'a.0.b' columns for their first items; class-label ids in
    `label_names` columns become names; binary, None and empty values are dropped."""
    cells: dict[str, str] = {}
    label_names = label_names or {}

    def visit(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for sub_key, sub_value in value.items():
                visit(f"{key}.{sub_key}" if key else str(sub_key), sub_value)
            return
        if isinstance(value, (list, tuple)):
            if not value:
                return
            if all(_is_scalar(item) for item in value):
                items = [label_name(key, item) for item in value]
                items = [item for item in items if item is not None]
                if items:
                    store(key, json.dumps(items, ensure_ascii=False))
                return
            for index, item in enumerate(value[:LIST_ITEMS_FLATTENED]):
                visit(f"{key}.{index}", item)
            return
        text = label_name(key, value)
        if text is not None:
            store(key, text)

    def label_name(key: str, value: Any) -> str | None:
        names = label_names.get(key)
        if names is not None and isinstance(value, int) and not isinstance(value, bool):
            return names[value] if 0 <= value < len(names) else None  # -1 marks "no label" in HF data
        return _scalar_text(value)

    def store(key: str, text: str) -> None:
        cells[key] = text if len(text) <= max_value_chars else text[:max_value_chars]

    visit("", row)
    return cells
