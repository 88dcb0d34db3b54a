"""Atomic file writes and parquet helpers shared by every stage."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebase.errors import RebaseError


def cache_dir() -> Path:
    """The cache root (`$REBASE_CACHE`, default ~/.cache/rebase); created on first use."""
    path = Path(os.environ.get("REBASE_CACHE", Path.home() / ".cache" / "rebase"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object (a stage's stats, a run's state); one clear error when it is
    damaged, never a traceback."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError):
        value = None
    except OSError as error:
        raise RebaseError(f"{path} cannot be read ({error.strerror})") from None
    if not isinstance(value, dict):
        raise RebaseError(f"{path} is damaged (not a JSON object); restore it, or redo the stage that wrote it")
    return value


def read_parquet(path: Path, columns: list[str] | None = None) -> pa.Table:
    """A parquet file a stage wrote; one clear error when it is damaged or lacks a column, never a traceback."""
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        missing = "No match for FieldRef" in str(error)
        problem = f"it lacks a column of {', '.join(columns or [])}" if missing else "not a readable parquet file"
        raise RebaseError(f"{path} is damaged ({problem}); redo the stage that wrote it") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temp file beside `path`, then rename, so readers never see half a file."""
    tmp = _temp_beside(path)
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, table: pa.Table) -> None:
    """Write a parquet file through a temp path and a rename."""
    tmp = _temp_beside(path)
    pq.write_table(table, tmp, compression="zstd")
    os.replace(tmp, path)


def write_bytes_atomic(path: Path, write) -> None:
    """Call `write(tmp_path)` and rename the result onto `path`."""
    tmp = _temp_beside(path)
    write(str(tmp))
    os.replace(tmp, path)


def parquet_files(directory: Path) -> list[Path]:
    """The finished parquet files under a directory, in a stable order (temp files excluded)."""
    if not directory.exists():
        return []
    return sorted(p for p in directory.rglob("*.parquet") if not p.name.startswith("."))


def parquet_rows(path: Path) -> int:
    """Row count of a parquet file from its footer, without reading the data."""
    return pq.ParquetFile(path).metadata.num_rows


def iter_parquet(
    paths: list[Path], columns: list[str] | None = None, batch_size: int = 65536
) -> Iterator[pa.RecordBatch]:
    """Stream record batches from several parquet files; memory stays at one batch."""
    for path in paths:
        yield from pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns)


def embeddings_to_numpy(column: pa.Array | pa.ChunkedArray, dimension: int) -> np.ndarray:
    """A fixed-size-list float32 column as an (n, dimension) float32 array."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dimension).astype(np.float32, copy=False)


def numpy_to_embeddings(vectors: np.ndarray) -> pa.FixedSizeListArray:
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), vectors.shape[1])
