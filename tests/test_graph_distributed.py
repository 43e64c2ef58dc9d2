"""The sharded kNN graph on 2 CPU ranks (gloo) against the single-process build, and its errors.

One spawn of two processes runs every sharded job (process start-up dominates the cost);
each rank writes what it saw to a JSON file that the test then checks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sddecc_dist.data import load_all
from sddecc_dist.config import IndexParams
from sddecc_dist.graph import GraphError, assign_shards, knn_search, load_graph
from sddecc_dist.graph.knn import recall_sample
from sddecc_dist.model.ddecn import ImageView
from sddecc_dist.pipeline import ensure_graph, graph_path, prepare_dataset

WORLD_SIZE = 2


def _worker(rank: int, store: str, jobs: list[dict], results: str) -> None:
    import faiss

    torch.set_num_threads(1)  # 2 processes on a 2-core machine (see platform notes)
    faiss.omp_set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD_SIZE)
    try:
        for job in jobs:
            outcome = {"world_size": dist.get_world_size(), "backend": str(dist.get_backend())}
            try:
                params = IndexParams(**job.get("params", {}))
                adjacency = ensure_graph(job["data_dir"], job["k"], params=params, rebuild=job.get("rebuild", False),
                                         sharded=True, view=job.get("view", "raw"))
                outcome.update(ok=True, nnz=int(adjacency.values().numel()))
            except GraphError as error:
                outcome.update(ok=False, error=str(error))
            with open(os.path.join(results, f"{job['name']}-{rank}.json"), "w") as f:
                json.dump(outcome, f)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory, coloured_digits_npz):
    """Prepare the folders, run every sharded job once on 2 ranks, return (folders, results)."""
    root = tmp_path_factory.mktemp("sharded")
    four = root / "four"  # digits in 4 shards (500, 500, 500, 297): rank 0 gets 1000 samples, rank 1 797
    manifest = prepare_dataset("digits", four, samples_per_shard=500)
    assert len(manifest["shards"]) == 4
    one = root / "one"  # a single shard: rank 1 would get nothing
    prepare_dataset("digits", one)
    stale = root / "stale"  # holds a graph built for other shards of the same size
    np.savez(root / "other.npz", x=np.random.default_rng(0).random((1797, 8, 8)).astype(np.float32))
    prepare_dataset(str(root / "other.npz"), stale, samples_per_shard=500)
    ensure_graph(stale, k=3)
    prepare_dataset("digits", stale, samples_per_shard=500)
    coloured = root / "coloured"  # digits in random ink and paper colours, 4 shards
    prepare_dataset(str(coloured_digits_npz), coloured, samples_per_shard=500)

    jobs = [
        {"name": "flat", "data_dir": str(four), "k": 3},
        {"name": "ivf", "data_dir": str(four), "k": 5,
         "params": {"index": "ivf", "nlist": 16, "nprobe": 1, "recall_queries": 1797}},
        {"name": "pca_ivf", "data_dir": str(four), "k": 4,
         "params": {"index": "pca_ivf", "pca_dim": 16, "nlist": 16, "nprobe": 2, "recall_queries": 1797}},
        {"name": "no_shard", "data_dir": str(one), "k": 3},
        {"name": "k_too_large", "data_dir": str(four), "k": 800},
        {"name": "stale", "data_dir": str(stale), "k": 3},
        {"name": "sobel", "data_dir": str(coloured), "k": 3, "view": "sobel"},
    ]
    results = root / "results"
    results.mkdir()
    mp.spawn(_worker, args=(str(root / "store"), jobs, str(results)), nprocs=WORLD_SIZE, join=True)
    outcomes = {}
    for job in jobs:
        per_rank = [json.loads((results / f"{job['name']}-{r}.json").read_text()) for r in range(WORLD_SIZE)]
        assert all(o["world_size"] == WORLD_SIZE and o["backend"] == "gloo" for o in per_rank)
        outcomes[job["name"]] = per_rank
    return {"four": four, "one": one, "stale": stale, "coloured": coloured}, outcomes


def _sq_dists(x: np.ndarray) -> np.ndarray:
    """Exact pairwise squared distances in float64 (digits / 16 are exact binary fractions)."""
    x = x.astype(np.float64)
    sq = (x**2).sum(1)
    d = np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0)
    np.fill_diagonal(d, np.inf)
    return d


def test_sharded_exact_build_equals_single_process(sharded_runs):
    folders, outcomes = sharded_runs
    assert all(o["ok"] for o in outcomes["flat"]), outcomes["flat"]
    path = graph_path(folders["four"], 3)
    adjacency, meta = load_graph(path)
    assert meta["world_size"] == 2 and meta["dist_backend"] == "gloo"
    assert meta["index"] == "flat" and meta["recall"] == 1.0 and meta["recall_method"] == "exact"
    assert meta["rank_shards"] == [["shard-000000.tar", "shard-000002.tar"], ["shard-000001.tar", "shard-000003.tar"]]
    # every rank returned the same adjacency, the one rank 0 wrote
    assert [o["nnz"] for o in outcomes["flat"]] == [adjacency.values().numel()] * 2
    sharded = torch.load(path, weights_only=True)["neighbors"].numpy()

    images, _ = load_all(folders["four"])
    x = images.flatten(1).numpy()
    _, single = knn_search(x, 3, use_gpu=False)
    full = _sq_dists(x)
    rows = np.arange(len(x))[:, None]
    assert not (sharded == rows).any()
    # same neighbour distances in every row; same lists wherever the k-th distance is not tied
    np.testing.assert_array_equal(np.sort(full[rows, sharded], 1), np.sort(full[rows, single], 1))
    kth = np.sort(full, 1)[:, 2]
    untied = (full <= kth[:, None]).sum(1) == 3
    assert untied.mean() > 0.5  # the comparison below must cover many rows
    np.testing.assert_array_equal(np.sort(sharded[untied], 1), np.sort(single[untied], 1))


def test_sharded_build_over_the_sobel_view_is_the_exact_knn_of_the_view(sharded_runs):
    """Each rank turns its share of the images into their Sobel view before indexing it; the
    merged lists are the exact kNN of the view over all samples."""
    folders, outcomes = sharded_runs
    assert all(o["ok"] for o in outcomes["sobel"]), outcomes["sobel"]
    path = graph_path(folders["coloured"], 3, "sobel")
    _, meta = load_graph(path)
    assert meta["world_size"] == 2 and meta["view"] == "sobel" and meta["index"] == "flat"
    neighbours = torch.load(path, weights_only=True)["neighbors"]
    images, _ = load_all(folders["coloured"])
    x = ImageView("sobel")(images).flatten(1).double()
    distances = torch.cdist(x, x).pow(2)
    distances.fill_diagonal_(float("inf"))
    torch.testing.assert_close(distances.gather(1, neighbours).sort(1).values,
                               distances.topk(3, largest=False).values, rtol=1e-5, atol=1e-6)


def test_sharded_ivf_records_true_recall(sharded_runs):
    folders, outcomes = sharded_runs
    assert all(o["ok"] for o in outcomes["ivf"]), outcomes["ivf"]
    path = graph_path(folders["four"], 5)
    _, meta = load_graph(path)
    assert meta["index"] == "ivf" and meta["world_size"] == 2
    assert [r["nlist"] for r in meta["rank_indexes"]] == [16, 16]
    neighbors = torch.load(path, weights_only=True)["neighbors"].numpy()
    images, _ = load_all(folders["four"])
    full = _sq_dists(images.flatten(1).numpy())
    rows = recall_sample(len(full), 1797, 0)
    assert len(rows) == 1797 and meta["recall_method"] == "measured on 1797 random queries"
    kth = np.sort(full[rows], 1)[:, 4:5]
    expected = (full[rows[:, None], neighbors[rows]] <= kth * (1 + 1e-6)).mean()
    assert meta["recall"] == pytest.approx(expected, abs=1e-9)
    assert 0.7 < meta["recall"] < 1.0  # nprobe 1 of 16 lists: visibly approximate, still useful


def test_sharded_pca_ivf_reranks_exactly_and_records_true_recall(sharded_runs):
    """Each rank trains its own PCA and IVF on its share; the candidates are re-ranked by exact
    distance, so every neighbour's distance is exact and recall is that of the candidates."""
    folders, outcomes = sharded_runs
    assert all(o["ok"] for o in outcomes["pca_ivf"]), outcomes["pca_ivf"]
    path = graph_path(folders["four"], 4)
    _, meta = load_graph(path)
    assert meta["index"] == "pca_ivf" and meta["world_size"] == 2
    assert [(r["pca_dim"], r["nlist"], r["refine_factor"]) for r in meta["rank_indexes"]] == [(16, 16, 8)] * 2
    neighbors = torch.load(path, weights_only=True)["neighbors"].numpy()
    images, _ = load_all(folders["four"])
    full = _sq_dists(images.flatten(1).numpy())
    kth = np.sort(full, 1)[:, 3:4]
    expected = (full[np.arange(len(full))[:, None], neighbors] <= kth * (1 + 1e-6)).mean()
    assert meta["recall"] == pytest.approx(expected, abs=1e-9)  # every sample is a recall query here
    assert 0.95 < meta["recall"] <= 1.0


