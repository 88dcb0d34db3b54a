"""`rebase datastore build`: sources -> rows and cells -> distinct values embedded -> FAISS shards.

Work is recorded per source in the manifest (ingesting -> ingested -> complete), so building again
with the same sources does nothing, a new source only adds its own rows, and an interrupted build
resumes: ingestion restarts for the source it was in, embedding skips every block already written.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from rebase import precision
from rebase.config import DatastoreConfig
from rebase.datastore.embed import embed_blocks, embedding_dimension
from rebase.datastore.flatten import cell_id, description_id, even_sample, flatten_row, row_uid, value_id
from rebase.datastore.index import build_shard, group_blocks, resolve_kind
from rebase.datastore.manifest import (
    MANIFEST,
    Embedder,
    Manifest,
    Settings,
    Shard,
    SourceEntry,
    read_manifest,
    write_manifest,
)
from rebase.datastore.sources import Dataset, Source, open_source
from rebase.errors import RebaseError
from rebase.io import (
    embeddings_to_numpy,
    iter_parquet,
    parquet_files,
    parquet_rows,
    write_parquet_atomic,
)
from rebase.models import canonical_model_name, resolve_model
from rebase.progress import progress_bar
from rebase.stage import check_writable

ROWS_PER_PART = 20_000
DESCRIPTIONS_BLOCK = "descriptions.parquet"

ROW_SCHEMA = pa.schema(
    [
        ("row_uid", pa.string()),
        ("dataset_id", pa.string()),
        ("config", pa.string()),
        ("split", pa.string()),
        ("row_number", pa.int64()),
        ("row", pa.string()),
    ]
)
CELL_SCHEMA = pa.schema(
    [
        ("cell_id", pa.string()),
        ("row_uid", pa.string()),
        ("dataset_id", pa.string()),
        ("column", pa.string()),
        ("value", pa.string()),
        ("value_id", pa.int64()),
    ]
)
PENDING_SCHEMA = pa.schema([("value_id", pa.int64()), ("kind", pa.string()), ("text", pa.string())])
DATASET_SCHEMA = pa.schema(
    [
        ("dataset_id", pa.string()),
        ("config", pa.string()),
        ("description", pa.string()),
        ("description_id", pa.int64()),
        ("rows", pa.int64()),
        ("skipped_rows", pa.int64()),
        ("license", pa.string()),
        ("source", pa.string()),
    ]
)


@dataclass
class BuildSummary:
    out: Path
    counts: dict[str, int]
    new_sources: int
    new_rows: int
    embedded: int
    seconds: float
    stage_seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        c = self.counts
        work = (
            f"added {self.new_sources} source(s), {self.new_rows:,} rows, embedded {self.embedded:,} values"
            if self.new_sources
            else "nothing new to build"
        )
        return (
            f"datastore {self.out}: {c['datasets']:,} datasets, {c['rows']:,} rows, {c['cells']:,} cells, "
            f"{c['distinct_values']:,} distinct values, {c['shards']} index shard(s); {work}; "
            f"{self.seconds:.1f} s"
        )


def build_datastore(config: DatastoreConfig) -> BuildSummary:
    """Build or extend the datastore at `config.out` from `config.sources`; see the module docstring."""
    started = time.monotonic()
    out = config.out
    sources = _unique([open_source(spec, config.description) for spec in config.sources])
    created = not out.exists()
    check_writable(out)
    manifest = _open_or_create(out, config)
    model_path = str(resolve_model(config.embedder))
    todo = [s for s in sources if (e := manifest.source(s.fingerprint)) is None or e.state != "complete"]
    if not todo:
        return BuildSummary(out, manifest.counts(), 0, 0, 0, time.monotonic() - started)

    _sweep_unrecorded(out, manifest)
    entries = [_entry_for(manifest, source) for source in todo]
    # Sources ingested by an interrupted earlier build are finished too, even if not named this time:
    # their pending values may be the only copy of values that newer rows point to.
    entries += [e for e in manifest.sources if e.state == "ingested" and e not in entries]
    known_values = _known_ids(out)
    known_datasets = _known_datasets(out, manifest)
    stages: dict[str, float] = {}
    clock = time.monotonic()
    for source, entry in zip(todo, entries):
        if entry.state == "ingesting":
            if not any(e is entry for e in manifest.sources):
                manifest.sources.append(entry)
            try:
                _ingest(out, source, entry, config, known_values, known_datasets)
            except RebaseError:
                # Bad input in this source: leave the store exactly as it was before this build.
                _clear_source(out, entry.key)
                manifest.sources.remove(entry)
                if created and not manifest.sources:
                    _remove_new_store(out)
                raise
            entry.state = "ingested"
            write_manifest(out, manifest)
    del known_values
    stages["ingest"], clock = time.monotonic() - clock, time.monotonic()

    from rebase.ray_setup import cluster_gpus, ensure_ray

    ensure_ray()
    stages["ray_start"], clock = time.monotonic() - clock, time.monotonic()
    embedded = _embed_pending(out, entries, model_path, config, cluster_gpus())
    stages["embed"], clock = time.monotonic() - clock, time.monotonic()
    _build_shards(out, manifest, entries, config)
    stages["index"], clock = time.monotonic() - clock, time.monotonic()
    _publish_datasets(out, entries, manifest.embedder.dimension)
    for entry in entries:
        entry.state = "complete"
        shutil.rmtree(out / "staging" / entry.key, ignore_errors=True)
    write_manifest(out, manifest)
    _remove_if_empty(out / "staging")
    rows = sum(e.rows for e in entries)
    return BuildSummary(out, manifest.counts(), len(entries), rows, embedded, time.monotonic() - started, stages)


def _unique(sources: list[Source]) -> list[Source]:
    seen: dict[str, Source] = {}
    for source in sources:
        seen.setdefault(source.fingerprint, source)
    return list(seen.values())


def _open_or_create(out: Path, config: DatastoreConfig) -> Manifest:
    """Open the datastore at `out`, or start one there; refuse anything that is not ours or not compatible."""
    name = canonical_model_name(config.embedder)
    settings = Settings(
        rows_per_dataset=config.rows_per_dataset,
        max_value_chars=config.max_value_chars,
        embed_max_tokens=config.embed_max_tokens,
    )
    if out.exists() and not out.is_dir():
        raise RebaseError(f"--out {out} is a file, not a directory")
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.embedder.name != name:
            raise RebaseError(
                f"{out} was built with embedder '{manifest.embedder.name}', not '{name}'; "
                f"pass --embedder {manifest.embedder.name} or choose a new --out"
            )
        if manifest.settings != settings:
            raise RebaseError(
                f"{out} was built with {manifest.settings.model_dump()}, not {settings.model_dump()}; "
                "use the same settings or a new --out"
            )
        return manifest
    if out.exists() and any(out.iterdir()):
        raise RebaseError(f"--out {out} holds files but is not a rebase datastore (no {MANIFEST}); choose another")
    dimension = embedding_dimension(str(resolve_model(config.embedder)))
    manifest = Manifest(embedder=Embedder(name=name, dimension=dimension), settings=settings, index=config.index)
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)
    return manifest


def _entry_for(manifest: Manifest, source: Source) -> SourceEntry:
    entry = manifest.source(source.fingerprint)
    if entry is None:
        # Recorded in the manifest only once its ingestion starts (see build_datastore).
        entry = SourceEntry(
            spec=source.spec, kind=source.kind, fingerprint=source.fingerprint, key=source.fingerprint[:12]
        )
    return entry


def _sweep_unrecorded(out: Path, manifest: Manifest) -> None:
    """Remove what interrupted ingestions left: source folders the manifest does not record."""
    recorded = {e.key for e in manifest.sources}
    for part in ("rows", "cells", "values", "staging"):
        if (out / part).is_dir():
            for folder in (out / part).iterdir():
                if folder.is_dir() and folder.name not in recorded:
                    shutil.rmtree(folder)


def _clear_source(out: Path, key: str) -> None:
    """Remove what a source's unfinished ingestion left, so it can start again cleanly."""
    for part in ("rows", "cells", "values", "staging"):
        shutil.rmtree(out / part / key, ignore_errors=True)


