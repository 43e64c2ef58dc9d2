"""scripts/bench.py (issue 20) on a small real set: every stage beside its floor, written and
printed. No timing is asserted (speed is what the script prints); what is asserted is that each
row is what it says: the ratio is seconds over floor, the IVF recall is the share of the exact
neighbours found (recomputed here with brute force), the subset is the size asked for."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sddecc_dist.config import IndexParams
from sddecc_dist.data import load_all, read_manifest
from sddecc_dist.graph import knn_graph
from sddecc_dist.pipeline import prepare_dataset

ROOT = Path(__file__).resolve().parent.parent
STAGES = ["shard_read", "knn_exact", "knn_ivf", "knn_pca", "knn_pca_ivf", "adjacency", "partition", "pretrain_step", "joint_step", "inference",
          "predict"]


def test_bench_puts_every_stage_beside_its_floor(tmp_path):
    prepare_dataset("digits", tmp_path / "digits")
    out = subprocess.run([sys.executable, "scripts/bench.py", "--data", str(tmp_path / "digits"), "--n", "400",
                          "--out", str(tmp_path / "bench")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "bench" / "bench.json").read_text())
    assert result["n"] == 400 and read_manifest(result["data"])["count"] == 400
    assert [s["stage"] for s in result["stages"]] == STAGES
    for stage in result["stages"]:
        assert stage["seconds"] > 0 and stage["floor_seconds"] > 0 and stage["floor"], stage
        assert abs(stage["ratio"] - stage["seconds"] / stage["floor_seconds"]) < 0.01 * stage["ratio"] + 1e-3, stage
        assert stage["stage"] in out.stdout + out.stderr  # the printed table
    assert {"torch", "faiss", "torch_threads", "blas", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"} <= result["environment"].keys()

    # the fast paths' recall over every sample: a neighbour found is a hit when it is no farther
    # than the exact k-th neighbour, the exact distances here by brute force in float64
    images = load_all(result["data"])[0].flatten(1).numpy()
    distances = ((images[:, None, :].astype(np.float64) - images[None, :, :]) ** 2).sum(-1)
    np.fill_diagonal(distances, np.inf)
    kth = np.sort(distances, axis=1)[:, 2:3]
    for params in (IndexParams(index="ivf", recall_queries=0), IndexParams(index="pca", pca_dim=32, recall_queries=0),
                   IndexParams(index="pca_ivf", pca_dim=32, recall_queries=0)):
        approx_distances, _, _ = knn_graph(images, 3, params, use_gpu=False)
        fast = next(s for s in result["stages"] if s["stage"] == f"knn_{params.index}")
        assert 0.9 <= fast["recall"] <= 1.0
        assert fast["recall"] == pytest.approx(float((approx_distances <= kth * (1 + 1e-4) + 1e-9).mean()), abs=1e-4)
