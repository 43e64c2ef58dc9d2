"""Sharded kNN graph over the ranks of a torch.distributed process group.

Each of the R ranks reads only its share of the webdataset shards (shard i goes to rank
i % R) and builds a FAISS index over it. The queries are every sample, sent block by block:
the rank that owns a block broadcasts it, every rank searches it against its own index for
the k+1 nearest of its share, and the owner merges the R candidate lists into the global
top k+1 and drops the sample itself. So no rank ever holds more than its share plus one
block of the N x d features. Rank 0 finally gathers the (N, k) neighbour lists (O(N k)) and
builds the adjacency.

Works with gloo (CPU) or NCCL (GPU) groups; the caller initialises the group (torchrun and
``accelerate launch`` both set the environment that ``init_process_group`` reads).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np
import torch
import torch.distributed as dist

from sddecc_dist.config import IndexParams
from sddecc_dist.data import read_manifest, sample_pipeline, shard_indices, shard_urls, verify_shards

from .adjacency import normalized_adjacency
from .knn import (
    _GPU_MAX_K,
    GraphError,
    _drop_self,
    _validated_features,
    build_index,
    measure_recall,
    recall_sample,
    resolve_index,
    resolve_use_gpu,
    search_index,
)

__all__ = ["FeatureTransform", "assign_shards", "build_graph_sharded", "transformed"]


def assign_shards(manifest: dict, world_size: int, k: int, data_dir: str | Path = "") -> list[list[dict]]:
    """The manifest's shard entries of each rank: shard i to rank i % world_size.

    Checked here, from the manifest alone, so that every rank raises the same error
    before any collective call (a rank that raised alone would leave the others waiting):
    every rank needs a shard, and its share at least k+1 samples (its own top k+1).
    """
    shards = manifest["shards"]
    if len(shards) < world_size:
        raise GraphError(
            f"{data_dir}/dataset.json lists {len(shards)} shard(s) for {world_size} ranks: rank(s) "
            f"{list(range(len(shards), world_size))} would get no shard; start at most {len(shards)} ranks, or "
            f"prepare it again into a new folder in {world_size} or more shards (sddecc prepare SOURCE --out NEW_DIR "
            f"--samples-per-shard {max(1, -(-manifest['count'] // world_size))})"
        )
    if not 1 <= k < manifest["count"]:
        raise GraphError(f"k={k} must be at least 1 and smaller than the number of samples N={manifest['count']}")
    plan = [shards[rank::world_size] for rank in range(world_size)]
    for rank, share in enumerate(plan):
        count = sum(s["count"] for s in share)
        if count < k + 1:
            raise GraphError(
                f"k={k} is too large for a sharded build over {world_size} ranks: rank {rank} holds only "
                f"{count} samples ({', '.join(s['file'] for s in share)} in {data_dir}), fewer than k+1={k + 1}; "
                f"use fewer ranks or larger shards"
            )
    return plan


FeatureTransform = Callable[[torch.Tensor], torch.Tensor]
"""Images (B, C, H, W) to the (B, d) features the graph compares: the caller's view of them."""


def _read_share(data_dir: Path, manifest: dict, share: list[dict]) -> np.ndarray:
    """This rank's samples as a float32 (m, C*H*W) matrix of pixels, rows ordered as ``shard_indices``."""
    own = {**manifest, "shards": share}
    verify_shards(data_dir, own)
    ids = shard_indices(share)
    row_of = {int(index): row for row, index in enumerate(ids)}
    d = int(np.prod(manifest["image_shape"]))
    x = np.empty((len(ids), d), dtype=np.float32)
    seen = np.zeros(len(ids), dtype=bool)
    for index, image, _ in sample_pipeline(shard_urls(data_dir, own), manifest["value_range"]):
        row = row_of.get(index)
        if row is None or seen[row]:
            raise GraphError(f"sample {index} is unexpected or repeated in the shards {[s['file'] for s in share]} of {data_dir}")
        x[row] = image.reshape(-1).numpy()
        seen[row] = True
    if not seen.all():
        raise GraphError(f"sample {ids[np.argmin(seen)]} is missing from the shards {[s['file'] for s in share]} of {data_dir}")
    return x


def transformed(pixels: np.ndarray, image_shape: tuple, transform: FeatureTransform | None,
                block: int = 4096) -> np.ndarray:
    """``transform`` of (m, C*H*W) pixel rows, ``block`` images at a time, as float32 (m, d)."""
    if transform is None:
        return pixels
    images = torch.from_numpy(pixels).view(-1, *image_shape)
    with torch.no_grad():
        return torch.cat([transform(images[i:i + block]) for i in range(0, len(images), block)]).numpy()


