"""kNN graph construction for the GCN branch of SDDECC, and its partitions for Cluster-GCN.

Plain arrays and files in, plain arrays and files out: which artifact of a data folder holds
which graph is the pipeline's business (sddecc_dist.pipeline)."""

from .adjacency import (
    build_graph,
    edges_within,
    load_graph,
    load_neighbors,
    normalize_with_self_loops,
    normalized_adjacency,
    renormalize,
    save_graph,
    symmetric_adjacency,
    to_scipy_csr,
)
from .distributed import FeatureTransform, assign_shards, build_graph_sharded, transformed
from .knn import (
    INDEX_TYPES,
    GraphError,
    build_search_index,
    knn_graph,
    knn_search,
    load_search_index,
    resolve_use_gpu,
    save_search_index,
    umap_knn,
)
from .partition import (
    PARTITION_FORMAT_VERSION,
    PARTITION_METHODS,
    graph_fingerprint,
    induced_adjacency,
    inside_edge_fraction,
    load_partitions,
    partition,
    partition_graph,
    partition_stats,
    save_partitions,
)

__all__ = [
    "FeatureTransform",
    "INDEX_TYPES",
    "PARTITION_FORMAT_VERSION",
    "PARTITION_METHODS",
    "GraphError",
    "assign_shards",
    "build_graph",
    "build_graph_sharded",
    "build_search_index",
    "edges_within",
    "graph_fingerprint",
    "induced_adjacency",
    "inside_edge_fraction",
    "knn_graph",
    "knn_search",
    "load_graph",
    "load_neighbors",
    "load_partitions",
    "load_search_index",
    "normalize_with_self_loops",
    "normalized_adjacency",
    "partition",
    "partition_graph",
    "partition_stats",
    "renormalize",
    "resolve_use_gpu",
    "save_graph",
    "save_partitions",
    "save_search_index",
    "symmetric_adjacency",
    "to_scipy_csr",
    "transformed",
    "umap_knn",
]
