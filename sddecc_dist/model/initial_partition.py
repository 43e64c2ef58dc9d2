"""The first partition of the pretrained codes, whose cluster means start the centres μ_y.

Plain arrays in, plain arrays out: the trainer gathers and smooths the codes, scripts call the
same function on a checkpoint's codes.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import AgglomerativeClustering, KMeans


def initial_partition(
    codes: np.ndarray, n_clusters: int, method: str, *, graph: sp.spmatrix | None = None,
    n_init: int = 20, seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), centres (K, d) = each cluster's mean code) of `codes` (N, d).

    kmeans: seeded, `n_init` restarts. ward: Ward's agglomerative clustering, deterministic,
    allowed to merge two clusters only where `graph` (the kNN adjacency, any values) has an
    edge between them: sparse, so no N x N distance matrix; sklearn joins disconnected
    components itself, with a warning."""
    if method == "kmeans":
        kmeans = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(codes)
        return kmeans.labels_, kmeans.cluster_centers_
    if method == "ward":
        if graph is None:
            raise ValueError("the ward start merges along the kNN graph: pass graph=")
        labels = AgglomerativeClustering(n_clusters, linkage="ward", connectivity=graph).fit(codes).labels_
        return labels, np.stack([codes[labels == c].mean(0) for c in range(n_clusters)])
    raise ValueError(f"unknown initial partition {method!r}: expected 'kmeans' or 'ward'")