class _Comm:
    """The collective calls of the build, on one group, with tensors on the group's device."""

    def __init__(self, group):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.backend = str(dist.get_backend(group))
        # NCCL moves CUDA tensors only; gloo CPU tensors.
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def agree(self, error: BaseException | None, stage: str) -> None:
        """Raise on every rank if any rank failed ``stage``, so that none waits forever."""
        failed = torch.zeros(self.world, dtype=torch.int32, device=self.device)
        failed[self.rank] = error is not None
        dist.all_reduce(failed, group=self.group)
        if error is not None:
            raise error
        if failed.any():
            ranks = failed.nonzero().flatten().tolist()
            raise GraphError(f"sharded kNN graph: rank(s) {ranks} failed while {stage} (see their error)")

    def broadcast(self, array: np.ndarray | None, shape: tuple, dtype: torch.dtype, owner: int) -> np.ndarray:
        buffer = torch.empty(shape, dtype=dtype, device=self.device)
        if self.rank == owner:
            buffer.copy_(torch.from_numpy(array))
        dist.broadcast(buffer, group=self.group, group_src=owner)
        return buffer.cpu().numpy()

    def gather(self, array: np.ndarray, owner: int) -> list[np.ndarray] | None:
        """Equal-shaped arrays of all ranks, in rank order, on ``owner`` (None elsewhere)."""
        tensor = torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        parts = [torch.empty_like(tensor) for _ in range(self.world)] if self.rank == owner else None
        dist.gather(tensor, parts, group=self.group, group_dst=owner)
        return [p.cpu().numpy() for p in parts] if parts is not None else None


def _merge(dist_parts: list[np.ndarray], id_parts: list[np.ndarray], row_ids: np.ndarray, k: int):
    """Global top k (self dropped) from every rank's top k+1 of the same queries.

    Ties at equal distance go to the smaller sample index, so the result does not depend
    on the rank order.
    """
    distances = np.concatenate(dist_parts, axis=1)
    ids = np.concatenate(id_parts, axis=1)
    order = np.lexsort((ids, distances), axis=1)[:, : k + 1]
    return _drop_self(np.take_along_axis(distances, order, 1), np.take_along_axis(ids, order, 1), row_ids)


