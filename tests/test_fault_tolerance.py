"""Losing a node mid-stage: a simulated three-node Ray cluster (`ray.cluster_utils.Cluster`) builds a datastore,
a worker node hosting an embedding actor is killed while blocks are being embedded and a fresh node joins
(as an autoscaler would replace it), and the build still finishes with every row, cell and value exactly once.

The cluster runs in a subprocess: the test session holds its own local Ray."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from conftest import write_jsonl

SCRIPT = r"""
import json, socket, sys, threading, time
from pathlib import Path

import ray
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

out, data = Path(sys.argv[1]), Path(sys.argv[2])
# A dashboard port of its own: another Ray on this machine (the test session's) may hold the default, and
# the state API below must ask this cluster, not that one.
with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    dashboard_port = sock.getsockname()[1]
cluster = Cluster(
    initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": True, "dashboard_port": dashboard_port}
)
workers = [cluster.add_node(num_cpus=1), cluster.add_node(num_cpus=1)]
cluster.wait_for_nodes()
ray.init(address=cluster.address)

from rebase.config import DatastoreConfig
from rebase.datastore import build_datastore, datastore_info

events = {}


def kill_an_embedding_node():
    # Once a few blocks are written, kill a worker node that hosts a live embedding actor (looking again
    # until one is listed: the state API can lag behind the scheduler).
    values = out / "values"
    while len(list(values.glob("*/block-*.parquet"))) < 3:
        time.sleep(0.05)
    by_id = {node.node_id: node for node in workers}
    while "done" not in events:
        for actor in list_actors(address=cluster.address, filters=[("state", "=", "ALIVE")]):
            if "Embedder" in actor.class_name and actor.node_id in by_id:
                events["blocks_before"] = len(list(values.glob("*/block-*.parquet")))
                cluster.remove_node(by_id[actor.node_id], allow_graceful=False)
                events["removed"] = actor.node_id
                cluster.add_node(num_cpus=1)
                return
        time.sleep(0.2)


killer = threading.Thread(target=kill_an_embedding_node, daemon=True)
killer.start()
config = DatastoreConfig(
    sources=[f"files:{data}"], out=out, block_rows=16, embed_concurrency=(2, 2), embed_threads=1, embed_batch_size=16
)
summary = build_datastore(config)
events["done"] = True
killer.join(timeout=5)
events["blocks_total"] = len(list((out / "values").glob("*/block-*.parquet")))
events["counts"] = datastore_info(out)["counts"]
print("RESULT " + json.dumps(events))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow
def test_datastore_build_survives_losing_an_embedding_node(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"question": f"How many legs do {n} spiders have in total?", "answer": f"{8 * n} legs"} for n in range(700)]
    write_jsonl(data / "spiders.jsonl", rows)
    out = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(out), str(data)], capture_output=True, text=True, timeout=600
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert result.returncode == 0 and lines, result.stdout[-3000:] + result.stderr[-3000:]
    events = json.loads(lines[-1].removeprefix("RESULT "))
    assert "removed" in events, "no worker node hosted an embedding actor to remove"
    assert events["blocks_before"] < events["blocks_total"], "the node was removed after embedding had finished"

    # Every row and cell exactly once, and every distinct value embedded exactly once.
    cells = pq.read_table(out / "cells").to_pylist()
    row_uids = pq.read_table(out / "rows", columns=["row_uid"]).column("row_uid").to_pylist()
    assert len(row_uids) == len(set(row_uids)) == 700
    assert len(cells) == len({c["cell_id"] for c in cells}) == 1400
    values = pq.read_table(list((out / "values").glob("*/block-*.parquet")), columns=["value_id"])
    value_ids = values.column("value_id").to_pylist()
    assert len(value_ids) == len(set(value_ids)) == len({c["value_id"] for c in cells}) == 1400
    assert set(value_ids) == {c["value_id"] for c in cells}
    assert (events["counts"]["rows"], events["counts"]["cells"]) == (700, 1400)
