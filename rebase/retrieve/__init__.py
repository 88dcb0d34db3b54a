"""The retrieve stage (`rebase retrieve`): the top K rows of a datastore for a task by the ReBase score.

score.py holds the pure score and the selection, exact.py the streaming scan of every row, cells.py the
cell map and shards.py the FAISS shard actors of approximate mode; this module reads the config, picks
the mode and writes the retrieved directory (rows.parquet, stats.json, _SUCCESS)."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rebase import decontaminate
from rebase.datastore.manifest import Manifest, check_complete, read_manifest
from rebase.decontaminate import EvalSet, eval_inputs, settings
from rebase.errors import RebaseError
from rebase.io import embeddings_to_numpy, write_parquet_atomic
from rebase.models import canonical_model_name, resolve_model
from rebase.retrieve.exact import exact_candidates
from rebase.retrieve.kinds import row_text, task_kinds, text_kind
from rebase.retrieve.score import Candidates, TaskQuery, apply_bans, best_rows, task_query
from rebase.stage import StageDir
from rebase.task import TaskSpec, is_banned

if TYPE_CHECKING:
    from rebase.config import RetrieveConfig

__all__ = ["RetrieveSummary", "description_similarities", "retrieve", "retrieve_stage"]

_OWN_FILES = frozenset({"rows.parquet", "stats.json", "_SUCCESS"})


@dataclass
class RetrieveSummary:
    """What a retrieval wrote, for its one-line summary."""

    out: Path
    top_k: int
    rows: int
    datasets: int
    top_datasets: list[tuple[str, int]]
    score_range: tuple[float, float]
    seconds: float
    mode: str
    contaminated: int = 0

    def line(self) -> str:
        """The stage's one-line summary."""
        top = ", ".join(f"{d} ({n})" for d, n in self.top_datasets[:5])
        low, high = self.score_range
        copies = f"; {self.contaminated:,} copy an evaluation input (never sent to the teacher)"
        return (
            f"retrieved {self.rows:,} of top-{self.top_k:,} rows ({self.mode}) from {self.datasets} datasets into "
            f"{self.out}; top datasets: {top}; scores {low:.3f} to {high:.3f}"
            f"{copies if self.contaminated else ''}; {self.seconds:.1f} s"
        )


def retrieve_stage(config: RetrieveConfig) -> RetrieveSummary:
    """`retrieve` as `rebase retrieve` and the pipeline's retrieve stage call it: the task read from its file."""
    from rebase.task import load_task

    return retrieve(config, load_task(config.task))