def _remove_new_store(out: Path) -> None:
    """Undo a store this build created when its only source turned out to be bad input."""
    (out / MANIFEST).unlink(missing_ok=True)
    for part in ("rows", "cells", "values", "staging", ""):
        _remove_if_empty(out / part)


def _remove_if_empty(path: Path) -> None:
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()


def _known_ids(out: Path) -> set[int]:
    """Ids of every value and description already embedded or waiting to be (8 bytes each on disk)."""
    files = parquet_files(out / "values") + parquet_files(out / "staging")
    files = [f for f in files if f.parent.name == "pending" or f.parent.parent.name == "values"]
    known: set[int] = set()
    for batch in iter_parquet(files, columns=["value_id"]):
        known.update(batch.column("value_id").to_pylist())
    return known


def _known_datasets(out: Path, manifest: Manifest) -> dict[tuple[str, str], str]:
    """(dataset_id, config) already in the store or ingested, with the source spec that brought them."""
    spec_by_key = {e.key: e.spec for e in manifest.sources}
    files = [out / "datasets.parquet"] if (out / "datasets.parquet").exists() else []
    files += [p for p in parquet_files(out / "staging") if p.name == "datasets.parquet"]
    known = {}
    for batch in iter_parquet(files, columns=["dataset_id", "config", "source"]):
        for dataset_id, config, key in zip(*(batch.column(c).to_pylist() for c in ("dataset_id", "config", "source"))):
            known[(dataset_id, config)] = spec_by_key.get(key, key)
    return known


