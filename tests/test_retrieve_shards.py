"""The FAISS shard searcher (rebase/retrieve/shards.py) on real FAISS indexes of every kind."""

from __future__ import annotations

import numpy as np
import pytest

from rebase.retrieve.shards import ShardSearcher, merge_nearest


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_shard_searcher_reads_vectors_in_place_and_matches_reconstruct(tmp_path, kind):
    """The searcher gathers vectors from FAISS's own memory; it must equal FAISS's reconstruct path."""
    import faiss

    from rebase.datastore.index import make_index

    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(3000, 24)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = rng.integers(-(2**62), 2**62, size=3000)
    path = tmp_path / f"{kind}.faiss"
    faiss.write_index(make_index(kind, vectors, ids), str(path))
    searcher = ShardSearcher(str(path), threads=2)
    assert searcher.rows is not None  # the in-place path, not the fallback
    queries = vectors[:2] + 0.1
    positions = rng.permutation(3000)[:1500]
    expected = vectors[np.argsort(ids)][positions] @ queries.T  # positions are in sorted id order
    np.testing.assert_allclose(searcher.similarities(positions, queries), expected, atol=1e-5)
    searcher.rows = None  # FAISS's reconstruct path gives the same
    np.testing.assert_allclose(searcher.similarities(positions, queries), expected, atol=1e-5)
    np.testing.assert_allclose(searcher.similarities(positions[:100], queries), expected[:100], atol=1e-5)
    found, scores, cross = searcher.search(queries, 5, every_query=True)
    assert (searcher.value_ids()[found[0, 0]], searcher.value_ids()[found[1, 0]]) == (ids[0], ids[1])
    np.testing.assert_allclose(cross[[0, 1], :, [0, 1]], scores, atol=1e-5)  # own query: the search's score
    np.testing.assert_allclose(cross[0, 0], vectors[0] @ queries.T, atol=1e-5)


def test_merge_nearest_numbers_values_shard_after_shard_and_bounds_what_was_not_found():
    inf = np.inf
    # Two queries; shard 0 holds numbers 0-2 (it found positions 0, 2 and 1), shard 1 numbers 3-4.
    shard0 = (np.array([[0, 2], [1, -1]]), np.array([[0.9, 0.5], [0.8, -inf]], np.float32))
    shard1 = (np.array([[1, 0], [0, 1]]), np.array([[0.7, 0.6], [0.95, 0.4]], np.float32))
    offsets = np.array([0, 3, 5])
    two = merge_nearest([(*shard0, None), (*shard1, None)], offsets, depth=2)
    assert two.numbers.tolist() == [[0, 4], [3, 1]]
    np.testing.assert_allclose(two.scores, [[0.9, 0.7], [0.95, 0.8]])
    np.testing.assert_allclose(two.ceiling, [0.7, 0.8])  # a value not returned is at most the last score
    assert two.values().tolist() == [0, 1, 3, 4] and len(two.found) == 0
    # depth 5: the shards returned all they were asked for and fewer than 5 values: nothing is unseen
    sims0 = np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    sims1 = 10 + np.arange(8, dtype=np.float32).reshape(2, 2, 2)
    every = merge_nearest([(*shard0, sims0), (*shard1, sims1)], offsets, depth=5)
    assert every.numbers[1].tolist()[:3] == [3, 1, 4]
    assert np.isneginf(every.ceiling).all()
    assert every.found.tolist() == [0, 2, 1, 4, 3, 3, 4]  # shard 0's padding (-1) left out
    np.testing.assert_allclose(every.found_similarities[[0, 3]], [[0, 1], [10, 11]])
    np.testing.assert_allclose(every.found_similarities[2], [4, 5])  # shard 0, query 1, its first value
