"""kNN graph construction for the GCN branch of SDDECC."""

from .adjacency import build_graph, load_graph, normalized_adjacency, save_graph
from .knn import GraphError, knn_search, resolve_use_gpu

__all__ = [
    "GraphError",
    "build_graph",
    "knn_search",
    "load_graph",
    "normalized_adjacency",
    "resolve_use_gpu",
    "save_graph",
]
