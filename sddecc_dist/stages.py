"""The stages before training, each reading and writing named artifacts in the data folder:

    prepare:  raw source  -> shard-*.tar + dataset.json   (sddecc prepare)
    graph:    shards      -> graph-k{k}.pt                (sddecc graph)

Each can be rerun alone; training calls them only for artifacts that are missing.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sddecc_dist.data import load_all, load_source, read_manifest, write_shards
from sddecc_dist.graph import GraphError, build_graph, load_graph, save_graph
from sddecc_dist.utils import console


def prepare_dataset(
    source: str,
    out_dir: str | Path,
    from_dir: str | Path | None = None,
    split: str = "all",
    size: int | None = None,
    samples_per_shard: int = 10000,
) -> dict:
    """Read a raw source and write it as webdataset shards plus dataset.json."""
    raw = load_source(source, from_dir=from_dir, split=split, size=size)
    manifest = write_shards(raw, out_dir, samples_per_shard=samples_per_shard)
    console.log(
        f"prepared {manifest['count']} samples of {manifest['name']} "
        f"({'x'.join(map(str, manifest['image_shape']))}) into {len(manifest['shards'])} "
        f"shard(s) in {out_dir}"
    )
    return manifest


def manifest_fingerprint(manifest: dict) -> str:
    """Identifies the exact shards a graph was built from (count and shard checksums)."""
    text = json.dumps([manifest["count"], [s["sha256"] for s in manifest["shards"]]])
    return hashlib.sha256(text.encode()).hexdigest()


def graph_path(data_dir: str | Path, k: int) -> Path:
    return Path(data_dir) / f"graph-k{k}.pt"


def ensure_graph(
    data_dir: str | Path,
    k: int,
    images: torch.Tensor | None = None,
    use_gpu: bool | None = None,
    rebuild: bool = False,
) -> torch.Tensor:
    """Load the kNN graph artifact, or build it over raw pixels and save it.

    An artifact built from other shards (count or checksums differ) is an error, not silently
    reused: rebuild it with `sddecc graph --rebuild`."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    path = graph_path(data_dir, k)
    fingerprint = manifest_fingerprint(manifest)
    if path.exists() and not rebuild:
        adjacency, meta = load_graph(path)
        if meta.get("n") != manifest["count"] or meta.get("dataset_fingerprint") != fingerprint:
            raise GraphError(
                f"graph artifact {path} was built for other shards (n={meta.get('n')}, "
                f"fingerprint {str(meta.get('dataset_fingerprint'))[:12]}) than those in "
                f"{data_dir} (n={manifest['count']}, fingerprint {fingerprint[:12]}); "
                f"rebuild it with: sddecc graph {data_dir} --k {k} --rebuild"
            )
        return adjacency
    if images is None:
        images, _ = load_all(data_dir, manifest)
    features = images.flatten(1).numpy()
    adjacency, neighbors, meta = build_graph(features, k, use_gpu=use_gpu)
    meta.update(dataset_fingerprint=fingerprint, features="raw pixels scaled to [0, 1]")
    save_graph(path, adjacency, neighbors, meta)
    console.log(
        f"built kNN graph k={k} over {meta['n']} samples with {meta['backend']} in "
        f"{meta['seconds']:.1f}s -> {path}"
    )
    return adjacency
