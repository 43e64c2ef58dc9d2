"""Exact k-nearest-neighbour search with FAISS.

The SDDECC graph is built once from the autoencoder features, so we use an
exact ``IndexFlatL2`` search: it is fast enough on a GPU (and acceptable on a
CPU) and avoids the recall loss of approximate indexes, which would make the
graph depend on index tuning.
"""

from __future__ import annotations

import faiss
import numpy as np

__all__ = ["GraphError", "knn_search", "resolve_use_gpu"]

# FAISS GPU brute-force search cannot select more than this many neighbours.
_GPU_MAX_K = 2048


class GraphError(ValueError):
    """Invalid input to, or unreadable output of, the graph construction."""


def resolve_use_gpu(use_gpu: bool | None) -> bool:
    """Decide whether the FAISS GPU backend is used.

    ``None`` picks the GPU when FAISS can see one, so the same config runs on
    laptops and on GPU nodes; ``True`` is a hard requirement and fails loudly
    instead of silently falling back to a much slower CPU search.
    """
    n_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    gpu_available = n_gpus > 0 and hasattr(faiss, "StandardGpuResources")
    if use_gpu is None:
        return gpu_available
    if use_gpu and not gpu_available:
        raise GraphError(
            "use_gpu=True but FAISS sees no GPU (faiss.get_num_gpus()="
            f"{n_gpus}); install faiss-gpu on a GPU machine or pass use_gpu=None/False"
        )
    return bool(use_gpu)


def _validated_features(features: np.ndarray, k: int, query_batch: int) -> np.ndarray:
    """Return ``features`` as a C-contiguous float32 matrix, or raise GraphError.

    Finiteness is checked after the float32 cast (a finite float64 can
    overflow to inf) and in blocks so the check does not allocate an N x d
    boolean mask.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)):
        raise GraphError(f"k must be an integer, got {k!r}")
    if isinstance(query_batch, bool) or not isinstance(query_batch, (int, np.integer)) or query_batch < 1:
        raise GraphError(f"query_batch must be a positive integer, got {query_batch!r}")
    x = np.asarray(features)
    if x.ndim != 2:
        raise GraphError(f"features must be a 2-D (N, d) array, got shape {x.shape}")
    n, d = x.shape
    if d < 1:
        raise GraphError(f"features must have at least one column, got shape {x.shape}")
    if k < 1:
        raise GraphError(f"k={k} must be at least 1")
    if k >= n:
        raise GraphError(f"k={k} must be smaller than the number of samples N={n}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    for start in range(0, n, query_batch):
        finite_rows = np.isfinite(x[start : start + query_batch]).all(axis=1)
        if not finite_rows.all():
            bad_row = start + int(np.argmin(finite_rows))
            raise GraphError(f"features contain NaN or inf (first bad row index: {bad_row})")
    return x


def _drop_self(distances: np.ndarray, indices: np.ndarray, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Remove each query's own index from its k+1 results.

    With duplicated points several results tie at distance 0, so the query
    itself is not necessarily in column 0. If it is absent altogether (more
    than k duplicates), the farthest (last) result is dropped instead so that
    every row keeps exactly k neighbours.
    """
    drop = indices == row_ids[:, None]
    drop[~drop.any(axis=1), -1] = True
    keep = ~drop
    n, k_plus_one = indices.shape
    return (
        distances[keep].reshape(n, k_plus_one - 1),
        indices[keep].reshape(n, k_plus_one - 1),
    )


def knn_search(
    features: np.ndarray,
    k: int,
    use_gpu: bool | None = None,
    query_batch: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 kNN of every row of ``features`` among all rows, self excluded.

    Returns ``(distances, neighbors)``: squared L2 distances, shape (N, k),
    float32, ascending per row; and neighbour row indices, shape (N, k),
    int64. Queries run in blocks of ``query_batch`` rows so the (block, k+1)
    result buffers, not (N, k+1) temporaries inside FAISS, bound the peak
    memory of a single search call.
    """
    x = _validated_features(features, k, query_batch)
    on_gpu = resolve_use_gpu(use_gpu)
    if on_gpu and k + 1 > _GPU_MAX_K:
        raise GraphError(f"k={k} is too large for FAISS GPU search (k+1 must be <= {_GPU_MAX_K})")

    n, d = x.shape
    index = faiss.IndexFlatL2(d)
    if on_gpu:
        if faiss.get_num_gpus() == 1:
            gpu_resources = faiss.StandardGpuResources()  # must outlive the GPU index
            index = faiss.index_cpu_to_gpu(gpu_resources, 0, index)
        else:
            index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)

    distances = np.empty((n, k), dtype=np.float32)
    neighbors = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, query_batch):
        stop = min(start + query_batch, n)
        block_d, block_i = index.search(x[start:stop], k + 1)
        row_ids = np.arange(start, stop, dtype=np.int64)
        distances[start:stop], neighbors[start:stop] = _drop_self(block_d, block_i, row_ids)
    return distances, neighbors