class _PartWriter:
    """Buffers rows of one schema and writes numbered parquet parts into a directory."""

    def __init__(self, directory: Path, schema: pa.Schema, rows_per_part: int, prefix: str = "part"):
        self.directory, self.schema, self.rows_per_part, self.prefix = directory, schema, rows_per_part, prefix
        self.buffer: list[dict] = []
        self.parts = 0

    def add(self, record: dict) -> None:
        self.buffer.append(record)
        if len(self.buffer) >= self.rows_per_part:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            table = pa.Table.from_pylist(self.buffer, schema=self.schema)
            write_parquet_atomic(self.directory / f"{self.prefix}-{self.parts:05d}.parquet", table)
            self.parts += 1
            self.buffer = []


def _ingest(
    out: Path,
    source: Source,
    entry: SourceEntry,
    config: DatastoreConfig,
    known_values: set[int],
    known_datasets: dict[tuple[str, str], str],
) -> None:
    """Read a source's datasets; write rows, cells, its dataset table and its pending distinct values."""
    key = entry.key
    staging = out / "staging" / key
    rows = _PartWriter(out / "rows" / key, ROW_SCHEMA, ROWS_PER_PART)
    cells = _PartWriter(out / "cells" / key, CELL_SCHEMA, ROWS_PER_PART * 4)
    pending = _PartWriter(staging / "pending", PENDING_SCHEMA, config.block_rows, prefix="block")
    descriptions: dict[int, str] = {}
    datasets: list[dict] = []
    entry.datasets = entry.rows = entry.cells = entry.new_values = entry.skipped_rows = 0
    problems: list[str] = []
    bar = progress_bar(source.datasets(), desc=f"reading {source.spec}", unit=" datasets")
    for dataset in bar:
        earlier = known_datasets.get((dataset.dataset_id, dataset.config))
        if earlier is not None:
            tqdm.write(f"skipping {dataset.dataset_id}: already in the store from {earlier}", file=sys.stderr)
            continue
        kept, skipped, first_problem = _write_dataset_rows(dataset, config, rows, cells, pending, entry, known_values)
        if kept == 0:
            problems.append(
                f"{dataset.dataset_id}: no readable rows" + (f" ({first_problem})" if first_problem else "")
            )
            continue
        if skipped:
            tqdm.write(
                f"{dataset.dataset_id}: skipped {skipped} malformed row(s), first: {first_problem}", file=sys.stderr
            )
        did = description_id(dataset.description)
        if did not in known_values:
            known_values.add(did)
            descriptions[did] = dataset.description
        datasets.append(
            {
                "dataset_id": dataset.dataset_id,
                "config": dataset.config,
                "description": dataset.description,
                "description_id": did,
                "rows": kept,
                "skipped_rows": skipped,
                "license": dataset.license,
                "source": key,
            }
        )
        known_datasets[(dataset.dataset_id, dataset.config)] = source.spec
        entry.datasets += 1
        entry.rows += kept
        entry.skipped_rows += skipped
        bar.set_postfix(rows=entry.rows, cells=entry.cells, refresh=False)
    bar.close()
    if problems and not datasets:
        raise RebaseError(
            f"{source.spec}: {problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else "")
        )
    for problem in problems:
        tqdm.write(f"warning: {problem}; left out", file=sys.stderr)
    rows.flush()
    cells.flush()
    pending.flush()
    entry.value_blocks = pending.parts
    if descriptions:
        table = pa.Table.from_pylist(
            [{"value_id": i, "kind": "description", "text": t} for i, t in descriptions.items()], schema=PENDING_SCHEMA
        )
        write_parquet_atomic(staging / "pending" / DESCRIPTIONS_BLOCK, table)
    write_parquet_atomic(staging / "datasets.parquet", pa.Table.from_pylist(datasets, schema=DATASET_SCHEMA))


