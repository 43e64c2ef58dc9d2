"""Cluster-GCN building blocks: graph partitions and their artifact, the renormalised adjacency
of a subgraph, partition-ordered shards and the subgraph stream (CPU only, digits, seconds)."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from sddecc_dist.data import (
    DataError,
    load_all,
    read_manifest,
    read_partitioned_manifest,
    steps_per_epoch,
    stream_subgraphs,
    verify_shards,
    write_partitioned_shards,
)
from sddecc_dist.graph import (
    GraphError,
    induced_adjacency,
    inside_edge_fraction,
    load_graph,
    load_neighbors,
    load_partitions,
    normalized_adjacency,
    partition_graph,
    save_graph,
    symmetric_adjacency,
)
from sddecc_dist.pipeline import ensure_graph, ensure_partitions, graph_path, partition_path, prepare_dataset

N_DIGITS = 1797
N_PARTS = 20
PARTS_PER_SHARD = 4  # 20 partitions -> 5 shards


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory) -> Path:
    data_dir = tmp_path_factory.mktemp("digits")
    prepare_dataset("digits", data_dir, samples_per_shard=400)
    ensure_graph(data_dir, 3)
    return data_dir


@pytest.fixture(scope="module")
def neighbors(digits_dir: Path) -> np.ndarray:
    return load_neighbors(graph_path(digits_dir, 3))[0]


@pytest.fixture(scope="module")
def partitioned(digits_dir: Path, tmp_path_factory) -> tuple[np.ndarray, dict, Path, dict]:
    parts, meta = ensure_partitions(digits_dir, 3, N_PARTS)
    out = tmp_path_factory.mktemp("partitioned")
    manifest = write_partitioned_shards(digits_dir, parts, out, PARTS_PER_SHARD, parts_meta=meta)
    return parts, meta, out, manifest


def random_neighbors(n: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.choice(np.delete(np.arange(n), i), size=k, replace=False) for i in range(n)])


def dense_symmetric(neighbors: np.ndarray, n: int) -> np.ndarray:
    a = np.zeros((n, n))
    for i, row in enumerate(neighbors):
        for j in row:
            if i != j:
                a[i, j] = 1.0
    return np.maximum(a, a.T)


# ----------------------------------------------------------------------------- adjacency

def test_symmetric_adjacency_matches_dense() -> None:
    neighbors = np.array([[0, 1, 1], [0, 2, 2], [1, 2, 0], [0, 1, 2]])  # self edges and repeats
    adj = symmetric_adjacency(neighbors, 4)
    np.testing.assert_array_equal(adj.toarray(), dense_symmetric(neighbors, 4))
    assert adj.has_sorted_indices and (adj.data == 1).all() and adj.diagonal().sum() == 0


def test_induced_adjacency_of_all_nodes_is_normalized_adjacency(neighbors: np.ndarray) -> None:
    reference = normalized_adjacency(neighbors, N_DIGITS)
    induced = induced_adjacency(symmetric_adjacency(neighbors, N_DIGITS), np.arange(N_DIGITS))
    assert induced.layout == torch.sparse_csr and induced.dtype == torch.float32
    assert torch.equal(induced.crow_indices(), reference.crow_indices())
    assert torch.equal(induced.col_indices(), reference.col_indices())
    assert torch.equal(induced.values(), reference.values())
    # all nodes in another order: the same graph, permuted
    perm = torch.from_numpy(np.random.default_rng(0).permutation(N_DIGITS))
    permuted = induced_adjacency(symmetric_adjacency(neighbors, N_DIGITS), perm)
    assert torch.equal(permuted.to_dense(), reference.to_dense()[perm][:, perm])


@pytest.mark.parametrize("n, k, m, seed", [(40, 3, 15, 0), (60, 5, 60, 1), (30, 2, 1, 2)])
def test_induced_adjacency_matches_dense_subgraph(n: int, k: int, m: int, seed: int) -> None:
    neighbors = random_neighbors(n, k, seed)
    nodes = np.random.default_rng(seed + 10).permutation(n)[:m]  # an arbitrary order
    a_s = dense_symmetric(neighbors, n)[np.ix_(nodes, nodes)] + np.eye(m)
    d = 1.0 / np.sqrt(a_s.sum(axis=1))
    expected = d[:, None] * a_s * d[None, :]
    induced = induced_adjacency(symmetric_adjacency(neighbors, n), nodes)
    np.testing.assert_allclose(induced.to_dense().numpy(), expected, rtol=1e-6, atol=1e-7)
    assert induced.values().numel() == int(a_s.sum())  # edges leaving the subgraph are not stored


def test_induced_adjacency_rejects_bad_nodes(neighbors: np.ndarray) -> None:
    adj = symmetric_adjacency(neighbors, N_DIGITS)
    with pytest.raises(GraphError, match="node 5 appears more than once"):
        induced_adjacency(adj, np.array([3, 5, 7, 5]))
    with pytest.raises(GraphError, match=r"must lie in \[0, 1797\)"):
        induced_adjacency(adj, np.array([0, N_DIGITS]))
    with pytest.raises(GraphError, match="non-empty 1-D integer"):
        induced_adjacency(adj, np.array([], dtype=np.int64))
    with pytest.raises(GraphError, match="non-empty 1-D integer"):
        induced_adjacency(adj, np.array([0.0, 1.0]))


# ----------------------------------------------------------------------------- partitions

def test_metis_keeps_most_edges_inside_partitions(neighbors: np.ndarray) -> None:
    """On digits k=3 with 20 parts METIS keeps ~93% of the edges inside partitions, a balanced
    random assignment ~5% (measured for seeds 0-2)."""
    adj = symmetric_adjacency(neighbors, N_DIGITS)
    metis = partition_graph(neighbors, N_PARTS, "metis", seed=0)
    random = partition_graph(neighbors, N_PARTS, "random", seed=0)
    for parts in (metis, random):
        assert parts.shape == (N_DIGITS,) and parts.dtype == np.int64
        sizes = np.bincount(parts, minlength=N_PARTS)
        assert sizes.size == N_PARTS and sizes.min() >= 1
    assert np.bincount(metis).max() <= 1.1 * N_DIGITS / N_PARTS  # METIS balances sizes (default 3% slack)
    assert np.ptp(np.bincount(random)) <= 1
    metis_inside, random_inside = inside_edge_fraction(adj, metis), inside_edge_fraction(adj, random)
    assert metis_inside > 0.85 and metis_inside > random_inside + 0.6, (metis_inside, random_inside)
    np.testing.assert_array_equal(metis, partition_graph(neighbors, N_PARTS, "metis", seed=0))  # reproducible


@pytest.mark.parametrize("n_parts", [1, 20, 30, 39])
def test_every_partition_is_non_empty_on_tiny_graphs(n_parts: int) -> None:
    # METIS leaves many parts empty here when asked for nearly one part per node
    parts = partition_graph(random_neighbors(39, 2, 39), n_parts, "metis")
    assert np.bincount(parts, minlength=n_parts).min() >= 1 and parts.max() == n_parts - 1


def test_partition_bad_input(neighbors: np.ndarray) -> None:
    with pytest.raises(GraphError, match=r"n_parts must lie in \[1, N=1797\].*got 1798"):
        partition_graph(neighbors, N_DIGITS + 1)
    with pytest.raises(GraphError, match="got 0"):
        partition_graph(neighbors, 0, "random")
    with pytest.raises(GraphError, match="unknown partition method 'spectral'"):
        partition_graph(neighbors, 4, "spectral")
    with pytest.raises(GraphError, match="must lie in"):
        partition_graph(np.array([[1], [5]]), 2)


def test_partition_artifact_is_built_once_and_records_its_origin(digits_dir: Path, partitioned) -> None:
    parts, meta, _, _ = partitioned
    path = partition_path(digits_dir, 3, N_PARTS)
    assert path.name == "partitions-k3-p20.npz" and path.is_file()
    assert meta["method"] == "metis" and meta["n_parts"] == N_PARTS and meta["k"] == 3 and meta["n"] == N_DIGITS
    assert meta["sizes"]["min"] >= 1 and meta["sizes"]["max"] >= meta["sizes"]["mean"] == N_DIGITS / N_PARTS
    assert meta["inside_edge_fraction"] > 0.85
    mtime = path.stat().st_mtime_ns
    again, _ = ensure_partitions(digits_dir, 3, N_PARTS)  # loads, does not rebuild
    np.testing.assert_array_equal(again, parts)
    assert path.stat().st_mtime_ns == mtime
    with pytest.raises(GraphError, match=r"made with method 'metis'.*--rebuild"):
        ensure_partitions(digits_dir, 3, N_PARTS, method="random")


def test_stale_partition_artifact_is_refused(tmp_path: Path) -> None:
    prepare_dataset("digits", tmp_path, samples_per_shard=400)
    ensure_graph(tmp_path, 3)
    ensure_partitions(tmp_path, 3, 10)
    # another kNN graph of the same shards (e.g. rebuilt with another index)
    adjacency, meta = load_graph(graph_path(tmp_path, 3))
    other = load_neighbors(graph_path(tmp_path, 3))[0].copy()
    other[:, 0] = (other[:, 0] + 1) % N_DIGITS
    save_graph(graph_path(tmp_path, 3), adjacency, other, meta)
    with pytest.raises(GraphError, match=r"partitions-k3-p10.npz was built from another graph.*sddecc partition .* --rebuild"):
        ensure_partitions(tmp_path, 3, 10)
    # other shards in the same folder, with their graph rebuilt
    np.savez(tmp_path / "other.npz", x=np.random.default_rng(0).random((N_DIGITS, 8, 8)).astype(np.float32))
    prepare_dataset(str(tmp_path / "other.npz"), tmp_path, samples_per_shard=400)
    ensure_graph(tmp_path, 3, rebuild=True)
    with pytest.raises(GraphError, match=r"built from another dataset.*sddecc partition .* --rebuild"):
        ensure_partitions(tmp_path, 3, 10)
    parts, _ = ensure_partitions(tmp_path, 3, 10, rebuild=True)  # the documented way out
    assert np.bincount(parts).size == 10
    with pytest.raises(GraphError, match="does not exist"):
        load_partitions(tmp_path / "partitions-k3-p11.npz")


# ----------------------------------------------------------------------------- partitioned shards

def _raw_samples(directory: Path, manifest: dict) -> dict[str, tuple[str, dict]]:
    samples = {}
    for shard in manifest["shards"]:
        for sample in wds.WebDataset([str(directory / shard["file"])], nodesplitter=None, shardshuffle=False):
            assert sample["__key__"] not in samples, f"{sample['__key__']} appears twice"
            samples[sample["__key__"]] = (shard["file"], sample)
    return samples


def test_partitioned_shards_round_trip(digits_dir: Path, partitioned) -> None:
    parts, _, out, manifest = partitioned
    assert read_partitioned_manifest(out) == manifest
    verify_shards(out)  # same manifest format: checksums of the new shards
    assert len(manifest["shards"]) == N_PARTS // PARTS_PER_SHARD
    assert manifest["partitioned"]["method"] == "metis" and manifest["partitioned"]["n_parts"] == N_PARTS

    source = _raw_samples(digits_dir, read_manifest(digits_dir))
    copied = _raw_samples(out, manifest)
    assert copied.keys() == source.keys() and len(copied) == N_DIGITS  # every sample exactly once
    for key, (_, sample) in copied.items():
        assert sample["x.npy"] == source[key][1]["x.npy"] and sample["cls"] == source[key][1]["cls"]
        assert int(sample["part.id"]) == parts[int(key)]

    for shard in manifest["shards"]:  # each partition contiguous, in one shard, as the manifest lists
        stored = [int(sample["part.id"]) for sample in
                  wds.WebDataset([str(out / shard["file"])], nodesplitter=None, shardshuffle=False)]
        runs = [p for i, p in enumerate(stored) if i == 0 or stored[i - 1] != p]
        assert runs == shard["partitions"]
        assert [stored.count(p) for p in runs] == shard["partition_sizes"]
        assert shard["partition_sizes"] == [int((parts == p).sum()) for p in shard["partitions"]]

    images, labels = load_all(out)  # the generic reader works on the new folder too
    source_images, source_labels = load_all(digits_dir)
    assert torch.equal(images, source_images) and torch.equal(labels, source_labels)


def test_partitioned_shards_do_not_depend_on_open_file_limit(digits_dir: Path, partitioned, tmp_path: Path) -> None:
    parts, _, _, manifest = partitioned
    again = write_partitioned_shards(digits_dir, parts, tmp_path, PARTS_PER_SHARD, max_open_shards=2)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in manifest["shards"]]
    assert not list(tmp_path.glob(".spool-*"))  # spool cleaned up


def test_write_partitioned_shards_bad_input(digits_dir: Path, partitioned, tmp_path: Path) -> None:
    parts = partitioned[0]
    with pytest.raises(DataError, match=r"shape \(1797,\)"):
        write_partitioned_shards(digits_dir, parts[:-1], tmp_path, 4)
    with pytest.raises(DataError, match="is the source folder"):
        write_partitioned_shards(digits_dir, parts, digits_dir, 4)
    with pytest.raises(DataError, match="partition 3 is empty"):
        write_partitioned_shards(digits_dir, np.where(parts == 3, 0, parts), tmp_path, 4)
    with pytest.raises(DataError, match="partitions_per_shard"):
        write_partitioned_shards(digits_dir, parts, tmp_path, 0)


# ----------------------------------------------------------------------------- streaming

def test_stream_subgraphs_two_ranks(digits_dir: Path, partitioned) -> None:
    parts, _, out, manifest = partitioned
    images, labels = load_all(digits_dir)
    per_batch, world = 3, 2
    seen_by_rank = []
    for rank in range(world):
        batches = list(stream_subgraphs(out, per_batch, seed=5, epoch=1, rank=rank, world_size=world))
        own = [p for shard in manifest["shards"][rank::world] for p in shard["partitions"]]
        assert len(batches) == math.ceil(len(own) / per_batch)
        seen_parts = []
        for indices, batch_images, batch_labels in batches:
            batch_parts = np.unique(parts[indices.numpy()])
            assert len(batch_parts) <= per_batch
            for p in batch_parts:  # whole partitions only
                assert set(np.flatnonzero(parts == p)) == set(indices[parts[indices.numpy()] == p].tolist())
            assert torch.equal(batch_images, images[indices]) and torch.equal(batch_labels, labels[indices])
            seen_parts.extend(batch_parts.tolist())
        assert sorted(seen_parts) == sorted(own)  # each of this rank's partitions exactly once
        seen_by_rank.append(torch.cat([b[0] for b in batches]))
    assert not set(seen_by_rank[0].tolist()) & set(seen_by_rank[1].tolist())
    assert sorted(torch.cat(seen_by_rank).tolist()) == list(range(N_DIGITS))
    # rank 0 holds shards 0, 2, 4 (12 partitions: 4 batches), rank 1 shards 1, 3 (8: 3 batches)
    assert steps_per_epoch(manifest, per_batch, world) == 3
    assert steps_per_epoch(manifest, per_batch, 1) == math.ceil(N_PARTS / per_batch)


def test_stream_subgraphs_order_depends_on_seed_and_epoch_only(partitioned) -> None:
    out = partitioned[2]

    def order(seed: int, epoch: int) -> list[int]:
        return torch.cat([b[0] for b in stream_subgraphs(out, 2, seed=seed, epoch=epoch)]).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1) and sorted(order(0, 1)) == list(range(N_DIGITS))


def test_stream_subgraphs_errors(digits_dir: Path, partitioned, tmp_path: Path) -> None:
    out, manifest = partitioned[2], partitioned[3]
    with pytest.raises(DataError, match=r"rank 5 has no shard: the data \(.*, 1797 samples\) has 5 shard\(s\) for "
                                        r"world_size 6; .* --samples-per-shard 300`"):
        stream_subgraphs(out, 2, seed=0, epoch=0, rank=5, world_size=6)  # at the call, not the first batch
    with pytest.raises(DataError, match="has 5 shard"):
        steps_per_epoch(manifest, 2, 6)
    with pytest.raises(DataError, match="partitions_per_batch"):
        steps_per_epoch(manifest, 0, 1)
    with pytest.raises(DataError, match="not of partition-ordered shards"):
        stream_subgraphs(digits_dir, 2, seed=0, epoch=0)
    with pytest.raises(DataError, match="made from another partition"):
        read_partitioned_manifest(out, partition_fingerprint="0" * 64)

    # a shard that lost its last sample (a truncated copy) is caught by the partition sizes
    damaged = tmp_path / "damaged"
    shutil.copytree(out, damaged)
    first = damaged / manifest["shards"][0]["file"]
    samples = list(wds.WebDataset([str(first)], nodesplitter=None, shardshuffle=False))[:-1]
    with open(first, "wb") as stream, wds.TarWriter(stream) as sink:
        for sample in samples:
            sink.write({k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"})
    with pytest.raises(DataError, match=r"partition \d+ in shard .*shard-000000.tar has \d+ samples, manifest says"):
        list(stream_subgraphs(damaged, 2, seed=0, epoch=0))


def test_unlabelled_data_streams_labels_none(tmp_path: Path) -> None:
    x = np.random.default_rng(3).random((120, 1, 4, 4)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    data_dir = tmp_path / "data"
    prepare_dataset(str(tmp_path / "x.npz"), data_dir, samples_per_shard=50)
    parts, meta = ensure_partitions(data_dir, 3, 12, method="random")
    write_partitioned_shards(data_dir, parts, tmp_path / "parts", 3, parts_meta=meta)
    batches = list(stream_subgraphs(tmp_path / "parts", 4, seed=0, epoch=0))
    assert len(batches) == 3 and all(labels is None for _, _, labels in batches)
    indices = torch.cat([b[0] for b in batches])
    assert sorted(indices.tolist()) == list(range(120))
    images, labels = load_all(data_dir)
    assert labels is None and torch.equal(torch.cat([b[1] for b in batches]), images[indices])


def test_partition_command_writes_and_rebuilds_both_artifacts(tmp_path, capsys):
    from sddecc_dist.cli import main

    prepare_dataset("digits", tmp_path, samples_per_shard=400)
    assert main(["partition", str(tmp_path), "--parts", "12", "--partitions-per-shard", "4"]) == 0
    out = Path(capsys.readouterr().out.strip())
    manifest = read_partitioned_manifest(out)
    assert manifest["count"] == 1797 and len(manifest["shards"]) == 3
    assert (tmp_path / "partitions-k3-p12.npz").is_file()
    # another method over the same artifact is refused, naming the command that rebuilds it
    assert main(["partition", str(tmp_path), "--parts", "12", "--method", "random"]) == 2
    assert "sddecc partition" in capsys.readouterr().err.replace("\n", "")
    assert main(["partition", str(tmp_path), "--parts", "12", "--method", "random", "--rebuild"]) == 0
    assert read_partitioned_manifest(out)["partitioned"]["method"] == "random"
