"""Embedding-stage throughput of `rebase datastore build` vs a plain SentenceTransformer.encode loop.

    python benchmarks/embed.py [--tasks T1,T2,...] [--estimate-full] [--skip-float32]

Both sides embed the same BIG-bench cells with the same model (builtin:minilm) in the same run:
- rebase: a real build (Ray Data actor pool) into a fresh directory; the embedding stage's wall time,
  actor start-up included, embeds each distinct value once; at the default precision (`embed_dtype:
  auto`, bfloat16 on a CPU with native bf16) and, beside it, at `embed_dtype: float32`;
- baselines: one process, the model loaded once, `encode(texts, batch_size=32)` over every cell, and
  over the distinct values (the texts rebase embeds).
Printed ratios: on the same texts (rebase values/s vs the plain loop over the same distinct values: the
engine alone, every text counted) and per cell (cells covered per second vs a plain loop that embeds every
cell: what distinct-value embedding and the precision buy). Quality of the default precision against
float32: for every shipped task (jobs/tasks/*.yaml), the share of the top 1,000 rows (exact mode) that
both stores retrieve (target at least 0.95). Peak memory is the largest summed RSS of
the process and all its descendants (Ray's raylet, GCS and workers for rebase). `--estimate-full` also
ingests all of BIG-bench (1,000 rows per dataset, no embedding) to report its size and projected time.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peak_memory import PeakMemory  # benchmarks/ is on sys.path when run as a script

REPO = Path(__file__).resolve().parent.parent

DEFAULT_TASKS = (
    "navigate,date_understanding,sports_understanding,logical_deduction,causal_judgment,"
    "disambiguation_qa,hyperbaton,movie_recommendation,snarks,temporal_sequences,tracking_shuffled_objects"
)


PLAIN_LOOP = r"""
import json, sys, time, resource
import pyarrow.parquet as pq
from pathlib import Path
t0 = time.monotonic()
from sentence_transformers import SentenceTransformer
from rebase.models import resolve_model
model = SentenceTransformer(str(resolve_model("builtin:minilm")), device="cpu")
if sys.argv[3] != "none":
    model.max_seq_length = int(sys.argv[3])
loaded = time.monotonic() - t0
texts = []
for path in sorted(Path(sys.argv[1]).glob("cells/*/*.parquet")):
    texts += pq.read_table(path, columns=["value"]).column("value").to_pylist()
if sys.argv[2] == "distinct":
    texts = list(dict.fromkeys(texts))
