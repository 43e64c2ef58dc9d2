"""Normalised kNN adjacency for the GCN branch, and its on-disk cache.

The GCN propagates with the renormalised adjacency of Kipf & Welling,
D^-1/2 (A + I) D^-1/2, where A is the symmetrised, unweighted kNN graph.
Everything is built from edge lists with ``scipy.sparse``: N can be large
enough that a dense N x N matrix would not fit in memory.
"""

from __future__ import annotations

import json
import os
import time
import warnings

import numpy as np
import scipy.sparse as sp
import torch

from sddecc_dist.config import IndexParams
from sddecc_dist.utils import atomic_torch_save

from .knn import GraphError, knn_graph, resolve_use_gpu

# torch prints a "sparse CSR support is in beta" warning on the first CSR tensor; the
# operations used here (construction, sparse.mm with gradients to the dense side) are tested.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

__all__ = [
    "normalized_adjacency", "normalize_with_self_loops", "symmetric_adjacency", "renormalize", "save_graph", "load_graph", "load_neighbors",
    "build_graph",
]

_FORMAT_VERSION = 1


def symmetric_adjacency(neighbors: np.ndarray, n_nodes: int) -> sp.csr_matrix:
    """Return the unweighted, symmetrised kNN graph A = max(A, A^T) without self loops.

    ``neighbors[i]`` lists the kNN of node i. A_ij = 1 when either node lists
    the other, so mutual neighbours are not counted twice and a neighbour
    listed twice in one row still weighs 1; self-edges are dropped. This is
    the graph that both the GCN normalisation and the METIS partitioning see,
    built from edge lists in O(N k) memory (float32 ones, sorted indices).
    """
    nbrs = np.asarray(neighbors)
    if nbrs.ndim != 2:
        raise GraphError(f"neighbors must be a 2-D (N, k) array, got shape {nbrs.shape}")
    if not np.issubdtype(nbrs.dtype, np.integer):
        raise GraphError(f"neighbors must hold integer indices, got dtype {nbrs.dtype}")
    if nbrs.shape[0] != n_nodes:
        raise GraphError(f"neighbors has {nbrs.shape[0]} rows but n_nodes={n_nodes}")
    if nbrs.size and (nbrs.min() < 0 or nbrs.max() >= n_nodes):
        raise GraphError(f"neighbor indices must lie in [0, {n_nodes}), got range [{nbrs.min()}, {nbrs.max()}]")

    rows = np.repeat(np.arange(n_nodes, dtype=np.int64), nbrs.shape[1])
    cols = nbrs.astype(np.int64, copy=False).ravel()
    off_diagonal = rows != cols
    rows, cols = rows[off_diagonal], cols[off_diagonal]

    adj = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, cols)), shape=(n_nodes, n_nodes))
    adj.data[:] = 1.0  # a neighbour listed twice in one row must still weigh 1
    adj = sp.csr_matrix(adj.maximum(adj.T))
    adj.sort_indices()
    return adj


def normalized_adjacency(neighbors: np.ndarray, n_nodes: int) -> torch.Tensor:
    """Return D^-1/2 (A + I) D^-1/2 as a float32 torch sparse CSR tensor.

    A is ``symmetric_adjacency(neighbors, n_nodes)`` (symmetrised, unweighted,
    self-edges ignored) so that the diagonal of A + I is exactly 1. D holds the
    row sums of A + I (always >= 1, so no division by zero).
    """
    return normalize_with_self_loops(symmetric_adjacency(neighbors, n_nodes))


def normalize_with_self_loops(sym_adjacency: sp.spmatrix) -> torch.Tensor:
    """D^-1/2 (A + I) D^-1/2 of a symmetric A without self loops (`renormalize` of A + I): the
    GCN's Â of the whole graph, of a Cluster-GCN subgraph, or of the graph cut along a partition."""
    n_nodes = sym_adjacency.shape[0]
    return renormalize(sym_adjacency + sp.identity(n_nodes, dtype=np.float64, format="csr"))