def _search_rounds(comm: _Comm, x_local: np.ndarray, rows_of_rank: list[np.ndarray], ids_of_rank: list[np.ndarray],
                   search, k: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's queries ``x_local[rows_of_rank[rank]]`` against every rank's database.

    Ranks take turns as owner; the owner broadcasts its queries ``block`` rows at a time,
    ``search(queries)`` gives each rank's top k+1 as (distances, global ids), and the owner
    merges them. Sizes come from the manifest, so every rank knows them and all gathered
    arrays are equal-shaped (gloo requires it). Returns this rank's (distances, neighbours)
    for its own query rows.
    """
    d = x_local.shape[1]
    mine = rows_of_rank[comm.rank]
    out_d = np.empty((len(mine), k), dtype=np.float32)
    out_i = np.empty((len(mine), k), dtype=np.int64)
    for owner in range(comm.world):
        n_rows = len(rows_of_rank[owner])
        for start in range(0, n_rows, block):
            stop = min(start + block, n_rows)
            local = x_local[mine[start:stop]] if comm.rank == owner else None
            queries = comm.broadcast(local, (stop - start, d), torch.float32, owner)
            block_d, block_i = search(queries)
            dist_parts = comm.gather(block_d, owner)
            id_parts = comm.gather(block_i, owner)
            if comm.rank == owner:
                out_d[start:stop], out_i[start:stop] = _merge(dist_parts, id_parts, ids_of_rank[owner][start:stop], k)
    return out_d, out_i


def build_graph_sharded(
    data_dir: str | Path,
    k: int,
    params: IndexParams | None = None,
    use_gpu: bool | None = None,
    group=None,
    query_batch: int = 4096,
    gpu_device: int | None = None,
    transform: FeatureTransform | None = None,
) -> tuple[torch.Tensor | None, np.ndarray | None, dict | None]:
    """kNN graph of ``data_dir``'s shards, built by all ranks of ``group``, over the pixels or,
    with ``transform``, over what it makes of each rank's images (every rank the same).

    Every rank of the group (None: the default group) must call this. Rank 0 returns
    ``(adjacency, neighbors, meta)`` as ``build_graph`` does, plus world_size, dist_backend
    and the index of each rank; the other ranks return ``(None, None, None)``. On GPU each
    rank's index lives on ``gpu_device`` (None: torch's current CUDA device).
    """
    start_time = time.perf_counter()
    if not dist.is_available() or not dist.is_initialized():
        raise GraphError("build_graph_sharded needs an initialised torch.distributed process group")
    params = params or IndexParams()
    params.check()
    comm = _Comm(group)
    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    plan = assign_shards(manifest, comm.world, k, data_dir)
    image_shape = tuple(manifest["image_shape"])
    n, d = manifest["count"], transformed(np.zeros((1, int(np.prod(image_shape))), np.float32), image_shape,
                                          transform).shape[1]
    ids_of_rank = [shard_indices(share) for share in plan]
    specs = [resolve_index(params, n, len(ids), d) for ids in ids_of_rank]  # same on every rank
    on_gpu = resolve_use_gpu(use_gpu)
    if on_gpu and k + 1 > _GPU_MAX_K:
        raise GraphError(f"k={k} is too large for FAISS GPU search (k+1 must be <= {_GPU_MAX_K})")
    if on_gpu and gpu_device is None:
        gpu_device = torch.cuda.current_device() if torch.cuda.is_available() else 0

    error = None
    try:
        pixels = _read_share(data_dir, manifest, plan[comm.rank])
        x_local = _validated_features(transformed(pixels, image_shape, transform), k, query_batch)
    except Exception as exc:  # noqa: BLE001 - re-raised on this rank by agree()
        error = exc
    comm.agree(error, "reading their shards")
    spec = specs[comm.rank]
    try:
        index = build_index(x_local, {**spec, "seed": params.seed + comm.rank}, on_gpu, gpu_device)
    except Exception as exc:  # noqa: BLE001
        error = exc
    comm.agree(error, "building their index")
    my_ids = ids_of_rank[comm.rank]

    def approximate(queries):
        block_d, rows = search_index(index, spec, x_local, queries, k + 1)
        return block_d, my_ids[rows]

    all_rows = [np.arange(len(ids)) for ids in ids_of_rank]
    distances, neighbors = _search_rounds(comm, x_local, all_rows, ids_of_rank, approximate, k, query_batch)

    # recall@k against exact search on the same random queries as a single-process build
    if spec["index"] == "flat":
        recall, method = 1.0, "exact"
    elif params.recall_queries == 0:
        recall, method = None, "not measured"
    else:
        sample = recall_sample(n, params.recall_queries, params.seed)
        sample_rows = [np.flatnonzero(np.isin(ids, sample)) for ids in ids_of_rank]
        sample_ids = [ids[rows] for ids, rows in zip(ids_of_rank, sample_rows)]

        def exact(queries):
            block_d, rows = faiss.knn(queries, x_local, k + 1)
            return block_d, my_ids[rows]

        exact_d, _ = _search_rounds(comm, x_local, sample_rows, sample_ids, exact, k, query_batch)
        hits = torch.tensor([measure_recall(distances[sample_rows[comm.rank]], exact_d) * exact_d.size],
                            dtype=torch.float64, device=comm.device)
        dist.all_reduce(hits, group=comm.group)
        recall, method = float(hits.item()) / (len(sample) * k), f"measured on {len(sample)} random queries"

    # gather the (N, k) lists on rank 0, each rank's padded to the largest share (gloo needs equal sizes)
    longest = max(len(ids) for ids in ids_of_rank)
    padded = np.zeros((longest, k), dtype=np.int64)
    padded[: len(neighbors)] = neighbors
    parts = comm.gather(padded, 0)
    if comm.rank != 0:
        return None, None, None
    all_neighbors = np.empty((n, k), dtype=np.int64)
    for ids, part in zip(ids_of_rank, parts):
        all_neighbors[ids] = part[: len(ids)]
    adjacency = normalized_adjacency(all_neighbors, n)
    meta = {
        "k": int(k),
        "n": int(n),
        "metric": "l2",
        "n_edges": int(adjacency.values().numel()),
        "seconds": time.perf_counter() - start_time,
        "backend": "faiss-gpu" if on_gpu else "faiss-cpu",
        **specs[0],  # every rank's index is in rank_indexes
        "recall": recall,
        "recall_method": method,
        "world_size": comm.world,
        "dist_backend": comm.backend,
        "rank_indexes": specs,
        "rank_shards": [[s["file"] for s in share] for share in plan],
    }
    return adjacency, all_neighbors, meta