t1 = time.monotonic()
model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
encode = time.monotonic() - t1
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"texts": len(texts), "load_seconds": loaded, "encode_seconds": encode, "peak_rss": peak}))
"""


def run_rebase(tasks: str, out: Path, max_tokens: int | None, dtype: str) -> dict:
    from rebase.config import DatastoreConfig
    from rebase.datastore import build_datastore

    config = DatastoreConfig(sources=[f"bigbench:{tasks}"], out=out, embed_max_tokens=max_tokens, embed_dtype=dtype)
    with PeakMemory() as memory:
        summary = build_datastore(config)
    import ray

    ray.shutdown()
    return {
        "cells": summary.counts["cells"],
        "embedded": summary.embedded,
        "stage_seconds": summary.stage_seconds,
        "total_seconds": summary.seconds,
        "peak_rss": memory.peak,
    }


def run_plain(out: Path, texts: str, max_tokens: int | None) -> dict:
    """The baseline in its own process: `texts` is "cells" (every cell) or "distinct" (each value once)."""
    command = [sys.executable, "-c", PLAIN_LOOP, str(out), texts, str(max_tokens or "none")]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def top_rows_overlap(default: Path, float32: Path, top_k: int) -> dict[str, float]:
    """Per shipped task: the share of the top `top_k` rows (exact scores) that both stores retrieve."""
    import pyarrow.parquet as pq

    import rebase

    overlaps = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("REBASE_BENCH_TMP")) as tmp:
        for task in sorted((REPO / "jobs" / "tasks").glob("*.yaml")):
            found = []
            for name, store in (("default", default), ("float32", float32)):
                out = Path(tmp) / f"{task.stem}-{name}"
                rebase.retrieve(store, task, out, top_k=top_k, exact=True)
                found.append(set(pq.read_table(out / "rows.parquet", columns=["row_uid"]).column(0).to_pylist()))
            overlaps[task.stem] = round(len(found[0] & found[1]) / max(len(found[1]), 1), 4)
    return overlaps


def estimate_full(rate: float) -> dict:
    """Ingest every BIG-bench task (no embedding) and project the embedding time at the measured rate."""
    from rebase.config import DatastoreConfig
    from rebase.datastore.build import _ingest
    from rebase.datastore.manifest import SourceEntry
    from rebase.datastore.sources import open_source

    with tempfile.TemporaryDirectory(dir=os.environ.get("REBASE_BENCH_TMP")) as tmp:
        config = DatastoreConfig(sources=["bigbench"], out=Path(tmp))
        source = open_source("bigbench")
        entry = SourceEntry(spec="bigbench", kind="bigbench", fingerprint=source.fingerprint, key="full")
        started = time.monotonic()
        _ingest(Path(tmp), source, entry, config, set(), {})
        seconds = time.monotonic() - started
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*") if p.is_file())
    vectors_bytes = entry.new_values * 384 * 4 * 2  # values blocks + flat index
    return {
        "datasets": entry.datasets,
        "rows": entry.rows,
        "cells": entry.cells,
        "distinct_values": entry.new_values,
        "ingest_seconds": round(seconds, 1),
        "rows_and_cells_mb": round(size / 1e6, 1),
        "projected_vectors_mb": round(vectors_bytes / 1e6, 1),
        "projected_embed_hours_here": round(entry.new_values / rate / 3600, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default=DEFAULT_TASKS)
    parser.add_argument("--estimate-full", action="store_true")
    parser.add_argument("--max-tokens", type=int, default=None, help="embed_max_tokens, the same on both sides")
    parser.add_argument("--skip-float32", action="store_true", help="no float32 build and no retrieval overlap")
    parser.add_argument("--top-k", type=int, default=1000, help="rows compared per shipped task")
    args = parser.parse_args()
    from rebase import precision

    with tempfile.TemporaryDirectory(dir=os.environ.get("REBASE_BENCH_TMP")) as tmp:
        out = Path(tmp) / "store"
        rebase = run_rebase(args.tasks, out, args.max_tokens, "auto")
        print("rebase, embed_dtype auto", json.dumps(rebase), flush=True)
        if not args.skip_float32:
            rebase_fp32 = run_rebase(args.tasks, Path(tmp) / "store-fp32", args.max_tokens, "float32")
            print("rebase, embed_dtype float32", json.dumps(rebase_fp32), flush=True)
            overlaps = top_rows_overlap(out, Path(tmp) / "store-fp32", args.top_k)
            import ray

            ray.shutdown()
        plain_cells = run_plain(out, "cells", args.max_tokens)
        plain_distinct = run_plain(out, "distinct", args.max_tokens)
    embed_seconds = rebase["stage_seconds"]["embed"]
    rebase_rate = rebase["embedded"] / embed_seconds
    cells_rate = rebase["cells"] / embed_seconds
    distinct_rate = plain_distinct["texts"] / plain_distinct["encode_seconds"]
    every_cell_rate = plain_cells["texts"] / plain_cells["encode_seconds"]
    report = {
        "tasks": args.tasks,
        "embed_max_tokens": args.max_tokens,
        "default_precision": precision.resolve("auto", "cpu"),
        "cells": rebase["cells"],
        "distinct_values_embedded": rebase["embedded"],
        "rebase_stage_seconds": {k: round(v, 1) for k, v in rebase["stage_seconds"].items()},
        "plain_every_cell_encode_seconds": round(plain_cells["encode_seconds"], 1),
        "plain_distinct_encode_seconds": round(plain_distinct["encode_seconds"], 1),
        "plain_model_load_seconds": round(plain_cells["load_seconds"], 1),
        "rebase_values_per_s": round(rebase_rate, 1),
        "plain_distinct_values_per_s": round(distinct_rate, 1),
        "rebase_cells_per_s": round(cells_rate, 1),
        "plain_every_cell_cells_per_s": round(every_cell_rate, 1),
        "ratio_same_texts": round(rebase_rate / distinct_rate, 2),
        "ratio_cells_per_s_with_distinct_values": round(cells_rate / every_cell_rate, 2),
        "rebase_peak_rss_mb": round(rebase["peak_rss"] / 1e6),
        "plain_peak_rss_mb": round(plain_cells["peak_rss"] / 1e6),
    }
    if not args.skip_float32:
        fp32_seconds = rebase_fp32["stage_seconds"]["embed"]
        report["float32_stage_seconds"] = {k: round(v, 1) for k, v in rebase_fp32["stage_seconds"].items()}
        report["float32_cells_per_s"] = round(rebase_fp32["cells"] / fp32_seconds, 1)
        report["ratio_default_vs_float32_stage"] = round(fp32_seconds / embed_seconds, 2)
        report[f"top_{args.top_k}_rows_overlap_default_vs_float32"] = overlaps
    if args.estimate_full:
        report["full_bigbench"] = estimate_full(rebase_rate)
    print(json.dumps(report, indent=2))
    print(
        f"embedding stage: x{rebase_rate / distinct_rate:.2f} the plain loop on the same texts "
        f"({rebase_rate:.0f} vs {distinct_rate:.0f} values/s); x{cells_rate / every_cell_rate:.2f} in cells per "
        f"second against a plain loop over every cell ({cells_rate:.0f} vs {every_cell_rate:.0f}), at precision "
        f"{report['default_precision']}"
    )
    if not args.skip_float32:
        print(
            f"default vs float32 embedding stage: x{report['ratio_default_vs_float32_stage']:.2f}; top-{args.top_k} "
            f"rows in common, lowest over the shipped tasks: {min(overlaps.values()):.3f} (target at least 0.95)"
        )


if __name__ == "__main__":
    main()