def _write_dataset_rows(
    dataset: Dataset,
    config: DatastoreConfig,
    rows: _PartWriter,
    cells: _PartWriter,
    pending: _PartWriter,
    entry: SourceEntry,
    known_values: set[int],
) -> tuple[int, int, str]:
    """Flatten one dataset's sampled rows into rows and cells, queueing each value not yet stored for
    embedding; the rows kept, the rows skipped and the first reason one was skipped."""
    total = sum(dataset.count())
    labels = dataset.label_names()
    kept = skipped = 0
    first_problem = ""
    for split, number, row, why in dataset.read(even_sample(total, config.rows_per_dataset)):
        flat = flatten_row(row, config.max_value_chars, labels) if row is not None else {}
        if not flat:
            skipped += 1
            first_problem = first_problem or why or f"row {number + 1}: no text values"
            continue
        uid = row_uid(dataset.dataset_id, dataset.config, split, number)
        rows.add(
            {
                "row_uid": uid,
                "dataset_id": dataset.dataset_id,
                "config": dataset.config,
                "split": split,
                "row_number": number,
                "row": json.dumps(flat, ensure_ascii=False),
            }
        )
        for column, text in flat.items():
            vid = value_id(text)
            cells.add(
                {
                    "cell_id": cell_id(uid, column),
                    "row_uid": uid,
                    "dataset_id": dataset.dataset_id,
                    "column": column,
                    "value": text,
                    "value_id": vid,
                }
            )
            entry.cells += 1
            if vid not in known_values:
                known_values.add(vid)
                pending.add({"value_id": vid, "kind": "cell", "text": text})
                entry.new_values += 1
        kept += 1
    return kept, skipped, first_problem


def _values_path(out: Path, pending_block: Path) -> Path:
    return out / "values" / pending_block.parent.parent.name / pending_block.name


