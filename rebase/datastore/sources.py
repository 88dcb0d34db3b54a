"""Datastore sources: parse a SPEC and yield datasets whose rows can be sampled and read.

`bigbench[:task,...]` reads BIG-bench task.json files straight from the PyPI sdist archive,
`files:PATH_OR_GLOB` reads local parquet/jsonl/csv, and `hf:DATASET_ID[:CONFIG]` reads the Hub's
parquet export through `hf://` with the same file readers.
"""

from __future__ import annotations

import csv
import difflib
import glob
import hashlib
import io
import json
import os
import tarfile
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from rebase.errors import RebaseError
from rebase.io import cache_dir, write_json_atomic
from rebase.progress import progress_bar

BIGBENCH_VERSION = "1.0.0"
BIGBENCH_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"
BIGBENCH_FILE = f"bigbench-{BIGBENCH_VERSION}.tar.gz"
BIGBENCH_TASKS_DIR = f"bigbench-{BIGBENCH_VERSION}/bigbench/benchmark_tasks/"
FILE_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}
SOURCE_KINDS = "bigbench[:task,...], files:PATH_OR_GLOB or hf:DATASET_ID[:CONFIG]"


@dataclass
class RowFile:
    """One file of rows (local or through fsspec), readable by row number."""

    path: str
    format: str
    split: str = "train"
    fs: Any = None  # an fsspec filesystem; None means the local disk

    def open(self, mode: str = "rb"):
        if self.fs is not None:
            return self.fs.open(self.path, mode)
        return open(self.path, mode)  # noqa: SIM115 - the caller closes it

    def count(self) -> int:
        if self.format == "parquet":
            with self.open() as handle:
                return pq.ParquetFile(handle).metadata.num_rows
        if self.format == "csv":
            return sum(1 for _ in self._csv_records()[1])
        with self.open() as handle:
            return sum(1 for line in handle if line.strip())

    def label_names(self) -> dict[str, list[str]]:
        """Class-label names from the `huggingface` schema metadata that Hub parquet files carry."""
        if self.format != "parquet":
            return {}
        with self.open() as handle:
            metadata = pq.ParquetFile(handle).schema_arrow.metadata or {}
        try:
            features = json.loads(metadata[b"huggingface"])["info"]["features"]
        except (KeyError, ValueError, TypeError):
            return {}
        names = {}
        for name, feature in features.items():
            if isinstance(feature, dict) and feature.get("_type") in ("Sequence", "List"):
                feature = feature.get("feature")  # a list of labels, as in multi-label datasets
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and "names" in feature:
                names[name] = feature["names"]
        return names

    def read(self, wanted: set[int]) -> Iterator[tuple[int, dict | None, str]]:
        """Yield (row number, row or None if malformed, why) for the wanted row numbers, in order."""
        reader = {"parquet": self._read_parquet, "jsonl": self._read_jsonl, "csv": self._read_csv}[self.format]
        yield from reader(wanted)

    def _read_parquet(self, wanted: set[int]):
        number = 0
        with self.open() as handle:
            for batch in pq.ParquetFile(handle).iter_batches(batch_size=4096):
                end = number + batch.num_rows
                if any(number <= n < end for n in wanted):
                    for offset, row in enumerate(batch.to_pylist()):
                        if number + offset in wanted:
                            yield number + offset, row, ""
                number = end

    def _read_jsonl(self, wanted: set[int]):
        number = 0
        with self.open() as handle:
            for line_number, raw in enumerate(handle, start=1):
                line = raw.strip()
                if not line:
                    continue
                if number in wanted:
                    try:
                        row = json.loads(line)
                    except ValueError as error:  # also UnicodeDecodeError
                        reason = getattr(error, "msg", None) or getattr(error, "reason", None) or str(error)
                        yield number, None, f"line {line_number}: not JSON ({reason})"
                    else:
                        if isinstance(row, dict):
                            yield number, row, ""
                        else:
                            yield number, None, f"line {line_number}: a JSON {type(row).__name__}, not an object"
                number += 1

    def _read_csv(self, wanted: set[int]):
        header, records = self._csv_records()
        for number, record in enumerate(records):
            if number in wanted:
                if len(record) != len(header):
                    yield number, None, f"row {number + 1}: {len(record)} fields, header has {len(header)}"
                else:
                    yield number, dict(zip(header, record)), ""

    def _csv_records(self) -> tuple[list[str], Iterator[list[str]]]:
        """The checked header and a stream of the non-blank records after it (quoted newlines allowed)."""
        handle = self.open()
        text = io.TextIOWrapper(handle, encoding="utf-8-sig", newline="")  # -sig: Excel's byte order mark
        reader = csv.reader(text)
        try:
            header = [name.strip() for name in next(reader, None) or []]
        except UnicodeDecodeError:
            text.close()
            raise RebaseError(f"{self.path}: not UTF-8 text; save it as UTF-8") from None
        check_csv_header(self.path, header)

        def records() -> Iterator[list[str]]:
            with text:
                try:
                    for record in reader:
                        if any(cell.strip() for cell in record):
                            yield record
                except UnicodeDecodeError:
                    raise RebaseError(f"{self.path}: not UTF-8 text; save it as UTF-8") from None

        return header, records()