def retrieve(config: RetrieveConfig, task: TaskSpec) -> RetrieveSummary:
    """Retrieve the top K rows of the datastore for `task` (`config.task`, already read) and write the
    retrieved directory; a finished retrieval with the same inputs is recognised and kept.

    Exact mode scores every row, streaming over the store. Approximate mode (default) takes the `depth`
    nearest cell values of each query vector from every index shard in parallel, gathers the rows holding
    them, adds the rows of the datasets whose descriptions are closest to the instruction (`dataset_rows`
    rows in all: a third of the score is the description's, and rows it carries can have no near cell) and
    re-scores those rows exactly. Either way the best `pool_factor * top_k` unbanned rows are kept, then
    duplicates and the per-dataset cap are applied, best first."""
    started = time.monotonic()
    manifest = read_manifest(config.datastore)
    _check_request(config, manifest)
    mode = "exact" if config.exact else "approximate"
    fingerprint = _fingerprint(config, task, manifest)
    stage = StageDir(config.out, "a rebase retrieval", _OWN_FILES)
    done = stage.check(fingerprint)
    if done is not None:
        return RetrieveSummary(
            out=config.out,
            top_k=config.top_k,
            rows=done["rows"],
            datasets=len(done["datasets"]),
            top_datasets=list(done["datasets"].items()),
            score_range=tuple(done["score_range"]),
            seconds=time.monotonic() - started,
            mode=f"{mode}, already done",
            contaminated=(done.get("contamination") or {}).get("contaminated", 0),
        )
    encode = _encoder(manifest)
    query = task_query(task, encode)
    similarities = description_similarities(config.datastore, query, manifest.embedder.dimension)
    for ban in task.ban:
        if not any(is_banned(d, [ban]) for d in similarities):
            print(f"warning: ban '{ban}' matches no dataset in {config.datastore}", file=sys.stderr)
    candidates = _candidates(config, query, apply_bans(similarities, task.ban), manifest.embedder.dimension)
    if not len(candidates):
        raise RebaseError(f"every row of {config.datastore} is banned by the task; nothing to retrieve")
    # The rows' text, read in one pass: for every candidate when their kind is checked, else for the kept ones.
    texts = _row_texts(config.datastore, candidates.row_uid.tolist()) if config.match_kind else {}
    kinds, off_kind = sorted(task_kinds(task)), 0
    if config.match_kind:
        keep = np.array([text_kind(row_text(texts[uid])) in kinds for uid in candidates.row_uid.tolist()], bool)
        candidates, off_kind = candidates.take(keep), int((~keep).sum())
        if not len(candidates):
            raise RebaseError(f"no row of {config.datastore} is of the kind of the task's inputs ({', '.join(kinds)})")
    selected = best_rows(candidates, config.top_k, config.per_dataset_cap)
    texts = texts or _row_texts(config.datastore, selected.row_uid.tolist())
    contamination, contaminated = _contamination(config, task, encode, [texts[u] for u in selected.row_uid.tolist()])
    top_datasets = Counter(selected.dataset_id.tolist()).most_common()
    score_range = (float(selected.score.min()), float(selected.score.max()))
    stats = {
        "task": task.name,
        "datastore": str(config.datastore),
        "top_k": config.top_k,
        "per_dataset_cap": config.per_dataset_cap,
        "mode": mode,
        "depth": None if config.exact else config.depth,
        "dataset_rows": None if config.exact else config.dataset_rows,
        "ban": task.ban,
        "match_kind": config.match_kind,
        "kinds": kinds,
        "off_kind": off_kind,
        "contamination": contamination,
        "rows": len(selected),
        "datasets": dict(top_datasets),
        "score_range": score_range,
        "fingerprint": fingerprint,
        "seconds": round(time.monotonic() - started, 2),
    }
    with stage.writing():
        _write_retrieved(texts, stage, selected, stats, contaminated)
    seconds = time.monotonic() - started
    return RetrieveSummary(
        config.out,
        config.top_k,
        len(selected),
        len(top_datasets),
        top_datasets,
        score_range,
        seconds,
        mode,
        contamination.get("contaminated", 0),
    )


def _check_request(config: RetrieveConfig, manifest: Manifest) -> None:
    """Refuse an embedder other than the datastore's and a top K larger than the datastore."""
    if config.embedder is not None and canonical_model_name(config.embedder) != manifest.embedder.name:
        raise RebaseError(
            f"{config.datastore} was built with embedder '{manifest.embedder.name}', not '{config.embedder}'; "
            "retrieve with the datastore's embedder"
        )
    check_complete(config.datastore, manifest)
    total_rows = manifest.counts()["rows"]
    if config.top_k > total_rows:
        raise RebaseError(f"--top-k {config.top_k} is larger than the datastore ({total_rows} rows)")


def _fingerprint(config: RetrieveConfig, task: TaskSpec, manifest: Manifest) -> str:
    """What the retrieved rows depend on: the task, the datastore and its last update, the settings."""
    exact = config.exact
    inputs = [
        task.model_dump(mode="json"),
        str(config.datastore.resolve()),
        manifest.updated,
        config.top_k,
        config.per_dataset_cap,
        "exact" if exact else "approximate",
        None if exact else config.depth,
        config.pool_factor,
        None if exact else config.dataset_rows,
        *(["match_kind"] if config.match_kind else []),  # absent when off: retrievals made before stay valid
        *([settings(config)] if config.decontaminate else []),
    ]
    return hashlib.sha256(json.dumps(inputs).encode()).hexdigest()