def _embed_pending(out: Path, entries: list[SourceEntry], model_path: str, config: DatastoreConfig, gpus: float) -> int:
    pending = [
        block
        for entry in entries
        for block in parquet_files(out / "staging" / entry.key / "pending")
        if not _values_path(out, block).exists()
    ]
    if not pending:
        return 0
    total = sum(parquet_rows(p) for p in pending)
    threads, concurrency = embedding_resources(config, gpus)
    precision.check(config.embed_dtype, bool(gpus), "embedding")
    with progress_bar(total=total, desc="embedding distinct values", unit=" values") as bar:
        return embed_blocks(
            pending,
            lambda block: _values_path(out, block),
            model_path,
            batch_size=config.embed_batch_size,
            max_tokens=config.embed_max_tokens,
            dtype=config.embed_dtype,
            concurrency=concurrency,
            gpus=gpus,
            threads=threads,
            on_block=bar.update,
        )


def embedding_resources(config: DatastoreConfig, gpus: float) -> tuple[int, tuple[int, int]]:
    """Torch threads per CPU actor and the (min, max) actor pool size, from the config or the cluster."""
    import ray

    threads = config.embed_threads or min(4, os.cpu_count() or 1)
    if config.embed_concurrency:
        return threads, config.embed_concurrency
    if gpus:
        return threads, (1, max(1, int(gpus)))
    return threads, (1, max(1, int(ray.cluster_resources().get("CPU", 1)) // threads))


def _build_shards(out: Path, manifest: Manifest, entries: list[SourceEntry], config: DatastoreConfig) -> None:
    """One Ray task per shard: consecutive values blocks of a source, up to `shard_vectors` vectors each."""
    import ray

    from rebase.ray_setup import TASK_RETRIES

    plans = []
    for entry in entries:
        blocks = [b for b in parquet_files(out / "values" / entry.key) if b.name != DESCRIPTIONS_BLOCK]
        done = {shard.file for shard in entry.shards}
        for number, (group, vectors) in enumerate(group_blocks(blocks, config.shard_vectors)):
            file = out / "index" / f"{entry.key}-{number:05d}.faiss"
            if file.name in done and file.exists():
                continue
            kind = resolve_kind(config.index, vectors, config.flat_max_vectors)
            plans.append((entry, [str(b) for b in group], str(file), kind))
    if not plans:
        return
    (out / "index").mkdir(exist_ok=True)
    task = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(build_shard)
    futures = {
        task.remote(blocks, file, kind, manifest.embedder.dimension): entry for entry, blocks, file, kind in plans
    }
    with progress_bar(total=len(futures), desc="building index shards", unit=" shards") as bar:
        remaining = list(futures)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            result = ray.get(ready[0])
            entry = futures[ready[0]]
            entry.shards = [s for s in entry.shards if s.file != result["file"]] + [Shard(**result)]
            entry.shards.sort(key=lambda s: s.file)
            write_manifest(out, manifest)
            bar.update(1)


def _publish_datasets(out: Path, entries: list[SourceEntry], dimension: int) -> None:
    """Append the new sources' datasets, with their description vectors, to `datasets.parquet`."""
    vectors: dict[int, list[float]] = {}
    for block in parquet_files(out / "values"):
        if block.name == DESCRIPTIONS_BLOCK:
            table = pq.read_table(block)
            for vid, vector in zip(
                table.column("value_id").to_pylist(), embeddings_to_numpy(table.column("embedding"), dimension)
            ):
                vectors[vid] = vector
    tables = []
    if (out / "datasets.parquet").exists():
        # Drop rows of these sources first, in case a crash came after an earlier publish.
        existing = pq.read_table(out / "datasets.parquet")
        keep = pa.array([key not in {e.key for e in entries} for key in existing.column("source").to_pylist()])
        tables.append(existing.filter(keep))
    for entry in entries:
        staged = out / "staging" / entry.key / "datasets.parquet"
        if not staged.exists():
            continue
        table = pq.read_table(staged)
        ids = table.column("description_id").to_pylist()
        embedding = pa.array([vectors[i].tolist() for i in ids], type=pa.list_(pa.float32(), dimension))
        tables.append(table.append_column("description_embedding", embedding))
    if tables:
        write_parquet_atomic(out / "datasets.parquet", pa.concat_tables(tables))