def check_csv_header(path: str, header: list[str]) -> None:
    """A CSV must start with a header row of distinct, non-empty, non-numeric names."""
    names = [name.strip() for name in header]

    def numeric(name: str) -> bool:
        try:
            float(name)
        except ValueError:
            return False
        return True

    if not names or any(not name or numeric(name) for name in names) or len(set(names)) != len(names):
        raise RebaseError(
            f"{path}: the first line does not look like a header (names must be distinct, non-empty and "
            "not numbers); add a header row"
        )


@dataclass
class Dataset:
    """One dataset (config) of a source: its identity, description and the files holding its rows."""

    dataset_id: str
    config: str
    description: str
    license: str
    files: list[RowFile] = field(default_factory=list)
    rows: list[tuple[str, dict]] | None = None  # in-memory rows (split, row), e.g. from a BIG-bench task
    # every answer each in-memory row accepts, where the source says (BIG-bench's target lists); for evaluation
    references: list[list[str]] | None = None

    def count(self) -> list[int]:
        if self.rows is not None:
            return [len(self.rows)]
        return [f.count() for f in self.files]

    def label_names(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {}
        for f in self.files[:1]:
            names.update(f.label_names())
        return names

    def read(self, wanted: list[int]) -> Iterator[tuple[str, int, dict | None, str]]:
        """Yield (split, row number within split, row or None, why malformed) for global row numbers."""
        wanted_set = set(wanted)
        if self.rows is not None:
            for number in wanted:
                split, row = self.rows[number]
                yield split, number, row, ""
            return
        start = 0
        for f, size in zip(self.files, self.count()):
            local = {n - start for n in wanted_set if start <= n < start + size}
            if local:
                for number, row, why in f.read(local):
                    yield f.split, number, row, why
            start += size


@dataclass
class Source:
    """A parsed SPEC: a fingerprint of its content (so a rebuild knows what is new) and its datasets."""

    spec: str
    kind: str
    fingerprint: str
    datasets: Callable[[], Iterator[Dataset]]


def open_source(spec: str, description: str | None = None) -> Source:
    """Parse and check one SPEC; missing or empty inputs fail here, before any work."""
    kind, _, argument = spec.partition(":")
    if kind == "bigbench":
        return _bigbench_source(spec, argument)
    if kind == "files":
        return _files_source(spec, argument, description)
    if kind == "hf":
        return _hf_source(spec, argument)
    raise RebaseError(f"unknown source kind '{kind}' in '{spec}'; use {SOURCE_KINDS}")


# ---------------------------------------------------------------- BIG-bench


def bigbench_archive() -> Path:
    """The BIG-bench sdist: $REBASE_BIGBENCH_ARCHIVE, else the cache, else downloaded from PyPI once."""
    configured = os.environ.get("REBASE_BIGBENCH_ARCHIVE")
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise RebaseError(f"REBASE_BIGBENCH_ARCHIVE points to {path}, which is not a file")
        return path
    path = cache_dir() / "downloads" / BIGBENCH_FILE
    if not path.exists():
        _download_bigbench(path)
    return path


def _download_bigbench(path: Path) -> None:
    # `pip download --no-deps bigbench==1.0.0` fails on pip >= 24 (the sdist declares a direct-URL
    # dependency), so read the file's address and hash from PyPI's simple index and fetch it ourselves.
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    request = urllib.request.Request(f"{index}/bigbench/", headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            files = json.load(response)["files"]
        entry = next(f for f in files if f["filename"] == BIGBENCH_FILE)
    except Exception as error:
        raise RebaseError(
            f"could not find {BIGBENCH_FILE} on the package index {index} ({type(error).__name__}); "
            "download it and set REBASE_BIGBENCH_ARCHIVE to its path"
        ) from None
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(entry["url"], timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with progress_bar(total=total, unit="B", unit_scale=True, desc=f"downloading {BIGBENCH_FILE}") as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise RebaseError(f"downloading {BIGBENCH_FILE} failed: {error}") from None
    if digest.hexdigest() != BIGBENCH_SHA256:
        partial.unlink(missing_ok=True)
        raise RebaseError(f"{BIGBENCH_FILE} from {index} has the wrong sha256; refusing to use it")
    os.replace(partial, path)


def _bigbench_task_names(archive: Path) -> list[str]:
    """Names of the task.json files in the archive ('task' or 'task/subtask'), cached beside it."""
    listing = archive.with_name(archive.name + ".tasks.json")
    stat = archive.stat()
    key = f"{stat.st_size}:{stat.st_mtime_ns}"
    if listing.exists():
        cached = json.loads(listing.read_text())
        if cached.get("key") == key:
            return cached["tasks"]
    with tarfile.open(archive) as tar:
        names = [_task_name(m.name) for m in tar if _task_name(m.name)]
    write_json_atomic(listing, {"key": key, "tasks": sorted(names)})
    return sorted(names)


def _task_name(member: str) -> str | None:
    if member.startswith(BIGBENCH_TASKS_DIR) and member.endswith("/task.json"):
        return member[len(BIGBENCH_TASKS_DIR) : -len("/task.json")]
    return None


def _bigbench_source(spec: str, argument: str) -> Source:
    archive = bigbench_archive()
    names = _bigbench_task_names(archive)
    requested = [t.strip().strip("/") for t in argument.split(",") if t.strip()] if argument else []
    if argument and not requested:
        raise RebaseError(f"'{spec}' names no task; use bigbench or bigbench:task1,task2")
    selected: set[str] = set()
    for task in requested:
        matches = [n for n in names if n == task or n.startswith(task + "/")]
        if not matches:
            close = difflib.get_close_matches(task, sorted({n.split("/")[0] for n in names}), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise RebaseError(f"BIG-bench has no task '{task}'{hint}")
        selected.update(matches)
    selection = sorted(selected) if requested else None
    fingerprint = hashlib.sha256(f"{BIGBENCH_SHA256}|{json.dumps(selection)}".encode()).hexdigest()
    return Source(spec, "bigbench", fingerprint, lambda: _bigbench_datasets(archive, selection))


def _bigbench_datasets(archive: Path, selection: list[str] | None) -> Iterator[Dataset]:
    wanted = set(selection) if selection is not None else None
    descriptions: dict[str, str] = {}
    with tarfile.open(archive) as tar:
        for member in tar:
            name = _task_name(member.name)
            if name is None or (wanted is not None and name not in wanted and "/" in name):
                continue
            task = json.load(tar.extractfile(member))
            description = str(task.get("description") or "").strip()
            if "/" not in name:
                descriptions[name] = description
            if wanted is not None and name not in wanted:
                continue
            examples = task.get("examples") or []
            if not examples:
                continue  # a parent task whose examples live in its subtasks
            parent = name.split("/")[0]
            yield Dataset(
                dataset_id=f"bigbench/{name}",
                config="default",
                description=description or descriptions.get(parent, "") or name,
                license="Apache-2.0",
                rows=[("train", bigbench_row(example)) for example in examples],
                references=[bigbench_references(example) for example in examples],
            )


def bigbench_row(example: dict) -> dict:
    """A BIG-bench example as a row: input, output (the target, or the best-scoring choice), choices."""
    row: dict[str, Any] = {"input": example.get("input")}
    target = example.get("target")
    scores = example.get("target_scores") or {}
    if isinstance(target, list):
        target = target[0] if target else None
    if target is None and scores:
        best = max(scores.values())
        target = next(choice for choice, score in scores.items() if score == best)
    row["output"] = target
    if scores:
        row["choices"] = list(scores)
    return row


def bigbench_references(example: dict) -> list[str]:
    """Every answer a BIG-bench example accepts: each of its targets (object_counting's ["three", "3"]),
    else every choice with the top score."""
    target = example.get("target")
    targets = target if isinstance(target, list) else [] if target is None else [target]
    found = [str(t).strip() for t in targets if t is not None and str(t).strip()]
    scores = example.get("target_scores") or {}
    if not found and scores:
        best = max(scores.values())
        found = [str(choice).strip() for choice, score in scores.items() if score == best]
    return found


# ---------------------------------------------------------------- local files


def _files_source(spec: str, pattern: str, description: str | None) -> Source:
    if not pattern:
        raise RebaseError(f"'{spec}' names no path; use files:PATH_OR_GLOB")
    path = Path(pattern).expanduser()
    if path.is_file():
        if path.suffix.lower() not in FILE_FORMATS:
            raise RebaseError(f"{path}: unsupported file type; use parquet, jsonl or csv")
        matches = [path]
    else:
        # A folder or a glob takes the data files it holds and leaves the rest (sidecars, READMEs).
        found = path.rglob("*") if path.is_dir() else map(Path, glob.glob(str(path), recursive=True))
        matches = sorted(p for p in found if p.is_file() and p.suffix.lower() in FILE_FORMATS)
    if not matches:
        raise RebaseError(f"{spec}: no parquet, jsonl or csv file matches {pattern}")
    for match in matches:
        if match.stat().st_size == 0:
            raise RebaseError(f"{match}: the file is empty")
    digest = hashlib.sha256()
    for match in matches:
        digest.update(str(match.resolve()).encode() + b"\0")
        with open(match, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    digest.update(f"\0{description}".encode())
    for sidecar in sorted({s for match in matches for s in _sidecars(match) if s.is_file()}):
        digest.update(b"\0" + sidecar.read_bytes())  # an edited description is a changed source
    ids = file_dataset_ids(matches)
    return Source(spec, "files", digest.hexdigest(), lambda: _file_datasets(matches, ids, description))


def file_dataset_ids(paths: list[Path]) -> list[str]:
    """`files/<stem>` per file, with parent folders added until the ids are unique."""
    for keep_suffix in (False, True):  # data.csv beside data.jsonl: ids keep their extensions
        parts = [list((p.resolve() if keep_suffix else p.resolve().with_suffix("")).parts) for p in paths]
        for depth in range(1, max(len(p) for p in parts) + 1):
            ids = ["/".join(p[-depth:]) for p in parts]
            if len(set(ids)) == len(ids):
                return [f"files/{i}" for i in ids]
    raise RebaseError("the same file is named twice")


def _sidecars(path: Path) -> list[Path]:
    """Where a file's description may be, first match wins: `<file>.description.txt`, `description.txt`."""
    return [path.with_name(path.name + ".description.txt"), path.with_name("description.txt")]


def _file_datasets(paths: list[Path], ids: list[str], description: str | None) -> Iterator[Dataset]:
    for path, dataset_id in zip(paths, ids):
        text = next((s.read_text().strip() for s in _sidecars(path) if s.is_file()), None) or description
        yield Dataset(
            dataset_id=dataset_id,
            config="default",
            description=text or dataset_id.removeprefix("files/"),
            license="",
            files=[RowFile(str(path), FILE_FORMATS[path.suffix.lower()])],
        )


# ---------------------------------------------------------------- Hugging Face Hub


def hub_filesystem():
    """The Hub as an fsspec filesystem (`hf://`); the one place that talks to the Hub."""
    from huggingface_hub import HfFileSystem

    return HfFileSystem()


def _hf_source(spec: str, argument: str) -> Source:
    dataset, _, config = argument.partition(":")
    if not dataset:
        raise RebaseError(f"'{spec}' names no dataset; use hf:DATASET_ID[:CONFIG]")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise RebaseError(f"{spec}: HF_HUB_OFFLINE is set, so the Hugging Face Hub cannot be read")
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "10")
    root = f"datasets/{dataset}@refs%2Fconvert%2Fparquet"
    try:
        fs = hub_filesystem()
        files = sorted(fs.glob(f"{root}/{config or '*'}/*/*.parquet"))
        # A commit id makes the fingerprint change exactly when the dataset does.
        revision = fs.resolve_path(root).revision
    except Exception as error:
        raise RebaseError(
            f"{spec}: cannot read the Hugging Face Hub ({type(error).__name__}: {str(error)[:120]}); "
            "check the network or the dataset id"
        ) from None
    if not files:
        raise RebaseError(f"{spec}: the Hub has no parquet files for this dataset{' config' if config else ''}")
    fingerprint = hashlib.sha256(f"{dataset}|{config}|{revision}|{files}".encode()).hexdigest()
    return Source(spec, "hf", fingerprint, lambda: _hf_datasets(fs, dataset, root, files))


def _hf_datasets(fs, dataset: str, root: str, files: list[str]) -> Iterator[Dataset]:
    by_config: dict[str, list[RowFile]] = {}
    for path in files:
        config, split = path[len(root) + 1 :].split("/")[:2]
        by_config.setdefault(config, []).append(RowFile(path, "parquet", split=split, fs=fs))
    description = _hf_description(dataset)
    for config, row_files in sorted(by_config.items()):
        yield Dataset(f"hf/{dataset}", config, description, "", files=row_files)


def _hf_description(dataset: str) -> str:
    try:
        from huggingface_hub import HfApi

        info = HfApi().dataset_info(dataset)
        return (getattr(info, "description", None) or dataset).strip()
    except Exception:
        return dataset