def _encoder(manifest: Manifest) -> Callable[[list[str]], np.ndarray]:
    """Texts -> unit vectors with the datastore's embedder (the task's queries, the decontamination)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(resolve_model(manifest.embedder.name)), device=None)
    return lambda texts: model.encode(texts, normalize_embeddings=True, convert_to_numpy=True)


def _contamination(
    config: RetrieveConfig, task: TaskSpec, encode: Callable[[list[str]], np.ndarray], rows: list[str]
) -> tuple[dict, list[str | None]]:
    """Each kept row compared with the task's evaluation set: its stats and, per row, why it matches or
    None. A row matches when its text (its values joined) shares a long n-gram with an evaluation input, or
    one of its values is a near-duplicate of one."""
    if not config.decontaminate:
        return {"checked": False, "why": "decontamination is off"}, [None] * len(rows)
    inputs = eval_inputs(task)
    if not inputs:
        return decontaminate.summary(None, []), [None] * len(rows)
    eval_set = EvalSet.build(inputs, encode, config.contamination_ngram, config.contamination_similarity)
    reasons = eval_set.match_rows(rows, encode)
    return decontaminate.summary(eval_set, reasons), reasons


def description_similarities(datastore: Path, query: TaskQuery, dimension: int) -> dict[str, float]:
    """Each dataset's description similarity to the task's instruction, the third partial score."""
    datasets = pq.read_table(datastore / "datasets.parquet", columns=["dataset_id", "description_embedding"])
    vectors = embeddings_to_numpy(datasets.column("description_embedding"), dimension)
    return dict(zip(datasets.column("dataset_id").to_pylist(), (vectors @ query.instruction).tolist()))


def _candidates(
    config: RetrieveConfig, query: TaskQuery, description_by_id: dict[str, float], dimension: int
) -> Candidates:
    """The best `pool_factor * top_k` rows of unbanned datasets, by the mode the config asks for."""
    limit = config.pool_factor * config.top_k
    if config.exact:
        return exact_candidates(config.datastore, query, description_by_id, limit, dimension)
    from rebase.retrieve.shards import ApproximateIndex

    # the score bound assumes every candidate can be kept: no cap, and no rows left out for their kind
    keep = config.top_k if config.per_dataset_cap is None and not config.match_kind else None
    with ApproximateIndex(config.datastore) as index:
        return index.candidates(query, description_by_id, limit, config.depth, config.dataset_rows, keep)


def _row_texts(datastore: Path, row_uids: list[str]) -> dict[str, str]:
    """The stored rows (JSON objects) of these row ids, read in one pass over the datastore's rows."""
    uids = pa.array(row_uids, pa.string())
    rows: dict[str, str] = {}
    for path in sorted((datastore / "rows").rglob("*.parquet")):
        table = pq.read_table(path, columns=["row_uid", "row"])
        table = table.filter(pc.is_in(table.column("row_uid"), value_set=uids))
        rows.update(zip(table.column("row_uid").to_pylist(), table.column("row").to_pylist()))
    return rows


def _write_retrieved(
    rows: dict[str, str], stage: StageDir, selected: Candidates, stats: dict, contaminated: list[str | None]
) -> None:
    """The retrieved directory: rows.parquet (rank, ids, the three partial scores, the row, whether and why
    it copies an evaluation input), stats.json."""
    uids = pa.array(selected.row_uid.tolist(), pa.string())
    table = pa.table(
        {
            "rank": pa.array(np.arange(1, len(uids) + 1), pa.int64()),
            "row_uid": uids,
            "dataset_id": pa.array(selected.dataset_id.tolist(), pa.string()),
            "score": pa.array(selected.score, pa.float32()),
            "input_score": pa.array(selected.input, pa.float32()),
            "output_score": pa.array(selected.output, pa.float32()),
            "description_score": pa.array(selected.description, pa.float32()),
            "row": pa.array([rows[u] for u in uids.to_pylist()], pa.string()),
            "contaminated": pa.array([reason is not None for reason in contaminated], pa.bool_()),
            "contamination": pa.array(contaminated, pa.string()),
        }
    )
    stage.begin(stats["fingerprint"])
    write_parquet_atomic(stage.path / "rows.parquet", table)
    stage.finish(stats)
