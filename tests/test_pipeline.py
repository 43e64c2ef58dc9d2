"""The prepare and graph stages: artifacts, reuse, and refusing a graph of other shards."""

import numpy as np
import pytest
import torch

from sddecc_dist.data import load_all
from sddecc_dist.graph import GraphError, graph_fingerprint, load_graph, normalized_adjacency
from sddecc_dist.pipeline import ensure_graph, ensure_partitions, graph_path, partition_path, prepare_dataset


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


def test_graph_over_the_sobel_view_is_its_own_artifact(tmp_path, coloured_digits_npz):
    """The graph of model.input_view=sobel: the exact kNN of the Sobel view (not of the colours),
    saved beside the pixels' graph under its own name, and each refused under the other's name."""
    from sddecc_dist.model.ddecn import ImageView

    prepare_dataset(str(coloured_digits_npz), tmp_path)
    ensure_graph(tmp_path, k=3, view="sobel")
    path = graph_path(tmp_path, 3, "sobel")
    assert path.name == "graph-k3-sobel.pt" and not graph_path(tmp_path, 3).exists()
    _, meta = load_graph(path)
    assert meta["view"] == "sobel" and "Sobel" in meta["features"]

    images, labels = load_all(tmp_path)
    x = ImageView("sobel")(images).flatten(1).double()
    distances = torch.cdist(x, x).pow(2)
    distances.fill_diagonal_(float("inf"))
    neighbours = torch.load(path, weights_only=True)["neighbors"]
    stored = distances.gather(1, neighbours).sort(1).values
    torch.testing.assert_close(stored, distances.topk(3, largest=False).values, rtol=1e-5, atol=1e-6)

    # the point of the view: neighbours share the digit, not the colours
    ensure_graph(tmp_path, k=3)
    raw = torch.load(graph_path(tmp_path, 3), weights_only=True)["neighbors"]
    purity = {name: (labels[n] == labels[:, None]).double().mean().item()
              for name, n in (("sobel", neighbours), ("raw", raw))}
    assert purity["sobel"] > 0.9 and purity["raw"] < 0.5, purity  # measured 0.966 and 0.299

    # the partition stage of the sobel graph is named for it and made from its kNN lists
    parts, part_meta = ensure_partitions(tmp_path, 3, 4, view="sobel")
    assert partition_path(tmp_path, 3, 4, "sobel").name == "partitions-k3-sobel-p4.npz"
    assert partition_path(tmp_path, 3, 4, "sobel").exists() and not partition_path(tmp_path, 3, 4).exists()
    assert part_meta["graph_fingerprint"] == graph_fingerprint(neighbours.numpy()) and parts.shape == (1797,)

    graph_path(tmp_path, 3).replace(path)  # a pixels' graph under the sobel name
    with pytest.raises(GraphError, match=r"graph-k3-sobel.pt was built over the 'raw' view, not 'sobel'.*"
                                         r"--view sobel --rebuild"):
        ensure_graph(tmp_path, k=3, view="sobel")


def test_graph_and_partition_commands_take_the_view(tmp_path, coloured_digits_npz, capsys):
    """`--view auto` decides as training does (sobel for RGB), and the artifacts carry the view."""
    from sddecc_dist.cli import main

    prepare_dataset(str(coloured_digits_npz), tmp_path, samples_per_shard=600)
    assert main(["graph", str(tmp_path), "--view", "auto"]) == 0
    assert load_graph(graph_path(tmp_path, 3, "sobel"))[1]["view"] == "sobel"
    assert not graph_path(tmp_path, 3).exists()
    assert main(["partition", str(tmp_path), "--parts", "6", "--view", "sobel"]) == 0
    assert capsys.readouterr().out.strip().endswith("partitioned-k3-sobel-p6")
    assert partition_path(tmp_path, 3, 6, "sobel").is_file()
