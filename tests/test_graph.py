"""Tests for the kNN search and the normalised adjacency (CPU only)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.datasets import load_digits

from sddecc_dist.config import IndexParams
from sddecc_dist.graph import (
    GraphError,
    build_graph,
    edges_within,
    knn_graph,
    knn_search,
    load_graph,
    normalized_adjacency,
    renormalize,
    save_graph,
    symmetric_adjacency,
    umap_knn,
)


def brute_force_sq_dists(x: np.ndarray) -> np.ndarray:
    """All pairwise squared L2 distances in float64, self pairs set to +inf.

    Uses |a|^2 + |b|^2 - 2ab (exact for the integer-valued digits data) to
    avoid an N x N x d temporary.
    """
    x64 = x.astype(np.float64)
    sq = (x64**2).sum(axis=1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x64 @ x64.T, 0.0)
    np.fill_diagonal(d, np.inf)
    return d


def assert_matches_brute_force(x: np.ndarray, k: int, dist: np.ndarray, idx: np.ndarray, atol: float) -> None:
    """Distances must match exactly-ish; index sets must match where not tied at the k-th distance."""
    full = brute_force_sq_dists(x)
    expected_dist = np.sort(full, axis=1)[:, :k]
    np.testing.assert_allclose(dist, expected_dist, rtol=1e-4, atol=atol)
    n = x.shape[0]
    assert not (idx == np.arange(n)[:, None]).any(), "self match not removed"
    np.testing.assert_allclose(full[np.arange(n)[:, None], idx], dist, rtol=1e-4, atol=atol)
    for i in range(n):
        kth = expected_dist[i, -1]
        # Neighbours strictly closer than the k-th distance are unambiguous.
        sure = set(np.flatnonzero(full[i] < kth - max(atol, 1e-4 * kth)))
        assert sure <= set(idx[i].tolist()), f"row {i}"
        assert len(set(idx[i].tolist())) == k


def test_knn_random_matches_brute_force() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 8)).astype(np.float32)
    dist, idx = knn_search(x, k=7, use_gpu=False, query_batch=64)
    assert dist.shape == (200, 7) and dist.dtype == np.float32
    assert idx.shape == (200, 7) and idx.dtype == np.int64
    assert (np.diff(dist, axis=1) >= 0).all()
    assert_matches_brute_force(x, 7, dist, idx, atol=1e-4)


def test_knn_digits_matches_brute_force() -> None:
    x = load_digits().data  # float64 integer pixels: distances are exact integers, ties are exact
    dist, idx = knn_search(x, k=10, use_gpu=False, query_batch=500)
    assert_matches_brute_force(x.astype(np.float32), 10, dist, idx, atol=1e-3)


def test_umap_knn_is_umaps_own_neighbour_search() -> None:
    """UMAP's precomputed_knn format: self first at distance 0, then Euclidean (not squared)
    distances. Fed with it, UMAP's fuzzy graph equals the one its own exact search gives below
    4096 samples (all pairwise distances, then the k smallest per row)."""
    from sklearn.metrics import pairwise_distances
    from umap.umap_ import fuzzy_simplicial_set

    x = np.random.default_rng(3).normal(size=(300, 12)).astype(np.float32)  # no ties among neighbours
    indices, distances = umap_knn(x, 8, use_gpu=False)
    assert indices.shape == distances.shape == (300, 8)
    assert (indices[:, 0] == np.arange(300)).all() and (distances[:, 0] == 0).all()
    sq, idx = knn_search(x, k=7, use_gpu=False)
    np.testing.assert_array_equal(indices[:, 1:], idx)
    np.testing.assert_allclose(distances[:, 1:] ** 2, sq, rtol=1e-5)
    ours, _, _ = fuzzy_simplicial_set(x, 8, np.random.RandomState(0), "euclidean",
                                      knn_indices=indices, knn_dists=distances)
    theirs, _, _ = fuzzy_simplicial_set(pairwise_distances(x), 8, np.random.RandomState(0), "precomputed")
    np.testing.assert_allclose(ours.toarray(), theirs.toarray(), atol=1e-4)


def test_knn_query_batch_does_not_change_result() -> None:
    x = load_digits().data[:300]
    d1, i1 = knn_search(x, k=5, use_gpu=False, query_batch=7)
    d2, i2 = knn_search(x, k=5, use_gpu=False)
    np.testing.assert_array_equal(d1, d2)
    np.testing.assert_array_equal(i1, i2)


def test_knn_removes_self_with_duplicates() -> None:
    rng = np.random.default_rng(1)
    base = rng.normal(size=(20, 4)).astype(np.float32)
    # Row 0 appears 5 times (rows 0, 20..23). FAISS returns (0, 20, 21) for
    # all five, so self sits in column 0 or 1 for some rows and is missing
    # from the k+1 results for rows 22 and 23 (last column dropped).
    x = np.vstack([base, np.repeat(base[:1], 4, axis=0)])
    dist, idx = knn_search(x, k=2, use_gpu=False)
    assert not (idx == np.arange(x.shape[0])[:, None]).any()
    dup_rows = [0, 20, 21, 22, 23]
    for i in dup_rows:
        assert set(idx[i].tolist()) <= set(dup_rows) - {i}
        np.testing.assert_array_equal(dist[i], [0.0, 0.0])


def test_knn_bad_inputs() -> None:
    x = np.zeros((5, 3), dtype=np.float32)
    x[:, 0] = np.arange(5)
    with pytest.raises(GraphError, match="k=5 must be smaller than the number of samples N=5"):
        knn_search(x, k=5, use_gpu=False)
    with pytest.raises(GraphError, match="at least 1"):
        knn_search(x, k=0, use_gpu=False)
    with pytest.raises(GraphError, match="2-D"):
        knn_search(x.ravel(), k=1, use_gpu=False)
    bad = x.copy()
    bad[3, 1] = np.nan
    bad[4, 2] = np.inf
    with pytest.raises(GraphError, match="first bad row index: 3"):
        knn_search(bad, k=1, use_gpu=False, query_batch=2)


def test_knn_use_gpu_true_without_gpu_fails_clearly() -> None:
    import faiss

    if faiss.get_num_gpus() > 0:
        pytest.skip("a GPU is visible")
    with pytest.raises(GraphError, match="use_gpu=True"):
        knn_search(np.eye(4, dtype=np.float32), k=1, use_gpu=True)


def dense_normalized(neighbors: np.ndarray, n: int) -> np.ndarray:
    """Reference D^-1/2 (max(A, A^T) + I) D^-1/2 computed densely (small n only)."""
    a = np.zeros((n, n))
    for i, row in enumerate(neighbors):
        for j in row:
            if i != j:
                a[i, j] = 1.0
    a = np.maximum(a, a.T) + np.eye(n)
    d = 1.0 / np.sqrt(a.sum(axis=1))
    return d[:, None] * a * d[None, :]


def test_normalized_adjacency_hand_checked() -> None:
    # Path-like graph 0 -> 1, 1 -> 0 (mutual), 2 -> 1 (one-sided).
    neighbors = np.array([[1], [0], [1]])
    adj = normalized_adjacency(neighbors, 3)
    assert adj.layout == torch.sparse_csr and adj.dtype == torch.float32
    assert not adj.values().requires_grad
    # A + I = [[1,1,0],[1,1,1],[0,1,1]], degrees (2, 3, 2).
    expected = np.array(
        [
            [1 / 2, 1 / np.sqrt(6), 0],
            [1 / np.sqrt(6), 1 / 3, 1 / np.sqrt(6)],
            [0, 1 / np.sqrt(6), 1 / 2],
        ]
    )
    np.testing.assert_allclose(adj.to_dense().numpy(), expected, rtol=1e-6)
    assert adj.values().numel() == 7  # the mutual edge 0-1 is stored once per direction


def test_normalized_adjacency_random_matches_dense() -> None:
    rng = np.random.default_rng(2)
    n, k = 30, 4
    neighbors = np.stack([rng.choice(np.delete(np.arange(n), i), size=k, replace=False) for i in range(n)])
    adj = normalized_adjacency(neighbors, n)
    dense = adj.to_dense().numpy()
    expected = dense_normalized(neighbors, n)
    np.testing.assert_allclose(dense, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(dense, dense.T, rtol=1e-6)
    # Recover A + I from the normalisation: entries are 1 / sqrt(d_i d_j).
    a_plus_i = (expected > 0).astype(np.float64)
    assert (np.diag(a_plus_i) == 1).all()
    degrees = a_plus_i.sum(axis=1)
    np.testing.assert_allclose(np.diag(dense), 1.0 / degrees, rtol=1e-6)
    assert adj.values().numel() == int(a_plus_i.sum())


def test_normalized_adjacency_ignores_self_and_repeated_neighbors() -> None:
    neighbors = np.array([[0, 1, 1], [0, 2, 2], [1, 2, 0]])
    dense = normalized_adjacency(neighbors, 3).to_dense().numpy()
    np.testing.assert_allclose(dense, dense_normalized(neighbors, 3), rtol=1e-6)


def test_edges_within_a_partition_match_the_dense_graph_masked() -> None:
    rng = np.random.default_rng(3)
    n, k = 40, 4
    neighbors = np.stack([rng.choice(np.delete(np.arange(n), i), size=k, replace=False) for i in range(n)])
    partition = rng.integers(0, 3, size=n)
    within = edges_within(symmetric_adjacency(neighbors, n), partition)
    a = dense_normalized(neighbors, n) > 0  # A + I
    np.fill_diagonal(a, False)
    expected = a & (partition[:, None] == partition[None, :])
    assert 0 < expected.sum() < a.sum()  # some edges cross the partition, some do not
    np.testing.assert_array_equal(within.toarray() > 0, expected)
    # Â of the cut graph: a node whose every neighbour lies in another cluster keeps its self loop only
    dense = renormalize(within + sp.identity(n, format="csr")).to_dense().numpy()
    a_cut = expected + np.eye(n)
    d = 1.0 / np.sqrt(a_cut.sum(axis=1))
    np.testing.assert_allclose(dense, d[:, None] * a_cut * d[None, :], rtol=1e-6)
    with pytest.raises(GraphError, match="partition has shape"):
        edges_within(symmetric_adjacency(neighbors, n), partition[:-1])


def test_normalized_adjacency_rejects_bad_indices() -> None:
    with pytest.raises(GraphError, match="must lie in"):
        normalized_adjacency(np.array([[1], [3]]), 2)
    with pytest.raises(GraphError, match="n_nodes"):
        normalized_adjacency(np.array([[1], [0]]), 3)


def test_build_save_load_round_trip(tmp_path) -> None:
    x = load_digits().data[:150]
    adj, neighbors, meta = build_graph(x, k=5, use_gpu=False)
    assert meta["k"] == 5 and meta["n"] == 150 and meta["backend"] == "faiss-cpu"
    assert meta["n_edges"] == adj.values().numel()
    path = tmp_path / "graph.pt"
    save_graph(path, adj, neighbors, {**meta, "manifest_checksum": "abc123"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["graph.pt"]  # no temporary file left
    loaded, loaded_meta = load_graph(path)
    assert loaded.layout == torch.sparse_csr
    torch.testing.assert_close(loaded.to_dense(), adj.to_dense(), rtol=0, atol=0)
    assert loaded_meta["manifest_checksum"] == "abc123" and loaded_meta["k"] == 5
    stored = torch.load(path, weights_only=True)
    np.testing.assert_array_equal(stored["neighbors"].numpy(), neighbors)


def test_load_graph_errors(tmp_path) -> None:
    with pytest.raises(GraphError, match="does not exist"):
        load_graph(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a torch file at all")
    with pytest.raises(GraphError, match="corrupt.pt"):
        load_graph(corrupt)
    adj = normalized_adjacency(np.array([[1], [0], [1]]), 3)
    good = tmp_path / "good.pt"
    save_graph(good, adj, np.array([[1], [0], [1]]), {"k": 1})
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:200])
    with pytest.raises(GraphError, match="truncated.pt"):
        load_graph(truncated)


def test_save_graph_rejects_non_json_meta(tmp_path) -> None:
    adj = normalized_adjacency(np.array([[1], [0]]), 2)
    with pytest.raises(GraphError, match="JSON-like"):
        save_graph(tmp_path / "g.pt", adj, np.array([[1], [0]]), {"k": np.int64(1)})
    assert not (tmp_path / "g.pt").exists()


# ----------------------------------------------------------------------------- index choice, IVF, recall


def test_resolve_index_by_size_and_defaults() -> None:
    from sddecc_dist.config import ConfigError
    from sddecc_dist.graph.knn import resolve_index

    params = IndexParams(exact_max_n=1000, ivf_max_n=100_000)
    assert resolve_index(params, 1000, 1000, 64) == {"index": "flat"}
    ivf = resolve_index(params, 40_000, 20_000, 64)  # type from the total, sizes from the index's share
    assert ivf == {"index": "ivf", "nlist": round(4 * 20_000**0.5), "nprobe": 16, "train_sample": 20_000}
    pq = resolve_index(params, 200_000, 200_000, 784)
    assert pq["index"] == "ivfpq" and pq["pq_m"] == 56 and 784 % pq["pq_m"] == 0
    assert pq["train_sample"] == 64 * pq["nlist"]
    assert resolve_index(IndexParams(), 70_000, 70_000, 784) == {"index": "flat"}  # MNIST stays exact
    # above exact_max_n, wide features are searched on their first PCA dimensions, narrow ones as they are
    assert resolve_index(params, 40_000, 40_000, 784) == {
        "index": "pca_ivf", "nlist": 800, "nprobe": 16, "train_sample": 40_000, "pca_dim": 64, "refine_factor": 8}
    assert resolve_index(params, 40_000, 40_000, 128)["index"] == "ivf"
    assert pq["refine_factor"] == 8
    assert resolve_index(IndexParams(index="pca", pca_dim=32), 70_000, 70_000, 784) == {
        "index": "pca", "train_sample": 16384, "pca_dim": 32, "refine_factor": 8}
    with pytest.raises(GraphError, match="pca_dim=64 must be smaller than the feature dimension d=64"):
        resolve_index(IndexParams(index="pca"), 1797, 1797, 64)
    with pytest.raises(GraphError, match="pca_dim=16 dimensions needs at least as many training vectors, but only 10"):
        resolve_index(IndexParams(index="pca", pca_dim=16), 10, 10, 64)
    with pytest.raises(ConfigError, match="index='hnsw' must be one of auto, flat, pca, ivf, pca_ivf, ivfpq"):
        resolve_index(IndexParams(index="hnsw"), 10, 10, 4)
    with pytest.raises(ConfigError, match="nprobe=0 must be >= 1"):
        resolve_index(IndexParams(nprobe=0), 10, 10, 4)
    with pytest.raises(GraphError, match="pq_m=5 must divide the feature dimension d=64"):
        resolve_index(IndexParams(index="ivfpq", pq_m=5), 10_000, 10_000, 64)
    with pytest.raises(GraphError, match="nlist=500 inverted lists need at least as many training vectors, but only 300"):
        resolve_index(IndexParams(index="ivf", nlist=500), 300, 300, 4)


def test_index_parameters_are_defined_once_for_config_and_command_line() -> None:
    """GraphConfig (a config's graph: section) is IndexParams plus k and use_gpu; `sddecc graph`
    takes its flags, defaults and choices from the same fields."""
    import argparse
    import dataclasses

    from sddecc_dist.cli import main
    from sddecc_dist.config import ConfigError, GraphConfig, add_arguments, from_arguments, load_config

    assert issubclass(GraphConfig, IndexParams)
    assert {f.name for f in dataclasses.fields(GraphConfig)} == {f.name for f in dataclasses.fields(IndexParams)} | {
        "k", "use_gpu"}
    parser = argparse.ArgumentParser()
    add_arguments(parser, GraphConfig)
    assert from_arguments(GraphConfig, parser.parse_args([])) == GraphConfig()
    parsed = from_arguments(GraphConfig, parser.parse_args(["--index", "ivf", "--nprobe", "4", "--k", "5"]))
    assert parsed == GraphConfig(index="ivf", nprobe=4, k=5)
    with pytest.raises(SystemExit):  # argparse names the choices
        parser.parse_args(["--index", "hnsw"])
    with pytest.raises(ConfigError, match="nprobe=0 must be >= 1"):
        from_arguments(GraphConfig, parser.parse_args(["--nprobe", "0"]))
    with pytest.raises(ConfigError, match="graph.index='hnsw' must be one of auto, flat, pca, ivf, pca_ivf, ivfpq"):
        load_config(overrides=["graph.index=hnsw"])
    with pytest.raises(ConfigError, match="graph.nprobe=0 must be >= 1"):
        load_config(overrides=["graph.nprobe=0"])
    assert main(["graph", "/nonexistent-data", "--nprobe", "0"]) == 2  # the same check, one line, exit 2


def _recall_vs_numpy(x: np.ndarray, neighbors: np.ndarray, k: int) -> float:
    """recall@k of neighbour lists against float64 brute force, ties at the k-th distance counted as hits."""
    full = brute_force_sq_dists(x)
    kth = np.sort(full, axis=1)[:, k - 1 : k]
    return float((full[np.arange(len(x))[:, None], neighbors] <= kth * (1 + 1e-6)).mean())


@pytest.mark.parametrize("index", ["ivf", "ivfpq"])
def test_ivf_recall_on_digits_matches_brute_force(index) -> None:
    x = load_digits().data.astype(np.float32)
    params = IndexParams(index=index, nlist=32, nprobe=4, recall_queries=x.shape[0])
    dist, idx, info = knn_graph(x, 5, params, use_gpu=False)
    assert info["index"] == index and info["nlist"] == 32 and info["nprobe"] == 4
    assert not (idx == np.arange(len(x))[:, None]).any() and (idx >= 0).all()
    assert (np.diff(dist, axis=1) >= 0).all()
    np.testing.assert_allclose(dist, brute_force_sq_dists(x)[np.arange(len(x))[:, None], idx], rtol=1e-4, atol=1e-2)
    recall = _recall_vs_numpy(x, idx, 5)
    assert recall > 0.95
    # every row is a recall query here, so the recorded recall is the true one
    assert info["recall"] == pytest.approx(recall, abs=1e-9)
    assert info["recall_method"] == f"measured on {len(x)} random queries"
    # recall is measured, not assumed: one list of 32 loses neighbours
    _, idx_one, info_one = knn_graph(x, 5, dataclasses.replace(params, nprobe=1), use_gpu=False)
    assert info_one["recall"] == pytest.approx(_recall_vs_numpy(x, idx_one, 5), abs=1e-9)
    assert info_one["recall"] < recall - 0.02


@pytest.mark.parametrize("index", ["pca", "pca_ivf"])
def test_pca_indexes_rerank_by_exact_distance_on_digits(index) -> None:
    """Candidates found on the first PCA dimensions come back with their exact distances, in
    order; recall is measured, and re-ranking more candidates is what recovers it."""
    x = load_digits().data.astype(np.float32)
    params = IndexParams(index=index, pca_dim=16, nlist=32, nprobe=8, recall_queries=len(x))
    dist, idx, info = knn_graph(x, 5, params, use_gpu=False)
    assert info["index"] == index and info["pca_dim"] == 16 and info["refine_factor"] == 8
    assert not (idx == np.arange(len(x))[:, None]).any() and (np.diff(dist, axis=1) >= 0).all()
    np.testing.assert_allclose(dist, brute_force_sq_dists(x)[np.arange(len(x))[:, None], idx], rtol=1e-4, atol=1e-2)
    recall = _recall_vs_numpy(x, idx, 5)
    assert recall > 0.97 and info["recall"] == pytest.approx(recall, abs=1e-9)
    # without extra candidates the 4 dimensions kept lose neighbours: the re-ranking is doing the work
    _, idx_few, info_few = knn_graph(x, 5, dataclasses.replace(params, pca_dim=4, refine_factor=1), use_gpu=False)
    assert info_few["recall"] == pytest.approx(_recall_vs_numpy(x, idx_few, 5), abs=1e-9)
    assert info_few["recall"] < recall - 0.1


@pytest.mark.parametrize("index", ["pca_ivf", "ivfpq"])
def test_saved_search_index_of_an_approximate_graph_returns_exact_distances(index, tmp_path) -> None:
    """`predict` searches the saved index alone, without the raw vectors beside it: a PCA or PQ
    index is saved inside FAISS's IndexRefine, which re-ranks as the graph's search did, from
    the raw vectors kept at float16 (pixels in [0, 1] as prepared images have them, not
    representable exactly: the distances agree to float16's precision)."""
    from sddecc_dist.graph import build_search_index, load_search_index, save_search_index

    x = load_digits().data.astype(np.float32) / 17.0
    params = IndexParams(index=index, pca_dim=16, pq_m=8, nlist=32, nprobe=8)
    index_built, spec = build_search_index(lambda: iter([(np.arange(len(x)), x)]), len(x), x.shape[1], params)
    save_search_index(tmp_path / "knn.index", index_built)
    loaded = load_search_index(tmp_path / "knn.index")
    assert spec["index"] == index and loaded.ntotal == len(x)
    dist, idx = loaded.search(x, 6)
    assert (idx[:, 0] == np.arange(len(x))).mean() > 0.99  # each image finds itself first, at distance ~0
    itself = idx[:, 0] == np.arange(len(x))
    assert (dist[itself, 0] <= 1e-5 * (1 + (x[itself].astype(np.float64) ** 2).sum(1))).all()  # predict's test
    full = brute_force_sq_dists(x)
    np.fill_diagonal(full, 0.0)
    np.testing.assert_allclose(dist, full[np.arange(len(x))[:, None], idx], rtol=2e-3, atol=1e-4)
    graph_dist, _, _ = knn_graph(x, 5, params, use_gpu=False)
    np.testing.assert_allclose(dist[:, 1:], graph_dist, rtol=2e-3, atol=1e-4)  # the graph's neighbours, as far


@pytest.mark.parametrize("index", ["flat", "pca_ivf"])
def test_search_index_built_from_chunks_in_any_order_equals_the_one_built_at_once(index) -> None:
    """`predict`'s index is built from the shards a block at a time, in the shards' order (a
    partitioned dataset's is not the samples'): the same training sample and vectors, so a search
    returns the same sample ids and distances as the index built from every row at once; chunks
    that miss or repeat a sample are refused."""
    from sddecc_dist.graph import build_search_index

    x = load_digits().data.astype(np.float32)
    n, d = x.shape
    params = IndexParams(index=index, pca_dim=16, nlist=32, nprobe=8)
    at_once, _ = build_search_index(lambda: iter([(np.arange(n), x)]), n, d, params)
    order = np.random.default_rng(0).permutation(n)
    blocks = [order[i:i + 200] for i in range(0, n, 200)]
    chunked, _ = build_search_index(lambda: ((ids, x[ids]) for ids in blocks), n, d, params)
    dist_once, idx_once = at_once.search(x, 6)
    dist_chunked, idx_chunked = chunked.search(x, 6)
    np.testing.assert_allclose(dist_chunked, dist_once, rtol=1e-5, atol=1e-4)
    full = brute_force_sq_dists(x)
    np.fill_diagonal(full, 0.0)
    for dist, idx in ((dist_once, idx_once), (dist_chunked, idx_chunked)):  # ids of those distances
        np.testing.assert_allclose(dist, full[np.arange(n)[:, None], idx], rtol=1e-4, atol=1e-2)
    assert (idx_chunked == idx_once).mean() > 0.98  # the same ids but for ties (digits' integer pixels)
    with pytest.raises(GraphError, match="first missing: 1400"):
        build_search_index(lambda: ((ids, x[ids]) for ids in [np.arange(1400)]), n, d, params)
    with pytest.raises(GraphError, match="repeat a sample"):
        build_search_index(lambda: ((ids, x[ids]) for ids in [np.arange(n), np.arange(5)]), n, d, params)


def test_ivf_rows_with_too_few_candidates_are_completed_exactly() -> None:
    # 150 lists over 300 points, 1 probed: many queries see fewer than k+1 vectors
    x = np.random.default_rng(3).normal(size=(300, 8)).astype(np.float32)
    dist, idx, info = knn_graph(x, 5, IndexParams(index="ivf", nlist=150, nprobe=1), use_gpu=False)
    assert info["nlist"] == 150
    assert (idx >= 0).all() and not (idx == np.arange(300)[:, None]).any()
    assert all(len(set(row)) == 5 for row in idx.tolist())
    full = brute_force_sq_dists(x)
    np.testing.assert_allclose(dist, full[np.arange(300)[:, None], idx], rtol=1e-4, atol=1e-4)


def test_build_graph_records_index_and_recall() -> None:
    x = load_digits().data[:500]
    _, _, meta = build_graph(x, k=3, use_gpu=False)
    assert meta["index"] == "flat" and meta["recall"] == 1.0 and meta["recall_method"] == "exact"
    assert meta["world_size"] == 1
    _, _, meta = build_graph(x, k=3, use_gpu=False, params=IndexParams(index="ivf", nlist=8, recall_queries=100))
    assert meta["index"] == "ivf" and meta["nlist"] == 8 and 0.5 < meta["recall"] <= 1.0
    assert meta["recall_method"] == "measured on 100 random queries"


def test_normalized_adjacency_memory_is_linear_in_edges() -> None:
    """No dense N x N step: at N = 200000 the peak is a small multiple of N k (a dense float64
    matrix would be 320 GB); about 120 bytes per (node, neighbour) pair when measured."""
    import tracemalloc

    n, k = 200_000, 3
    neighbors = np.random.default_rng(4).integers(0, n, size=(n, k))
    tracemalloc.start()
    try:
        adj = normalized_adjacency(neighbors, n)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert adj.values().numel() <= n * (2 * k + 1)
    assert peak < 200 * n * k, f"peak {peak / 2**20:.0f} MiB"
