"""Graph partitions for Cluster-GCN subgraph minibatching, and their on-disk artifact.

Cluster-GCN (Chiang et al., KDD 2019) trains the GCN on minibatches that are the union of a
few graph partitions, each propagating with the adjacency *induced* on the batch and
renormalised there. Partitions found by METIS keep most kNN edges inside a partition, so
little of the graph is dropped; a balanced random assignment is the baseline that shows how
much METIS buys (and the fallback where pymetis cannot be installed).

The artifact (``save_partitions``; the partition stage in ``sddecc_dist.pipeline`` names it
and builds it) holds the partition of every sample and records the dataset and graph it was
built from, so a partition of other shards or of another kNN graph is refused rather than
silently reused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from sddecc_dist.config import TrainConfig, choices
from sddecc_dist.utils import atomic_write_bytes

from .adjacency import normalize_with_self_loops, symmetric_adjacency
from .knn import GraphError

__all__ = [
    "PARTITION_FORMAT_VERSION",
    "PARTITION_METHODS",
    "graph_fingerprint",
    "induced_adjacency",
    "inside_edge_fraction",
    "load_partitions",
    "partition",
    "partition_graph",
    "partition_stats",
    "save_partitions",
]

PARTITION_METHODS = choices(TrainConfig, "partition_method")
PARTITION_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------- partitioning

def partition_graph(neighbors: np.ndarray, n_parts: int, method: str = "metis", seed: int = 0) -> np.ndarray:
    """Assign each of the N nodes of the kNN graph to one of ``n_parts`` partitions.

    ``method="metis"`` runs METIS k-way (through pymetis) on the symmetric, unweighted kNN
    graph ``symmetric_adjacency(neighbors, N)``, minimising the edges cut; ``"random"`` is a
    balanced random assignment (sizes differ by at most one), the baseline and fallback.
    Returns an (N,) int64 array with values in [0, n_parts), every partition non-empty.
    """
    adjacency = symmetric_adjacency(neighbors, np.asarray(neighbors).shape[0])
    return partition(adjacency, n_parts, method, seed)


def partition(adjacency: sp.csr_matrix, n_parts: int, method: str, seed: int) -> np.ndarray:
    """``partition_graph`` on the symmetric adjacency itself (the partition stage has it)."""
    n_nodes = adjacency.shape[0]
    if isinstance(n_parts, bool) or not isinstance(n_parts, (int, np.integer)):
        raise GraphError(f"n_parts must be an integer, got {n_parts!r}")
    if not 1 <= n_parts <= n_nodes:
        raise GraphError(f"n_parts must lie in [1, N={n_nodes}] so that no partition is empty, got {n_parts}")
    if method == "random":
        return _random_partition(n_nodes, int(n_parts), seed)
    if method == "metis":
        return _metis_partition(adjacency, int(n_parts), seed)
    raise GraphError(f"unknown partition method {method!r}; choose one of {', '.join(PARTITION_METHODS)}")


def _random_partition(n_nodes: int, n_parts: int, seed: int) -> np.ndarray:
    """Balanced: a random permutation dealt round-robin, so sizes are floor or ceil of N / P."""
    parts = np.empty(n_nodes, dtype=np.int64)
    parts[np.random.default_rng(seed).permutation(n_nodes)] = np.arange(n_nodes, dtype=np.int64) % n_parts
    return parts


def _metis_partition(adjacency: sp.csr_matrix, n_parts: int, seed: int) -> np.ndarray:
    try:
        import pymetis
    except ImportError as exc:  # a declared dependency, but say what to do if it is missing
        raise GraphError("partition method 'metis' needs pymetis (pip install pymetis); "
                         "method 'random' works without it") from exc
    if n_parts == 1:
        return np.zeros(adjacency.shape[0], dtype=np.int64)
    dtype = pymetis.zero_copy_dtype()  # METIS' idx_t: hand it arrays it can use without a copy
    graph = pymetis.CSRAdjacency(adj_starts=adjacency.indptr.astype(dtype), adjacent=adjacency.indices.astype(dtype))
    _, membership = pymetis.part_graph(n_parts, graph, options=pymetis.Options(seed=int(seed)))
    return _fill_empty_parts(adjacency, np.asarray(membership, dtype=np.int64), n_parts)


def _fill_empty_parts(adjacency: sp.csr_matrix, parts: np.ndarray, n_parts: int) -> np.ndarray:
    """Give every empty partition one node taken from the largest partition.

    METIS may leave partitions empty when P is close to N (tiny graphs), but a batch of
    whole partitions, and shards that list them, need every partition to hold a node. The
    node moved is the one with the fewest edges inside its partition, the cheapest to cut.
    """
    sizes = np.bincount(parts, minlength=n_parts)
    for empty in np.flatnonzero(sizes == 0):
        donor = int(np.argmax(sizes))  # >= 2 nodes, since N >= P and one partition is empty
        members = np.flatnonzero(parts == donor)
        rows = adjacency[members]
        inside = np.bincount(np.repeat(np.arange(members.size), np.diff(rows.indptr)),
                             weights=parts[rows.indices] == donor, minlength=members.size)
        moved = members[int(np.argmin(inside))]
        parts[moved] = empty
        sizes[donor] -= 1
        sizes[empty] += 1
    return parts


def inside_edge_fraction(adjacency: sp.csr_matrix, parts: np.ndarray) -> float:
    """Fraction of the undirected edges of the symmetric ``adjacency`` whose two ends share a
    partition: what Cluster-GCN keeps of the graph (1.0 for a graph without edges).

    Each undirected edge is stored once per direction, so counting stored entries gives the
    same ratio as counting edges, without building the upper triangle.
    """
    if adjacency.nnz == 0:
        return 1.0
    rows = np.repeat(np.arange(adjacency.shape[0]), np.diff(adjacency.indptr))
    return float(np.count_nonzero(parts[rows] == parts[adjacency.indices]) / adjacency.nnz)


def partition_stats(adjacency: sp.csr_matrix, parts: np.ndarray, n_parts: int) -> dict:
    """Sizes (min/mean/max), undirected edge count and inside-edge fraction, JSON-ready."""
    sizes = np.bincount(parts, minlength=n_parts)
    return {
        "sizes": {"min": int(sizes.min()), "mean": float(sizes.mean()), "max": int(sizes.max())},
        "n_edges": int(adjacency.nnz // 2),
        "inside_edge_fraction": inside_edge_fraction(adjacency, parts),
    }


def graph_fingerprint(neighbors: np.ndarray) -> str:
    """sha256 of the kNN lists (shape and int64 values): identifies the exact graph partitioned,
    which the dataset fingerprint alone does not (the graph can be rebuilt with another index)."""
    nbrs = np.ascontiguousarray(neighbors, dtype=np.int64)
    digest = hashlib.sha256(json.dumps(list(nbrs.shape)).encode())
    digest.update(nbrs.tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------- subgraph adjacency

def induced_adjacency(sym_adjacency: sp.csr_matrix, nodes: np.ndarray | torch.Tensor) -> torch.Tensor:
    """D_S^-1/2 (A_S + I) D_S^-1/2 of the subgraph induced by ``nodes``, float32 torch CSR.

    Row/column i is node ``nodes[i]``, in the order given. Edges leaving the subgraph are
    dropped and the degrees D_S are those of the subgraph (Cluster-GCN's renormalisation), so
    with all nodes in index order the result equals ``normalized_adjacency``.
    ``sym_adjacency`` is the output of ``symmetric_adjacency`` (self loops in it are ignored).
    Cost is O(edges of the selected rows * log |S|); nothing of size N is allocated.
    """
    nodes = nodes.cpu().numpy() if isinstance(nodes, torch.Tensor) else np.asarray(nodes)
    n_nodes = sym_adjacency.shape[0]
    if nodes.ndim != 1 or nodes.size == 0 or not np.issubdtype(nodes.dtype, np.integer):
        raise GraphError(f"nodes must be a non-empty 1-D integer array, got shape {nodes.shape} dtype {nodes.dtype}")
    if nodes.min() < 0 or nodes.max() >= n_nodes:
        raise GraphError(f"nodes must lie in [0, {n_nodes}), got range [{nodes.min()}, {nodes.max()}]")
    order = np.argsort(nodes, kind="stable")
    sorted_nodes = nodes[order]
    repeated = np.flatnonzero(sorted_nodes[1:] == sorted_nodes[:-1])
    if repeated.size:
        raise GraphError(f"nodes must be distinct, node {sorted_nodes[repeated[0]]} appears more than once")

    rows = sp.csr_matrix(sym_adjacency[nodes])  # the selected rows, in `nodes` order
    position = np.searchsorted(sorted_nodes, rows.indices).clip(max=nodes.size - 1)
    inside = sorted_nodes[position] == rows.indices
    local_rows = np.repeat(np.arange(nodes.size), np.diff(rows.indptr))[inside]
    local_cols = order[position[inside]]
    values = rows.data[inside]
    off_diagonal = local_rows != local_cols
    sub = sp.csr_matrix(
        (values[off_diagonal].astype(np.float64), (local_rows[off_diagonal], local_cols[off_diagonal])),
        shape=(nodes.size, nodes.size),
    )
    return normalize_with_self_loops(sub)


# ----------------------------------------------------------------------------- artifact

def save_partitions(path: str | Path, parts: np.ndarray, meta: dict) -> None:
    """Write ``parts`` (int64) and the JSON ``meta`` into one .npz, atomically (temp file, then
    rename), so a crash or a concurrent reader never sees half an artifact. The meta is stored
    as a JSON string so that loading needs no pickle."""
    try:
        text = json.dumps(meta)
    except TypeError as exc:
        raise GraphError(f"partition meta must contain only JSON-like values: {exc}") from exc
    parts = np.ascontiguousarray(parts, dtype=np.int64)
    atomic_write_bytes(path, lambda f: np.savez(f, parts=parts, meta=np.array(text)))


def load_partitions(
    path: str | Path,
    *,
    dataset_fingerprint: str | None = None,
    graph_fingerprint: str | None = None,
    rebuild_hint: str | None = None,
) -> tuple[np.ndarray, dict]:
    """Read a partition artifact; return (parts (N,) int64, meta).

    The structure is checked (every partition in [0, n_parts) non-empty, N as recorded), and,
    when given, the fingerprints of the shards and of the kNN graph it must have been built
    from: a mismatch is an error naming the file and ``rebuild_hint``.
    """
    path = Path(path)
    if not path.is_file():
        raise GraphError(f"partition artifact {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as payload:
            parts, meta = payload["parts"], json.loads(str(payload["meta"]))
    except (OSError, ValueError, KeyError, EOFError) as exc:
        raise GraphError(f"partition artifact {path} is corrupt or not a partition file: {exc}") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != PARTITION_FORMAT_VERSION:
        raise GraphError(f"partition artifact {path} has format version {version}, expected {PARTITION_FORMAT_VERSION}")
    n_parts = meta.get("n_parts")
    if parts.ndim != 1 or parts.dtype != np.int64 or parts.shape[0] != meta.get("n") or not isinstance(n_parts, int):
        raise GraphError(f"partition artifact {path} is corrupt: parts of shape {parts.shape} dtype {parts.dtype}, "
                         f"meta says n={meta.get('n')} n_parts={n_parts}")
    if parts.size and (parts.min() < 0 or parts.max() >= n_parts):
        raise GraphError(f"partition artifact {path} is corrupt: partition ids outside [0, {n_parts})")
    if np.count_nonzero(np.bincount(parts, minlength=n_parts)) != n_parts:
        raise GraphError(f"partition artifact {path} is corrupt: some of its {n_parts} partitions are empty")
    hint = f"; rebuild it with: {rebuild_hint}" if rebuild_hint else ""
    for name, expected in (("dataset_fingerprint", dataset_fingerprint), ("graph_fingerprint", graph_fingerprint)):
        if expected is not None and meta.get(name) != expected:
            raise GraphError(
                f"partition artifact {path} was built from another {name.split('_')[0]} "
                f"({name} {str(meta.get(name))[:12]}, now {expected[:12]}){hint}"
            )
    return parts, meta
