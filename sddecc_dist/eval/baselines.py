"""Baselines that need no training, written as run folders like the trainer's.

The paper's Table 3 compares SDDECC with k-means on raw pixels. Writing that baseline as a run
folder (config.yaml, metrics.json, assignments.txt) lets the same summary and evaluate tools
read it beside the trained runs, and reading the pixels through the shards (not the raw
files) guarantees it clusters exactly the images, scaled exactly as, the trainer sees.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from sklearn.cluster import KMeans

from sddecc_dist.data import DataError, load_all, read_manifest
from sddecc_dist.data.shards import MANIFEST_NAME
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.run_folder import RunFolder, RunFolderError
from sddecc_dist.utils import console, peak_memory_mib

__all__ = ["KMEANS_PIXELS_METHOD", "kmeans_on_pixels"]

KMEANS_PIXELS_METHOD = "K-means"  # Table 3's row name


def kmeans_on_pixels(
    data_dir: str | Path,
    output_dir: str | Path,
    seed: int = 0,
    n_init: int = 10,
    n_clusters: int | None = None,
) -> dict:
    """k-means on the flattened [0, 1] pixels of a prepared dataset; write a run folder.

    `n_clusters` None takes the manifest's number of classes, as the trainer does. Scores are
    computed only when the dataset has labels; otherwise metrics.json holds no acc/nmi/ari,
    like an unlabelled training run. Returns the metrics.json content.
    """
    started = time.time()
    data_dir, output_dir = Path(data_dir), Path(output_dir)
    if not (data_dir / MANIFEST_NAME).is_file():
        raise DataError(f"{data_dir} holds no prepared dataset (no {MANIFEST_NAME}): "
                        f"run `sddecc prepare SOURCE --out {data_dir}` first")
    if n_init < 1:
        raise ValueError(f"n_init={n_init} must be at least 1")
    if RunFolder(output_dir).holds_run():  # a run folder is never overwritten (run_folder.py)
        raise RunFolderError(f"{output_dir} holds a run already: choose another output folder for the baseline")
    manifest = read_manifest(data_dir)
    k = n_clusters if n_clusters is not None else manifest.get("n_classes")
    if k is None:
        raise ValueError(f"{data_dir / MANIFEST_NAME} gives no number of classes: pass n_clusters")
    if k < 2:
        raise ValueError(f"n_clusters={k} must be at least 2")
    if k > manifest["count"]:
        raise ValueError(f"n_clusters={k} exceeds the {manifest['count']} samples in {data_dir}")

    images, labels = load_all(data_dir, manifest)
    pixels = images.flatten(1).numpy()  # float32 in [0, 1], the trainer's scaling
    assignments = KMeans(k, n_init=n_init, random_state=seed).fit_predict(pixels)
    # A negative label marks an unlabelled sample: a partial score would not be comparable.
    label_array = labels.numpy() if labels is not None else None
    scores = clustering_scores(label_array, assignments) if label_array is not None and (label_array >= 0).all() else {}

    result = {
        **scores,
        "dataset": manifest["name"],
        "method": KMEANS_PIXELS_METHOD,
        "seed": seed,
        "n_samples": int(manifest["count"]),
        "n_clusters": int(k),
        "n_used_clusters": int(len(np.unique(assignments))),
        "epoch": 0,
        "selection": "k-means on raw pixels (no training)",
        "seconds": round(time.time() - started, 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "assignments": RunFolder.ASSIGNMENTS,
    }
    config = {"name": manifest["name"], "data_dir": str(data_dir), "output_dir": str(output_dir), "seed": seed,
              "n_clusters": int(k), "baseline": "kmeans-pixels", "n_init": n_init}
    # config first and metrics last, as the trainer does: metrics.json marks a finished run.
    run = RunFolder(output_dir)
    run.write_config(config)
    run.write_assignments(assignments)
    run.write_metrics(result)
    score_text = " ".join(f"{name} {scores[name]:.4f}" for name in ("acc", "nmi", "ari")) if scores else "no labels"
    console.log(f"k-means on raw pixels of {manifest['name']} ({result['n_samples']} samples, {k} clusters, "
                f"seed {seed}): {score_text} in {result['seconds']:.1f}s -> {output_dir}")
    return result