def test_rank_without_shard_fails_on_every_rank(sharded_runs):
    _, outcomes = sharded_runs
    for outcome in outcomes["no_shard"]:
        assert not outcome["ok"]
        assert "dataset.json lists 1 shard(s) for 2 ranks: rank(s) [1] would get no shard" in outcome["error"]


def test_k_larger_than_a_rank_share_fails_on_every_rank(sharded_runs):
    _, outcomes = sharded_runs
    for outcome in outcomes["k_too_large"]:
        assert not outcome["ok"]
        assert "k=800 is too large" in outcome["error"] and "rank 1 holds only 797 samples" in outcome["error"]
        assert "shard-000001.tar, shard-000003.tar" in outcome["error"]


def test_sharded_build_refuses_a_graph_of_other_shards(sharded_runs):
    folders, outcomes = sharded_runs
    for outcome in outcomes["stale"]:
        assert not outcome["ok"]
        assert f"graph artifact {graph_path(folders['stale'], 3)} was built for other shards" in outcome["error"]


def test_assign_shards_checks_from_the_manifest():
    manifest = {"count": 10, "shards": [{"file": f"s{i}.tar", "count": c} for i, c in enumerate([4, 4, 2])]}
    plan = assign_shards(manifest, 2, k=3)
    assert [[s["file"] for s in share] for share in plan] == [["s0.tar", "s2.tar"], ["s1.tar"]]
    with pytest.raises(GraphError, match=r"3 shard\(s\) for 4 ranks: rank\(s\) \[3\] would get no shard; .*"
                                         r"--samples-per-shard \d+\)"):
        assign_shards(manifest, 4, k=1)
    with pytest.raises(GraphError, match="k=10 must be at least 1 and smaller than the number of samples N=10"):
        assign_shards(manifest, 1, k=10)
    with pytest.raises(GraphError, match=r"rank 1 holds only 4 samples \(s1.tar"):
        assign_shards(manifest, 2, k=4)


def test_cli_under_torchrun_builds_the_sharded_graph(tmp_path):
    prepare_dataset("digits", tmp_path, samples_per_shard=500)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "sddecc_dist.cli", "graph", str(tmp_path), "--k", "3", "--index", "ivf", "--nlist", "8",
               "--view", "auto"]  # auto: the pixels of these 1-channel images
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    _, meta = load_graph(graph_path(tmp_path, 3))
    assert meta["world_size"] == 2 and meta["dist_backend"] == "gloo" and meta["index"] == "ivf"
    assert meta["n"] == 1797 and meta["recall"] > 0.9