def edges_within(sym_adjacency: sp.csr_matrix, partition: np.ndarray) -> sp.csr_matrix:
    """The edges of a symmetric graph whose two ends lie in the same cluster of `partition`
    (one cluster index per node): the graph cut along the partition's boundaries, still
    symmetric, with sorted indices."""
    partition = np.asarray(partition)
    if partition.shape != (sym_adjacency.shape[0],):
        raise GraphError(f"the partition has shape {partition.shape}, the graph {sym_adjacency.shape[0]} nodes")
    coo = sym_adjacency.tocoo()
    keep = partition[coo.row] == partition[coo.col]
    within = sp.csr_matrix((coo.data[keep], (coo.row[keep], coo.col[keep])), shape=sym_adjacency.shape)
    within.sort_indices()
    return within


def renormalize(adj_with_self_loops: sp.spmatrix) -> torch.Tensor:
    """D^-1/2 M D^-1/2 of a symmetric sparse M (already holding its self loops) as a float32
    torch CSR tensor, with D the row sums of M computed in float64.

    Shared by the full graph (``normalized_adjacency``) and Cluster-GCN subgraphs
    (``induced_adjacency``), so both give bit-identical values on the same graph.
    """
    adj = sp.csr_matrix(adj_with_self_loops, dtype=np.float64)
    adj.sort_indices()
    n_rows, n_cols = adj.shape
    inv_sqrt_degree = 1.0 / np.sqrt(np.asarray(adj.sum(axis=1)).ravel())
    row_of_entry = np.repeat(np.arange(n_rows), np.diff(adj.indptr))
    values = adj.data * inv_sqrt_degree[row_of_entry] * inv_sqrt_degree[adj.indices]

    return torch.sparse_csr_tensor(
        torch.from_numpy(adj.indptr.astype(np.int64)),
        torch.from_numpy(adj.indices.astype(np.int64)),
        torch.from_numpy(values.astype(np.float32)),
        size=(n_rows, n_cols),
        dtype=torch.float32,
        check_invariants=False,  # built sorted and consistent by scipy above; the check costs O(nnz)
    )


def build_graph(
    features: np.ndarray, k: int, use_gpu: bool | None = None, params: IndexParams | None = None
) -> tuple[torch.Tensor, np.ndarray, dict]:
    """Run the kNN search and normalisation in one step.

    Returns ``(adjacency, neighbors, meta)`` where meta records what is needed
    to tell whether a cached graph still matches a run: k, n, metric,
    n_edges (stored nonzeros, self-loops included), seconds and backend, and how the
    graph was searched: the index and its parameters (``knn_graph``), recall@k and
    how it was measured, and world_size 1 (a sharded build records its own).
    """
    start = time.perf_counter()
    on_gpu = resolve_use_gpu(use_gpu)
    _, neighbors, info = knn_graph(features, k, params, use_gpu=on_gpu)
    adjacency = normalized_adjacency(neighbors, neighbors.shape[0])
    meta = {
        "k": int(k),
        "n": int(neighbors.shape[0]),
        "metric": "l2",
        "n_edges": int(adjacency.values().numel()),
        "seconds": time.perf_counter() - start,
        "backend": "faiss-gpu" if on_gpu else "faiss-cpu",
        **info,
        "world_size": 1,
    }
    return adjacency, neighbors, meta


