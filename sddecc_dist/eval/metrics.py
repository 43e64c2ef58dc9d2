"""Clustering quality scores: unsupervised accuracy, NMI and ARI.

Cluster ids are arbitrary, so accuracy is measured under the best one-to-one
matching of clusters to classes (Hungarian algorithm), as is standard in the
deep-clustering literature.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score
from sklearn.metrics.cluster import contingency_matrix

__all__ = ["cluster_acc", "clustering_scores", "correctly_matched"]


def _as_label_vectors(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate two label vectors of equal, non-zero length (never copies or mutates them)."""
    true = np.asarray(y_true)
    pred = np.asarray(y_pred)
    if true.ndim != 1 or pred.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shapes {true.shape} and {pred.shape}")
    if true.shape != pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {true.shape[0]} vs {pred.shape[0]}")
    if true.size == 0:
        raise ValueError("labels are empty")
    return true, pred


def correctly_matched(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Per sample, whether its cluster's class under the best one-to-one cluster -> class
    matching (Hungarian) is its own class: the samples ACC counts as right (ACC is the mean).

    The contingency matrix is classes x clusters and may be rectangular: with
    more clusters than classes the unmatched clusters' samples count as
    errors, and with fewer clusters the unmatched classes' samples do.
    Labels may be any values; they are remapped with ``np.unique``.
    """
    true, pred = _as_label_vectors(y_true, y_pred)
    _, true_index = np.unique(true, return_inverse=True)
    _, pred_index = np.unique(pred, return_inverse=True)
    contingency = contingency_matrix(true, pred)  # classes x clusters, each in np.unique order
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    class_of_cluster = np.full(contingency.shape[1], -1)  # -1: a cluster matched to no class
    class_of_cluster[cols] = rows
    return class_of_cluster[pred_index] == true_index


def cluster_acc(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Accuracy under the best one-to-one cluster -> class matching (`correctly_matched`)."""
    return float(correctly_matched(y_true, y_pred).mean())


def clustering_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """Return ``{'acc', 'nmi', 'ari'}`` for one clustering, as plain floats."""
    true, pred = _as_label_vectors(y_true, y_pred)
    return {
        "acc": cluster_acc(true, pred),
        "nmi": float(normalized_mutual_info_score(true, pred)),
        "ari": float(adjusted_rand_score(true, pred)),
    }
