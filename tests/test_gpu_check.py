"""scripts/gpu_check.sh on a machine without a GPU (CI's): it says so and runs its CPU dry run
on 600 of scikit-learn's digits, through the same three steps it runs on a GPU, so that the script
keeps working between the rare machines that have one."""

import json
import subprocess
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_without_a_gpu_runs_its_cpu_dry_run(tmp_path):
    assert not torch.cuda.is_available(), "this test is the CPU dry run; on a GPU run the script itself"
    out = subprocess.run(["bash", "scripts/gpu_check.sh", str(tmp_path / "none"), str(tmp_path / "check")],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    text = out.stdout
    assert "no GPU" in text and "CPU dry run" in text
    for section in ("== 1. the kNN graph", "graph (flat):", "graph (ivf):", "graph (pca_ivf):", "== 2.", "pretraining:",
                    "joint phase:", "== 3. scripts/bench.py"):
        assert section in text, (section, text[-3000:])
    assert "s per epoch over every node" in text  # the joint phase logged a line with its epochs' time
    bench = json.loads((tmp_path / "check" / "bench" / "bench.json").read_text())
    assert bench["environment"]["device"] == "cpu"
    assert [s["stage"] for s in bench["stages"]] == [
        "shard_read", "knn_exact", "knn_ivf", "knn_pca", "knn_pca_ivf", "adjacency", "partition", "pretrain_step",
        "joint_step", "inference", "predict"]
    metrics = json.loads((tmp_path / "check" / "run" / "metrics.json").read_text())
    assert metrics["n_samples"] == 600 and "gpu_peak_memory_mib" not in metrics
