"""The prepare and graph stages: artifacts, reuse, and refusing a graph of other shards."""

import numpy as np
import pytest
import torch

from sddecc_dist.data import load_all
from sddecc_dist.graph import GraphError, load_graph, normalized_adjacency
from sddecc_dist.pipeline import ensure_graph, graph_path, prepare_dataset


def test_graph_stage_builds_once_and_matches_its_definition(tmp_path):
    manifest = prepare_dataset("digits", tmp_path)
    assert manifest["count"] == 1797
    adjacency = ensure_graph(tmp_path, k=3)
    _, meta = load_graph(graph_path(tmp_path, 3))
    assert meta["n"] == 1797 and meta["k"] == 3
    # the stored neighbours are exact kNN of the pixels as streamed from the shards (compared by
    # distance, since digits has many ties), and the adjacency is their normalised graph
    images, _ = load_all(tmp_path)
    x = images.flatten(1).double()
    distances = torch.cdist(x, x).pow(2)
    distances.fill_diagonal_(float("inf"))
    expected = distances.topk(3, largest=False).values
    neighbours = torch.load(graph_path(tmp_path, 3), weights_only=True)["neighbors"]
    assert not (neighbours == torch.arange(1797)[:, None]).any()
    stored = distances.gather(1, neighbours).sort(1).values
    assert torch.allclose(stored, expected, atol=1e-9)
    reference = normalized_adjacency(neighbours.numpy(), 1797)
    assert torch.equal(adjacency.to_dense(), reference.to_dense())
    # second call loads the artifact instead of rebuilding
    mtime = graph_path(tmp_path, 3).stat().st_mtime_ns
    ensure_graph(tmp_path, k=3)
    assert graph_path(tmp_path, 3).stat().st_mtime_ns == mtime


def test_graph_of_other_shards_is_refused(tmp_path):
    prepare_dataset("digits", tmp_path)
    ensure_graph(tmp_path, k=3)
    np.savez(tmp_path / "other.npz", x=np.random.default_rng(0).random((1797, 8, 8)).astype(np.float32))
    prepare_dataset(str(tmp_path / "other.npz"), tmp_path)  # new shards, same folder
    with pytest.raises(GraphError, match=r"graph-k3.pt was built for other shards.*--rebuild"):
        ensure_graph(tmp_path, k=3)
    ensure_graph(tmp_path, k=3, rebuild=True)  # the documented way out


def test_graph_of_another_sample_count_is_refused(tmp_path):
    prepare_dataset("digits", tmp_path)
    ensure_graph(tmp_path, k=3)
    np.savez(tmp_path / "fewer.npz", x=np.random.default_rng(1).random((1000, 8, 8)).astype(np.float32))
    prepare_dataset(str(tmp_path / "fewer.npz"), tmp_path)
    with pytest.raises(GraphError, match=r"graph-k3.pt was built for other shards \(n=1797.*\(n=1000"):
        ensure_graph(tmp_path, k=3)
