"""FAISS shard building and searching on small hand-made vectors (no Ray)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from rebase.datastore.index import ivf_lists, make_index, resolve_kind, search_shards


def _write(tmp_path, name, vectors, ids, kind="flat"):
    path = tmp_path / name
    faiss.write_index(make_index(kind, vectors, ids), str(path))
    return path


def test_search_merges_shards_and_keeps_negative_ids(tmp_path):
    eye = np.eye(4, dtype=np.float32)
    first = _write(tmp_path, "a.faiss", eye[:2], np.array([-7, 5], np.int64))  # value ids are signed int64
    second = _write(tmp_path, "b.faiss", eye[2:], np.array([-9_000_000_000_000, 11], np.int64))
    query = np.array([[0.1, 0.9, 0.0, 0.5]], np.float32)
    scores, ids = search_shards([first, second], query, k=3)
    assert ids[0].tolist() == [5, 11, -7]  # 0.9, 0.5, 0.1 across both shards
    np.testing.assert_allclose(scores[0], [0.9, 0.5, 0.1], atol=1e-6)
    scores, ids = search_shards([first], query, k=3)  # only 2 vectors: the third result is padding
    assert ids[0].tolist()[:2] == [5, -7] and np.isneginf(scores[0, 2])


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_every_kind_finds_stored_vectors_by_id_and_reconstructs_them(tmp_path, kind):
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(2000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.integers(-(2**62), 2**62, size=2000)
    path = _write(tmp_path, f"{kind}.faiss", vectors, ids, kind)
    _, found = search_shards([path], vectors[:200], k=1)
    assert (found[:, 0] == ids[:200]).mean() >= 0.95
    index = faiss.read_index(str(path))
    np.testing.assert_allclose(index.reconstruct_batch(ids[:5]), vectors[:5], atol=1e-6)


def test_auto_kind_and_ivf_list_count():
    assert resolve_kind("auto", 200_000, 200_000) == "flat"
    assert resolve_kind("auto", 200_001, 200_000) == "ivf"
    assert resolve_kind("hnsw", 10, 200_000) == "hnsw"
    assert ivf_lists(1_000_000) == 4000 and ivf_lists(100) == 2 and ivf_lists(10) == 1
