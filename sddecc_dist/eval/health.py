"""Label-free health of a clustering: what tells a user whether to trust a run on data that
has no labels. Computed for every logged epoch and at the end of a run (metrics.jsonl,
metrics.json); never used to select a model.

    clusters_used        clusters holding at least one sample, out of K
    size_min/max         the smallest and largest cluster, as fractions of N
    size_entropy         entropy of the cluster sizes / log K: 1 for equal sizes, 0 for one cluster
    start_agreement      adjusted Rand index between the assignment and the start's (the
                         partition the joint phase began from): how far training moved it
    silhouette           silhouette of the assignment on the codes (a seeded sample of at most
                         `silhouette_sample` samples): > 0 when clusters are compact and apart.
                         Only the sample's codes are needed (`silhouette_ids`), so a caller
                         encodes 2000 images for it, not N.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import adjusted_rand_score, silhouette_score

__all__ = ["DEGENERATE_LARGEST", "cluster_health", "degenerate_warnings", "silhouette_ids"]

# A cluster holding more than this fraction of N, with K >= 2, is called degenerate.
DEGENERATE_LARGEST = 0.5


def silhouette_ids(n: int, silhouette_sample: int = 2000, seed: int = 0) -> np.ndarray:
    """The samples the silhouette is computed on, sorted: the first `silhouette_sample` of a
    seeded permutation of 0..N-1 (the draw scikit-learn's silhouette_score(sample_size=...) makes)."""
    return np.sort(np.random.RandomState(seed).permutation(n)[:silhouette_sample])


def cluster_health(assignments: np.ndarray, n_clusters: int, *, start: np.ndarray | None = None,
                   codes: np.ndarray | None = None, code_ids: np.ndarray | None = None,
                   silhouette_sample: int = 2000, seed: int = 0) -> dict:
    """The figures above for one assignment (N,) of ids in 0..K-1. `codes`: the codes of the
    samples `code_ids` (all N when None; at least the silhouette's sample, silhouette_ids)."""
    assignments = np.asarray(assignments)
    sizes = np.bincount(assignments, minlength=n_clusters) / len(assignments)
    used = sizes[sizes > 0]
    entropy = float(-(used * np.log(used)).sum() / np.log(n_clusters)) if n_clusters > 1 else 1.0
    health = {
        "clusters_used": int(len(used)),
        "size_min": round(float(sizes.min()), 6),
        "size_max": round(float(sizes.max()), 6),
        "size_entropy": round(entropy, 6),
    }
    if start is not None:
        health["start_agreement"] = round(float(adjusted_rand_score(start, assignments)), 6)
    if codes is not None:
        sample = silhouette_ids(len(assignments), silhouette_sample, seed)
        if code_ids is None:
            sample_codes = codes[sample]
        else:
            position = np.searchsorted(code_ids, sample)
            if not np.array_equal(code_ids[np.minimum(position, len(code_ids) - 1)], sample):
                raise ValueError("cluster_health: `code_ids` must hold every sample of silhouette_ids(N)")
            sample_codes = codes[position]
        sample_labels = assignments[sample]
        n_used = len(np.unique(sample_labels))
        health["silhouette"] = None
        if 2 <= n_used < len(sample):
            health["silhouette"] = round(float(silhouette_score(sample_codes, sample_labels)), 6)
    return health


def degenerate_warnings(health: dict, n_clusters: int) -> list[str]:
    """What makes a result untrustworthy, in words (empty: none found)."""
    warnings = []
    if health["clusters_used"] < n_clusters:
        warnings.append(f"only {health['clusters_used']} of {n_clusters} clusters hold samples")
    # Half the samples in one cluster is degenerate for K >= 3; with K = 2 one of the two always
    # holds half or more, so there it takes 1.5 times its even share (75 %).
    if n_clusters >= 2 and health["size_max"] > max(DEGENERATE_LARGEST, 1.5 / n_clusters):
        warnings.append(f"one cluster holds {health['size_max']:.0%} of the samples")
    return warnings