def save_graph(path: str | os.PathLike, adjacency: torch.Tensor, neighbors: np.ndarray, meta: dict) -> None:
    """Write the graph to one file, atomically.

    The file is written to a temporary name beside it, fsynced and then renamed
    (``utils.atomic_write_bytes``), so a crash or a concurrent reader never sees a
    half-written graph. ``meta``
    must be JSON-like (str/int/float/bool/None, lists, dicts) because
    ``load_graph`` uses ``torch.load(weights_only=True)``, which refuses
    arbitrary pickled objects such as numpy scalars.
    """
    if adjacency.layout != torch.sparse_csr:
        raise GraphError(f"adjacency must be a torch sparse CSR tensor, got layout {adjacency.layout}")
    if not isinstance(meta, dict):
        raise GraphError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        json.dumps(meta)
    except TypeError as exc:
        raise GraphError(f"meta must contain only JSON-like values: {exc}") from exc

    payload = {
        "format_version": _FORMAT_VERSION,
        "crow_indices": adjacency.crow_indices().detach().cpu(),
        "col_indices": adjacency.col_indices().detach().cpu(),
        "values": adjacency.values().detach().cpu(),
        "shape": tuple(adjacency.shape),
        "neighbors": torch.from_numpy(np.ascontiguousarray(neighbors, dtype=np.int64)),
        "meta": meta,
    }
    atomic_torch_save(payload, path)


def to_scipy_csr(adjacency: torch.Tensor) -> sp.csr_matrix:
    """A torch CSR adjacency (as ``load_graph`` returns it, on the CPU) as a scipy CSR matrix."""
    return sp.csr_matrix((adjacency.values().numpy(), adjacency.col_indices().numpy(),
                          adjacency.crow_indices().numpy()), shape=tuple(adjacency.shape))


def load_graph(path: str | os.PathLike) -> tuple[torch.Tensor, dict]:
    """Read a file written by ``save_graph``; return (CSR adjacency, meta).

    Every structural invariant is checked so a truncated or foreign file
    fails here with the file name, not later inside a sparse matmul.
    """
    path = os.fspath(path)
    payload = _read_payload(path)
    n_rows, n_cols = payload["shape"]
    try:
        adjacency = torch.sparse_csr_tensor(
            payload["crow_indices"],
            payload["col_indices"],
            payload["values"],
            size=(n_rows, n_cols),
            dtype=torch.float32,
            check_invariants=True,
        )
    except RuntimeError as exc:
        raise GraphError(f"graph file {path!r} is corrupt: {exc}") from exc
    return adjacency, payload["meta"]


def load_neighbors(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read the (N, k) int64 kNN lists and meta of a file written by ``save_graph``.

    Subgraph training (Cluster-GCN) needs the unnormalised graph, which the
    neighbour lists give exactly; the stored adjacency is already normalised.
    """
    path = os.fspath(path)
    payload = _read_payload(path)
    return payload["neighbors"].numpy(), payload["meta"]


def _read_payload(path: str) -> dict:
    """torch.load a graph file and check its keys, format version, field types and shapes."""
    if not os.path.isfile(path):
        raise GraphError(f"graph file {path!r} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise GraphError(f"graph file {path!r} is corrupt or not a graph file: {exc}") from exc

    required = {"format_version", "crow_indices", "col_indices", "values", "shape", "neighbors", "meta"}
    if not isinstance(payload, dict) or not required <= payload.keys():
        raise GraphError(f"graph file {path!r} is corrupt or not a graph file: missing keys")
    if payload["format_version"] != _FORMAT_VERSION:
        raise GraphError(
            f"graph file {path!r} has format version {payload['format_version']}, expected {_FORMAT_VERSION}"
        )
    tensors_ok = all(
        isinstance(payload[key], torch.Tensor) for key in ("crow_indices", "col_indices", "values", "neighbors")
    )
    shape = payload["shape"]
    shape_ok = isinstance(shape, tuple) and len(shape) == 2 and shape[0] == shape[1]
    if not (tensors_ok and shape_ok and isinstance(payload["meta"], dict)):
        raise GraphError(f"graph file {path!r} is corrupt: unexpected field types or shape {shape!r}")
    n_rows = shape[0]
    if payload["neighbors"].ndim != 2 or payload["neighbors"].shape[0] != n_rows:
        raise GraphError(f"graph file {path!r} is corrupt: neighbors do not match the {n_rows}-node adjacency")
    return payload
