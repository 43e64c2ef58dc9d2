"""k-nearest-neighbour search with FAISS: exact for small sets, PCA and IVF for large ones.

The SDDECC graph is built once from the images. Up to ``exact_max_n`` samples an
exact ``IndexFlatL2`` search is used: it is fast enough at that size (MNIST's 70000 x
784 takes about half a minute on two CPU cores) and the graph does not depend on index
tuning. Above it an inverted-file index (IVF-Flat, or IVF-PQ for very large sets)
makes the search sub-quadratic, on the features' first PCA dimensions when they are
many (``pca_ivf``; ``pca`` is exact search on them): those indexes return more
candidates than asked for, which are re-ranked by exact distance. Recall@k against
exact search is measured on a random sample of queries and returned with the
neighbours, so every graph records how approximate it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import faiss
import numpy as np

from sddecc_dist.config import IndexParams, choices
from sddecc_dist.utils import atomic_write_bytes

__all__ = [
    "INDEX_TYPES",
    "GraphError",
    "build_index",
    "build_search_index",
    "load_search_index",
    "save_search_index",
    "knn_graph",
    "knn_search",
    "measure_recall",
    "recall_sample",
    "resolve_index",
    "resolve_use_gpu",
    "search_index",
    "umap_knn",
]

# FAISS GPU search cannot select more than this many neighbours.
_GPU_MAX_K = 2048
INDEX_TYPES = choices(IndexParams, "index")
# Indexes whose distances are approximate (PCA's, PQ's): search_index fetches refine_factor
# times the candidates asked for and re-ranks them by exact distance from the raw vectors,
# which the caller holds anyway; a saved index re-ranks them itself (IndexRefine).
_REFINED = ("pca", "pca_ivf", "ivfpq")
# Squared distances within this relative tolerance of the exact k-th distance count as
# hits in recall@k: FAISS computes them by different formulas in different indexes, and
# two points at (almost) the same distance are equally good neighbours.
_RECALL_RTOL = 1e-4


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


def resolve_index(params: IndexParams, n_total: int, n_index: int, d: int) -> dict:
    """The concrete index for a search: type from the total sample count ``n_total``,
    sizes from the ``n_index`` vectors it will hold (they differ in a sharded build).

    Returns a JSON-like dict (it goes into the graph metadata): ``index`` and, for IVF,
    ``nlist``, ``nprobe``, ``train_sample``; ``pca_dim`` for the PCA indexes, ``pq_m`` for
    IVF-PQ, ``refine_factor`` for those two.
    """
    params.check()
    kind = params.index
    if kind == "auto":
        if n_total <= params.exact_max_n:
            kind = "flat"
        elif n_total <= params.ivf_max_n:
            kind = "pca_ivf" if d > 2 * params.pca_dim else "ivf"
        else:
            kind = "ivfpq"
    if kind == "flat":
        return {"index": "flat"}
    spec = {"index": kind}
    if kind == "pca":
        train = min(n_index, params.train_sample or 16384)
    else:
        nlist = params.nlist or max(1, round(4 * math.sqrt(n_index)))
        train = min(n_index, params.train_sample or max(64 * nlist, 16384))
        if nlist > train:
            raise GraphError(
                f"nlist={nlist} inverted lists need at least as many training vectors, but only "
                f"{train} are available (train_sample={params.train_sample}, {n_index} vectors in the index)"
            )
        spec.update(nlist=int(nlist), nprobe=int(min(params.nprobe, nlist)))
    spec["train_sample"] = int(train)
    if kind in ("pca", "pca_ivf"):
        if params.pca_dim >= d:
            raise GraphError(f"pca_dim={params.pca_dim} must be smaller than the feature dimension d={d} "
                             f"(index={kind}; use index=flat or ivf for features this narrow)")
        if train < params.pca_dim:
            raise GraphError(f"PCA to pca_dim={params.pca_dim} dimensions needs at least as many training "
                             f"vectors, but only {train} are available")
        spec["pca_dim"] = int(params.pca_dim)
    if kind == "ivfpq":
        pq_m = params.pq_m or max(m for m in range(1, max(1, min(64, d // 4)) + 1) if d % m == 0)
        if d % pq_m:
            raise GraphError(f"pq_m={pq_m} must divide the feature dimension d={d}")
        if train < 256:  # 8-bit codes: 256 centroids per sub-quantizer
            raise GraphError(f"IVF-PQ needs at least 256 training vectors, got {train}")
        spec["pq_m"] = int(pq_m)
    if kind in _REFINED:
        spec["refine_factor"] = int(params.refine_factor)
    return spec


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


def _to_gpu(cpu_index: faiss.Index, gpu_device: int | None) -> faiss.Index:
    """Copy an index to one GPU (``gpu_device``) or shard it over all GPUs (None).

    Sharding (not FAISS's default replication) splits the vectors between the GPUs, so
    a database larger than one GPU's memory fits; FAISS searches every shard and merges.
    """
    if gpu_device is None and faiss.get_num_gpus() > 1:
        options = faiss.GpuMultipleClonerOptions()
        options.shard = True
        return faiss.index_cpu_to_all_gpus(cpu_index, co=options)
    resources = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(resources, 0 if gpu_device is None else gpu_device, cpu_index)
    gpu_index.referenced_objects = [resources]  # the resources must outlive the index
    return gpu_index


def _training_rows(n: int, spec: dict) -> np.ndarray:
    rng = np.random.default_rng(spec.get("seed", 0))
    return np.sort(rng.choice(n, size=spec["train_sample"], replace=False))


def _needs_training(spec: dict) -> bool:
    return spec["index"] != "flat"


def trained_index(sample: np.ndarray | None, d: int, spec: dict, on_gpu: bool,
                  gpu_device: int | None = None) -> faiss.Index:
    """An empty index of ``d``-dimensional vectors as ``spec`` describes it (``resolve_index``),
    trained on ``sample`` (the rows ``_training_rows`` picks; None for flat) and ready for
    ``add``: on the GPU when asked. A PCA kind is FAISS's IndexPreTransform of a PCAMatrix
    (trained on the CPU) and an exact or IVF index of the reduced vectors (trained on the same
    sample, reduced); it is searched with the raw vectors, and its distances are those of the
    reduced ones: callers re-rank (``search_index``, ``build_search_index``)."""
    try:
        if spec["index"] in ("pca", "pca_ivf"):
            pca = faiss.PCAMatrix(d, spec["pca_dim"])
            pca.train(sample)
            inner_spec = {"index": "flat"} if spec["index"] == "pca" else {**spec, "index": "ivf"}
            inner = trained_index(pca.apply(sample), spec["pca_dim"], inner_spec, on_gpu, gpu_device)
            return faiss.IndexPreTransform(pca, inner)
        if spec["index"] == "flat":
            index = faiss.IndexFlatL2(d)
            return _to_gpu(index, gpu_device) if on_gpu else index
        quantizer = faiss.IndexFlatL2(d)
        if spec["index"] == "ivf":
            index = faiss.IndexIVFFlat(quantizer, d, spec["nlist"])
        else:
            index = faiss.IndexIVFPQ(quantizer, d, spec["nlist"], spec["pq_m"], 8)
        if on_gpu:  # k-means for the coarse quantizer on the GPU, the usual FAISS recipe
            index.clustering_index = _to_gpu(faiss.IndexFlatL2(d), gpu_device)
        index.train(sample)
        index.nprobe = spec["nprobe"]
        if on_gpu:
            index = _to_gpu(index, gpu_device)
            faiss.GpuParameterSpace().set_index_parameter(index, "nprobe", spec["nprobe"])
        return index
    except RuntimeError as exc:  # FAISS reports bad sizes (e.g. GPU PQ limits) this way
        raise GraphError(f"FAISS could not build the {spec} index of {d}-dimensional vectors: {exc}") from exc


def build_index(x: np.ndarray, spec: dict, on_gpu: bool, gpu_device: int | None = None) -> faiss.Index:
    """Train (for IVF and PCA) and fill the index described by ``spec`` (see ``resolve_index``)."""
    n, d = x.shape
    index = trained_index(x[_training_rows(n, spec)] if _needs_training(spec) else None, d, spec, on_gpu, gpu_device)
    try:
        index.add(x)
    except RuntimeError as exc:
        raise GraphError(f"FAISS could not fill the {spec} index with {n} x {d} vectors: {exc}") from exc
    return index


def search_index(
    index: faiss.Index, spec: dict, x_db: np.ndarray, queries: np.ndarray, n_results: int
) -> tuple[np.ndarray, np.ndarray]:
    """The ``n_results`` nearest rows of ``x_db`` (held by ``index``) for each query.

    Returns exact squared L2 distances, ascending, and row numbers of ``x_db``. The
    candidates of PCA and IVF-PQ indexes are re-ranked with exact distances from ``x_db``.
    A query that IVF finds fewer than ``n_results`` vectors for (the lists it probes are
    small) is searched exactly instead, so every row is complete; ``x_db`` must hold >=
    n_results rows.
    """
    refined = spec["index"] in _REFINED
    n_search = min(n_results * spec["refine_factor"] if refined else n_results, x_db.shape[0])
    distances, ids = index.search(queries, n_search)
    if refined:
        distances, ids = _exact_rerank(x_db, queries, ids, n_results)
    incomplete = np.flatnonzero((ids < 0).any(axis=1))
    if incomplete.size:
        distances[incomplete], ids[incomplete] = faiss.knn(queries[incomplete], x_db, n_results)
    return distances, ids


def _exact_rerank(x_db: np.ndarray, queries: np.ndarray, ids: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact distances to candidate rows ``ids`` (-1: none, at the end of a row), the ``keep``
    nearest first: FAISS's ``knn_L2sqr_by_idx`` (its re-ranking primitive, multi-threaded); a
    row with fewer than ``keep`` candidates ends in -1 ids, which ``search_index`` completes."""
    n, n_cand = ids.shape
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    distances = np.empty((n, keep), dtype=np.float32)
    found = np.empty((n, keep), dtype=np.int64)
    faiss.knn_L2sqr_by_idx(faiss.swig_ptr(queries), faiss.swig_ptr(x_db), faiss.swig_ptr(ids), x_db.shape[1], n,
                           x_db.shape[0], n_cand, keep, faiss.swig_ptr(distances), faiss.swig_ptr(found), n_cand)
    return distances, found


def recall_sample(n: int, n_queries: int, seed: int) -> np.ndarray:
    """The sorted query rows on which recall is measured (the same in every build of N rows)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(n_queries, n), replace=False))


def measure_recall(approx_distances: np.ndarray, exact_distances: np.ndarray) -> float:
    """recall@k of neighbour lists given their distances, rows aligned with the exact ones.

    A returned neighbour is a hit when it is no farther than the exact k-th neighbour
    (within ``_RECALL_RTOL``): with ties at the k-th distance, index sets are not unique,
    but a neighbour as close as the true k-th one is as good as it.
    """
    kth = exact_distances[:, -1:].astype(np.float64)
    hits = approx_distances <= kth + _RECALL_RTOL * np.abs(kth) + 1e-12
    return float(hits.mean()) if hits.size else 1.0


def knn_graph(
    features: np.ndarray,
    k: int,
    params: IndexParams | None = None,
    use_gpu: bool | None = None,
    query_batch: int = 16384,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """L2 kNN of every row of ``features`` among all rows, self excluded.

    Returns ``(distances, neighbors, info)``: squared L2 distances, shape (N, k),
    float32, ascending per row; neighbour row indices, shape (N, k), int64; and a
    JSON-like dict describing the index (``resolve_index``) plus ``recall`` (1.0 for
    exact search) and ``recall_method`` ("exact", "measured on Q random queries" or
    "not measured"). Queries run in blocks of ``query_batch`` rows so the (block, k+1)
    result buffers, not (N, k+1) temporaries inside FAISS, bound the peak memory of a
    single search call. Several GPUs hold shards of the index (FAISS IndexShards).
    """
    params = params or IndexParams()
    x = _validated_features(features, k, query_batch)
    on_gpu = resolve_use_gpu(use_gpu)
    if on_gpu and k + 1 > _GPU_MAX_K:
        raise GraphError(f"k={k} is too large for FAISS GPU search (k+1 must be <= {_GPU_MAX_K})")

    n, d = x.shape
    spec = resolve_index(params, n, n, d)
    index = build_index(x, {**spec, "seed": params.seed}, on_gpu)

    distances = np.empty((n, k), dtype=np.float32)
    neighbors = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, query_batch):
        stop = min(start + query_batch, n)
        block_d, block_i = search_index(index, spec, x, x[start:stop], k + 1)
        row_ids = np.arange(start, stop, dtype=np.int64)
        distances[start:stop], neighbors[start:stop] = _drop_self(block_d, block_i, row_ids)

    info = dict(spec)
    if spec["index"] == "flat":
        info.update(recall=1.0, recall_method="exact")
    elif params.recall_queries == 0:
        info.update(recall=None, recall_method="not measured")
    else:
        rows = recall_sample(n, params.recall_queries, params.seed)
        exact_d, exact_i = faiss.knn(x[rows], x, k + 1)
        exact_d, _ = _drop_self(exact_d, exact_i, rows)
        info.update(recall=measure_recall(distances[rows], exact_d),
                    recall_method=f"measured on {rows.size} random queries")
    return distances, neighbors, info


def knn_search(
    features: np.ndarray,
    k: int,
    use_gpu: bool | None = None,
    query_batch: int = 16384,
    params: IndexParams | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``knn_graph`` without the index description: ``(distances, neighbors)``.

    With the default ``params`` the search is exact up to 100000 samples.
    """
    distances, neighbors, _ = knn_graph(features, k, params, use_gpu, query_batch)
    return distances, neighbors


def umap_knn(features: np.ndarray, n_neighbors: int, use_gpu: bool | None = None) -> tuple[np.ndarray, np.ndarray]:
    """UMAP's ``precomputed_knn`` from FAISS: ``(indices, distances)``, (N, n_neighbors) each,
    every row's own sample first at distance 0, then its ``n_neighbors - 1`` nearest others by
    Euclidean (not squared) distance. Handing UMAP these spares it its own neighbour search,
    whose numba compilation alone takes about 10 s per process on this machine."""
    distances, neighbors = knn_search(np.ascontiguousarray(features, dtype=np.float32), n_neighbors - 1, use_gpu)
    n = len(neighbors)
    indices = np.concatenate([np.arange(n, dtype=np.int64)[:, None], neighbors], axis=1)
    distances = np.concatenate([np.zeros((n, 1), np.float32), np.sqrt(np.maximum(distances, 0))], axis=1)
    return indices, distances


def build_search_index(chunks: Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]], n: int, d: int,
                       params: IndexParams | None = None) -> tuple[faiss.Index, dict]:
    """The index the kNN graph searched (same type, same parameters: ``resolve_index``) over
    the features of N samples, on the CPU so that it can be saved; returns it with its spec.

    ``chunks()`` yields ``(ids, features)`` pairs: the samples' ids (0..N-1, each once, in any
    order, e.g. a partitioned dataset's stored order) and their (len(ids), d) features. It is
    called twice: once for the training sample (the rows ``build_index`` would train on, so
    the same index), once to add; only one chunk is in memory at a time, and the index holds
    the rest. A PCA or PQ index is wrapped in FAISS's IndexRefine, which keeps the raw vectors
    (as float16: 1.6 GB for 10^6 grey 28x28 images) and re-ranks ``refine_factor`` times the
    candidates by their distance, as ``search_index`` does (to float16's 3 significant digits
    per component: a training image still finds itself at distance ~0, within predict's
    1e-5 (1 + |q|^2)); the whole is an IndexIDMap, so a search returns the samples' ids
    whatever the chunks' order."""
    params = params or IndexParams()
    spec = resolve_index(params, n, n, d)
    seeded = {**spec, "seed": params.seed}
    sample = None
    if _needs_training(spec):
        rows = _training_rows(n, seeded)
        sample, found = np.empty((len(rows), d), dtype=np.float32), np.zeros(len(rows), dtype=bool)
        for ids, x in chunks():
            place = np.searchsorted(rows, ids).clip(max=len(rows) - 1)
            hit = rows[place] == ids
            sample[place[hit]], found[place[hit]] = x[hit], True
        if not found.all():
            raise GraphError(f"the features' chunks miss samples of the {n} (first missing: {int(rows[np.argmin(found)])})")
    base = trained_index(sample, d, seeded, on_gpu=False)
    del sample  # up to 256 000 training rows (800 MB at d = 784), not needed while the index fills
    index = base
    if spec["index"] in _REFINED:
        # the raw vectors for the re-ranking at half precision: at 10^6 images of 784 pixels,
        # 1.6 GB instead of 3.1 (measured: the float32 copy put the 10^6-image run over 6 GiB)
        refine = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_fp16)
        index = faiss.IndexRefine(base, refine)  # both empty: an add goes to each
        index.k_factor = spec["refine_factor"]
        index.referenced_objects = [base, refine]  # the refining index owns neither
    by_id = faiss.IndexIDMap(index)
    seen = np.zeros(n, dtype=bool)
    for ids, x in chunks():
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= n or seen[ids].any()):
            raise GraphError(f"the features' chunks repeat a sample or name one outside 0..{n - 1} "
                             f"(ids {int(ids.min())} to {int(ids.max())})")
        seen[ids] = True
        by_id.add_with_ids(np.ascontiguousarray(x, dtype=np.float32), ids)
    if not seen.all():
        raise GraphError(f"the features' chunks miss samples of the {n} (first missing: {int(np.argmin(seen))})")
    return by_id, spec


def save_search_index(path, index: faiss.Index) -> None:
    """FAISS's own serialisation, streamed into a temporary file that is then renamed into
    place (atomic_write_bytes): no second copy of the index in memory."""
    atomic_write_bytes(path, lambda f: faiss.write_index(index, faiss.PyCallbackIOWriter(f.write)))


def load_search_index(path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except (OSError, RuntimeError) as exc:
        raise GraphError(f"cannot read the FAISS index {path}: {exc}") from exc
