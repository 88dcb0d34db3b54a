"""Embedding-stage throughput of `rebase datastore build` vs a plain SentenceTransformer.encode loop.

    python benchmarks/embed.py [--tasks T1,T2,...] [--estimate-full]

Both sides embed the same BIG-bench cells with the same model (builtin:minilm) in the same run:
- rebase: a real build (Ray Data actor pool) into a fresh directory; the embedding stage's wall time,
  actor start-up included, embeds each distinct value once;
- baselines: one process, the model loaded once, `encode(texts, batch_size=32)` over every cell, and
  over the distinct values (the texts rebase embeds).
Printed ratios: on the same texts (rebase values/s vs the plain loop over the same distinct values: the
engine alone, every text counted) and per cell (cells covered per second vs a plain loop that embeds every
cell: what distinct-value embedding buys). Peak memory is the largest summed RSS of
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


def run_rebase(tasks: str, out: Path, max_tokens: int | None) -> dict:
    from rebase.config import DatastoreConfig
    from rebase.datastore import build_datastore

    config = DatastoreConfig(sources=[f"bigbench:{tasks}"], out=out, embed_max_tokens=max_tokens)
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=os.environ.get("REBASE_BENCH_TMP")) as tmp:
        out = Path(tmp) / "store"
        rebase = run_rebase(args.tasks, out, args.max_tokens)
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
    if args.estimate_full:
        report["full_bigbench"] = estimate_full(rebase_rate)
    print(json.dumps(report, indent=2))
    print(
        f"embedding stage: x{rebase_rate / distinct_rate:.2f} the plain loop on the same texts "
        f"({rebase_rate:.0f} vs {distinct_rate:.0f} values/s); x{cells_rate / every_cell_rate:.2f} in cells per "
        f"second against a plain loop over every cell ({cells_rate:.0f} vs {every_cell_rate:.0f})"
    )


if __name__ == "__main__":
    main()
