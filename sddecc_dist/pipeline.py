"""The stages before training, each reading and writing named artifacts in the data folder:

    prepare:    raw source   -> shard-*.tar + dataset.json                 (sddecc prepare)
    graph:      shards       -> graph-k{k}.pt                              (sddecc graph)
    partition:  graph        -> partitions-k{k}-p{P}.npz                   (sddecc partition)
                + shards     -> partitioned-k{k}-p{P}/shard-*.tar + dataset.json

A graph over another view of the images than their pixels (model.input_view: sobel) is another
artifact, with the view in its names: graph-k{k}-sobel.pt, partitions-k{k}-sobel-p{P}.npz and
partitioned-k{k}-sobel-p{P}/.

Each can be rerun alone; training calls them only for artifacts that are missing. Every
artifact records the fingerprint of what it was made from, and one made from something else
is refused with the command that rebuilds it, never silently reused. This module is the one
place that names the artifacts of a data folder (besides the shards and manifest, which the
data layer names).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sddecc_dist.config import Config, IndexParams, resolve_input_view
from sddecc_dist.data import (
    load_all,
    load_source,
    manifest_fingerprint,
    partition_fingerprint,
    read_manifest,
    read_partitioned_manifest,
    write_partitioned_shards,
    write_shards,
)
from sddecc_dist.graph import (
    PARTITION_FORMAT_VERSION,
    FeatureTransform,
    GraphError,
    build_graph,
    build_graph_sharded,
    graph_fingerprint,
    load_graph,
    load_neighbors,
    load_partitions,
    partition,
    partition_stats,
    save_graph,
    save_partitions,
    symmetric_adjacency,
    transformed,
)
from sddecc_dist.model.ddecn import ImageView
from sddecc_dist.utils import console

GRAPH_VIEWS = ("raw", "sobel")
# what the graph's metadata says it compared, per view
_VIEW_FEATURES = {"raw": "raw pixels scaled to [0, 1]",
                  "sobel": "Sobel gradient magnitude over the channels, scaled to a maximum of 1 per image"}


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


def _graph_tag(k: int, view: str) -> str:
    if view not in GRAPH_VIEWS:
        raise GraphError(f"unknown graph view {view!r}: one of {', '.join(GRAPH_VIEWS)}")
    return f"k{k}" if view == "raw" else f"k{k}-{view}"


def graph_path(data_dir: str | Path, k: int, view: str = "raw") -> Path:
    return Path(data_dir) / f"graph-{_graph_tag(k, view)}.pt"


def graph_view(config: Config, manifest: dict) -> str:
    """The view a training run's kNN graph is built over: its networks' (model.input_view)."""
    return resolve_input_view(config.model.input_view, manifest["image_shape"][0])


def graph_features(images: torch.Tensor, view: str) -> np.ndarray:
    """What the kNN graph compares of images (N, C, H, W) in [0, 1]: the pixels or their `view`,
    flat, float32 (the graph stage's features, and `predict`'s queries against its index)."""
    return transformed(images.flatten(1).numpy(), tuple(images.shape[1:]), view_transform(view))


def view_transform(view: str) -> FeatureTransform | None:
    """What the graph compares of an image batch: None for the pixels, else the networks' view
    of them (model.ImageView), flattened."""
    if view == "raw":
        return None
    image_view = ImageView(view)
    return lambda images: image_view(images).flatten(1)


def _check_artifact(path: Path, data_dir: Path, manifest: dict, k: int, view: str, fingerprint: str) -> torch.Tensor:
    adjacency, meta = load_graph(path)
    if meta.get("n") != manifest["count"] or meta.get("dataset_fingerprint") != fingerprint:
        raise GraphError(
            f"graph artifact {path} was built for other shards (n={meta.get('n')}, "
            f"fingerprint {str(meta.get('dataset_fingerprint'))[:12]}) than those in "
            f"{data_dir} (n={manifest['count']}, fingerprint {fingerprint[:12]}); "
            f"rebuild it with: sddecc graph {data_dir} --k {k} --view {view} --rebuild"
        )
    # artifacts from before views were named have no "view": they are over raw pixels
    built_over = meta.get("view", "raw")
    if built_over != view:
        raise GraphError(f"graph artifact {path} was built over the {built_over!r} view, not {view!r}; "
                         f"rebuild it with: sddecc graph {data_dir} --k {k} --view {view} --rebuild")
    return adjacency


def ensure_graph(
    data_dir: str | Path,
    k: int,
    images: torch.Tensor | None = None,
    use_gpu: bool | None = None,
    rebuild: bool = False,
    *,
    params: IndexParams | None = None,  # a config's GraphConfig is one
    sharded: bool = False,
    group=None,
    view: str = "raw",
) -> torch.Tensor:
    """Load the kNN graph artifact, or build it over the images' `view` (raw: the pixels, as
    the paper; sobel: as model.input_view) and save it.

    An artifact built from other shards (count or checksums differ) is an error, not silently
    reused: rebuild it with `sddecc graph --rebuild`. `params` chooses the FAISS index (default:
    exact up to 100000 samples). With `sharded=True` every rank of the torch.distributed
    `group` (None: the default group) must call this: they build the graph together from
    their shares of the shards (`images` is not used), rank 0 writes it, and every rank
    returns it."""
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    path = graph_path(data_dir, k, view)
    fingerprint = manifest_fingerprint(manifest)
    # every rank decides here, before rank 0 can have written anything, so all agree
    if path.exists() and not rebuild:
        return _check_artifact(path, data_dir, manifest, k, view, fingerprint)
    transform = view_transform(view)
    if sharded:
        adjacency, neighbors, meta = build_graph_sharded(data_dir, k, params, use_gpu=use_gpu, group=group,
                                                         transform=transform)
        error = None
        if adjacency is not None:  # rank 0
            try:
                _save(path, adjacency, neighbors, meta, view, fingerprint)
            except Exception as exc:  # noqa: BLE001 - re-raised below, after telling the other ranks
                error = exc
        # doubles as the barrier: no rank reads the artifact before rank 0 has written it
        status = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(status, group=group, group_src=0)
        if error is not None:
            raise error
        if status[0] is not None:
            raise GraphError(f"rank 0 could not write the graph artifact {path}: {status[0]}")
        return adjacency if adjacency is not None else _check_artifact(path, data_dir, manifest, k, view, fingerprint)
    if images is None:
        images, _ = load_all(data_dir, manifest)
    adjacency, neighbors, meta = build_graph(graph_features(images, view), k, use_gpu=use_gpu, params=params)
    _save(path, adjacency, neighbors, meta, view, fingerprint)
    return adjacency


def _save(path: Path, adjacency: torch.Tensor, neighbors, meta: dict, view: str, fingerprint: str) -> None:
    meta.update(dataset_fingerprint=fingerprint, view=view, features=_VIEW_FEATURES[view])
    save_graph(path, adjacency, neighbors, meta)
    recall = meta["recall_method"] if meta["recall"] is None or meta["recall_method"] == "exact" \
        else f"recall@{meta['k']} {meta['recall']:.4f}"
    ranks = f" on {meta['world_size']} ranks ({meta['dist_backend']})" if meta["world_size"] > 1 else ""
    console.log(
        f"built kNN graph k={meta['k']} over {meta['n']} samples with {meta['backend']} "
        f"{meta['index']} ({recall}){ranks} in {meta['seconds']:.1f}s -> {path}"
    )


def partition_path(data_dir: str | Path, k: int, n_parts: int, view: str = "raw") -> Path:
    return Path(data_dir) / f"partitions-{_graph_tag(k, view)}-p{n_parts}.npz"


def ensure_partitions(
    data_dir: str | Path, k: int, n_parts: int, method: str = "metis", seed: int = 0, rebuild: bool = False,
    view: str = "raw",
) -> tuple[np.ndarray, dict]:
    """Load ``partitions-k{k}-p{P}.npz`` of a data folder, or partition its kNN graph (over
    `view`) and save it.

    The kNN graph stage runs first (``ensure_graph``: built if missing, refused if stale). An
    artifact of other shards, of another graph, or made with another method or seed is an
    error naming the call that rebuilds it, not silently reused.
    """
    data_dir = Path(data_dir)
    fingerprint = manifest_fingerprint(read_manifest(data_dir))
    ensure_graph(data_dir, k, view=view)  # builds a missing graph, refuses a stale one; then read its kNN lists
    neighbors, _ = load_neighbors(graph_path(data_dir, k, view))
    graph_fp = graph_fingerprint(neighbors)
    path = partition_path(data_dir, k, n_parts, view)
    hint = (f"sddecc partition {data_dir} --k {k} --view {view} --parts {n_parts} --method {method} --seed {seed} "
            f"--rebuild")
    if path.exists() and not rebuild:
        parts, meta = load_partitions(path, dataset_fingerprint=fingerprint, graph_fingerprint=graph_fp,
                                      rebuild_hint=hint)
        if meta.get("method") != method or meta.get("seed") != seed:
            raise GraphError(f"partition artifact {path} was made with method {meta.get('method')!r} seed "
                             f"{meta.get('seed')}, not {method!r} seed {seed}; rebuild it with: {hint}")
        return parts, meta

    start = time.perf_counter()
    adjacency = symmetric_adjacency(neighbors, neighbors.shape[0])
    parts = partition(adjacency, n_parts, method, seed)
    meta = {
        "format_version": PARTITION_FORMAT_VERSION,
        "method": method,
        "seed": int(seed),
        "n_parts": int(n_parts),
        "k": int(k),
        "n": int(parts.shape[0]),
        "dataset_fingerprint": fingerprint,
        "graph_fingerprint": graph_fp,
        "partition_fingerprint": partition_fingerprint(parts),
        **partition_stats(adjacency, parts, n_parts),
        "seconds": time.perf_counter() - start,
    }
    save_partitions(path, parts, meta)
    console.log(
        f"partitioned the k={k} graph of {meta['n']} samples into {n_parts} parts with {method} "
        f"(sizes {meta['sizes']['min']}..{meta['sizes']['max']}, {meta['inside_edge_fraction']:.1%} of "
        f"{meta['n_edges']} edges inside) in {meta['seconds']:.1f}s -> {path}"
    )
    return parts, meta


def partitioned_dir(data_dir: str | Path, k: int, n_parts: int, view: str = "raw") -> Path:
    return Path(data_dir) / f"partitioned-{_graph_tag(k, view)}-p{n_parts}"


def ensure_partitioned_shards(
    data_dir: str | Path, k: int, n_parts: int, method: str = "metis", partitions_per_shard: int = 8,
    seed: int = 0, view: str = "raw",
) -> Path:
    """The partition stage: METIS partitions of the kNN graph (`partitions-k{k}-p{P}.npz`) and
    the shards rewritten in partition order (`partitioned-k{k}-p{P}/`), each built if missing and
    checked against the shards and graph they came from. Returns the partitioned folder."""
    data_dir = Path(data_dir)
    parts, meta = ensure_partitions(data_dir, k, n_parts, method=method, seed=seed, view=view)
    out = partitioned_dir(data_dir, k, n_parts, view)
    source = manifest_fingerprint(read_manifest(data_dir))
    if (out / "dataset.json").exists():
        read_partitioned_manifest(out, source_fingerprint=source, partition_fingerprint=partition_fingerprint(parts))
        return out
    manifest = write_partitioned_shards(data_dir, parts, out, partitions_per_shard, seed=seed, parts_meta=meta)
    console.log(f"partitioned {manifest['count']} samples into {n_parts} {method} partitions "
                f"({meta['inside_edge_fraction']:.3f} of edges inside) in {len(manifest['shards'])} "
                f"shard(s) -> {out}")
    return out
