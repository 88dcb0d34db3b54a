"""Embedding distinct values with sentence-transformers in Ray Data actors.

Each pending block (a parquet file of distinct values not yet in the store) becomes one values block
with the same name; a block is written only when all its vectors are back, so an interrupted build
re-embeds at most the blocks that were in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rebase import precision
from rebase.io import numpy_to_embeddings, parquet_rows, write_parquet_atomic
from rebase.ray_setup import actor_pool


class Embedder:
    """A sentence-transformers model in one Ray actor (or plain process): texts in, unit vectors out."""

    def __init__(
        self,
        model_path: str,
        batch_size: int = 32,
        threads: int | None = None,
        max_tokens: int | None = None,
        dtype: str = "float32",
    ):
        import torch
        from sentence_transformers import SentenceTransformer

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device == "cpu" and threads:
            torch.set_num_threads(threads)
        self.model = SentenceTransformer(model_path, device=device)
        self.dtype = precision.resolve(dtype, device)
        if self.dtype != "float32":
            # vectors come back as float32 (sentence-transformers casts before NumPy); measured against float32
            # on this project's data: cosine >= 0.998 per text (benchmarks/RESULTS.md)
            self.model.to(precision.torch_dtype(self.dtype))
        if max_tokens:
            self.model.max_seq_length = min(max_tokens, self.model.max_seq_length or max_tokens)
        self.batch_size = batch_size

    def encode(self, texts: list[str]) -> np.ndarray:
        # In bfloat16 the vectors are made unit length here, in float32, not to bfloat16's 3 digits.
        full = self.dtype == "float32"
        vectors = self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=full, convert_to_numpy=True)
        vectors = vectors.astype(np.float32, copy=False)
        if not full:
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {
            "value_id": batch["value_id"],
            "kind": batch["kind"],
            "path": batch["path"],
            "embedding": self.encode([str(t) for t in batch["text"]]),
        }


def embedding_dimension(model_path: str) -> int:
    """The output dimension from the model's files, without loading its weights."""
    import json

    root = Path(model_path)
    for candidate in sorted(root.glob("*_Pooling/config.json")) + [root / "config.json"]:
        if candidate.is_file():
            config = json.loads(candidate.read_text())
            for key in ("word_embedding_dimension", "hidden_size", "d_model"):
                if key in config:
                    dense = sorted(root.glob("*_Dense/config.json"))
                    if dense:
                        return int(json.loads(dense[-1].read_text())["out_features"])
                    return int(config[key])
    return Embedder(model_path).encode(["dimension"]).shape[1]  # no config says it: ask the model


def read_pending_block(batch: pa.Table) -> pa.Table:
    """A batch of pending-file paths -> their rows, each tagged with the file it came from."""
    tables = []
    for path in batch.column("path").to_pylist():
        table = pq.read_table(path, columns=["value_id", "kind", "text"])
        tables.append(table.append_column("path", pa.array([path] * table.num_rows, pa.string())))
    return pa.concat_tables(tables)


def _block_key(path: str) -> str:
    parts = Path(path).parts
    return "/".join(parts[-3:])  # <source key>/pending/block-NNNNN.parquet


def embed_blocks(
    pending: list[Path],
    output_for: Callable[[Path], Path],
    model_path: str,
    batch_size: int,
    concurrency: tuple[int, int],
    gpus: float,
    threads: int,
    max_tokens: int | None = None,
    dtype: str = "float32",
    on_block: Callable[[int], None] | None = None,
) -> int:
    """Embed the pending blocks through a Ray Data actor pool; write one values block per pending block.

    Returns the number of values embedded. The driver only gathers vectors per block and writes them.
    On CPUs each actor reserves one logical CPU but runs `threads` torch threads: a sentence encoder
    scales well across cores in one process, and the spare logical CPU keeps reads and shard builds moving.
    """
    import ray

    if not pending:
        return 0
    expected = {_block_key(str(p)): parquet_rows(p) for p in pending}
    targets = {_block_key(str(p)): output_for(p) for p in pending}
    # One Ray block per pending file (Ray's parquet reader would bundle small files into one read task,
    # leaving the actor pool nothing to scale against and the driver nothing to write until the end).
    dataset = ray.data.from_items([{"path": str(p)} for p in pending], override_num_blocks=len(pending))
    dataset = dataset.map_batches(read_pending_block, batch_size=1, batch_format="pyarrow")
    dataset = dataset.map_batches(
        Embedder,
        fn_constructor_kwargs={
            "model_path": model_path,
            "batch_size": batch_size,
            "threads": None if gpus else threads,
            "max_tokens": max_tokens,
            "dtype": dtype,
        },
        batch_size=None,  # a whole block per call: encode() sorts it by length, so batches pad little
        batch_format="numpy",
        compute=actor_pool(concurrency),
        num_gpus=1 if gpus else 0,
        num_cpus=1,
        # No retry options here: any remote argument the read above lacks stops Ray Data fusing the read
        # into this actor (measured: 45 instead of 260 values/s). Ray Data's own actor-pool defaults apply:
        # restarts and call retries without limit, which a lost node needs (tests/test_fault_tolerance.py).
    )
    gathered: dict[str, list[pa.RecordBatch]] = {}
    counts: dict[str, int] = {}
    embedded = 0
    # prefetch_batches=0: a block is written as soon as it is embedded (prefetching holds one back)
    for batch in dataset.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        paths = batch.column("path").to_pylist()
        for key in dict.fromkeys(paths):
            mask = pa.array([p == key for p in paths])
            part = batch.filter(mask).select(["value_id", "kind", "embedding"])
            block = _block_key(key)
            gathered.setdefault(block, []).append(part)
            counts[block] = counts.get(block, 0) + part.num_rows
            if counts[block] == expected[block]:
                table = pa.concat_tables(gathered.pop(block)).combine_chunks()
                table = _normalise_schema(table)
                write_parquet_atomic(targets[block], table)
                embedded += table.num_rows
                if on_block:
                    on_block(table.num_rows)
    if gathered:
        raise RuntimeError(f"embedding finished with incomplete blocks: {sorted(gathered)}")
    return embedded


def _normalise_schema(table: pa.Table) -> pa.Table:
    vectors = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(vectors.type):
        array = np.stack(vectors.to_numpy(zero_copy_only=False)).astype(np.float32)
        vectors = numpy_to_embeddings(array)
    return pa.table(
        {
            "value_id": table.column("value_id").cast(pa.int64()),
            "kind": table.column("kind").cast(pa.string()),
            "embedding": vectors.cast(pa.list_(pa.float32(), vectors.type.list_size)),
        }
    )
