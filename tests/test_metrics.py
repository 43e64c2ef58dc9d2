"""Tests for the clustering scores against brute force and scikit-learn."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from sddecc_dist.eval.metrics import cluster_acc, clustering_scores, correctly_matched


def brute_force_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Best accuracy over every injective matching between classes and clusters."""
    classes = np.unique(y_true)
    clusters = np.unique(y_pred)
    best = 0
    if clusters.size <= classes.size:
        for image in itertools.permutations(classes, clusters.size):
            mapping = dict(zip(clusters, image))
            best = max(best, sum(mapping[p] == t for t, p in zip(y_true, y_pred)))
    else:
        for image in itertools.permutations(clusters, classes.size):
            mapping = dict(zip(image, classes))  # unmatched clusters map to nothing: always wrong
            best = max(best, sum(mapping.get(p) == t for t, p in zip(y_true, y_pred)))
    return best / y_true.size


def test_permuted_labelling_has_accuracy_one() -> None:
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 6, size=500)
    relabel = np.array([3, 5, 0, 1, 4, 2]) * 10 + 7  # permuted and non-contiguous ids
    assert cluster_acc(y_true, relabel[y_true]) == 1.0
    scores = clustering_scores(y_true, relabel[y_true])
    assert scores == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


@pytest.mark.parametrize("n_clusters", [3, 4, 5])
def test_acc_matches_brute_force(n_clusters: int) -> None:
    rng = np.random.default_rng(n_clusters)
    for _ in range(20):
        y_true = rng.integers(0, 4, size=40)
        y_pred = rng.integers(0, n_clusters, size=40)
        assert cluster_acc(y_true, y_pred) == pytest.approx(brute_force_acc(y_true, y_pred))


def test_unmatched_clusters_count_as_errors() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y_pred = np.array([0, 0, 2, 2, 1, 1, 1, 1])  # class 0 split over two clusters
    assert cluster_acc(y_true, y_pred) == pytest.approx(6 / 8)
    assert cluster_acc(y_pred, y_true) == pytest.approx(6 / 8)


def test_correctly_matched_names_the_samples_acc_counts() -> None:
    # class "a" split over clusters 5 and 9: the larger part (5) is matched, 9 is left over
    y_true = np.array(["a", "a", "a", "b", "b", "b", "c", "c"])
    y_pred = np.array([5, 5, 9, 7, 7, 7, 3, 7])
    expected = np.array([True, True, False, True, True, True, True, False])
    np.testing.assert_array_equal(correctly_matched(y_true, y_pred), expected)
    assert cluster_acc(y_true, y_pred) == pytest.approx(6 / 8)


def test_nmi_ari_equal_sklearn() -> None:
    rng = np.random.default_rng(1)
    y_true = rng.choice([2, 5, 9, 11], size=300)
    y_pred = rng.integers(0, 5, size=300)
    scores = clustering_scores(y_true, y_pred)
    assert set(scores) == {"acc", "nmi", "ari"}
    assert all(isinstance(v, float) for v in scores.values())
    assert scores["nmi"] == pytest.approx(normalized_mutual_info_score(y_true, y_pred))
    assert scores["ari"] == pytest.approx(adjusted_rand_score(y_true, y_pred))
    assert scores["acc"] == pytest.approx(cluster_acc(y_true, y_pred))


def test_inputs_not_mutated() -> None:
    rng = np.random.default_rng(2)
    y_true = rng.integers(0, 4, size=50)
    y_pred = rng.integers(0, 5, size=50)
    true_copy, pred_copy = y_true.copy(), y_pred.copy()
    clustering_scores(y_true, y_pred)
    cluster_acc(y_true, y_pred)
    np.testing.assert_array_equal(y_true, true_copy)
    np.testing.assert_array_equal(y_pred, pred_copy)


def test_bad_label_shapes() -> None:
    with pytest.raises(ValueError, match="differ in length"):
        cluster_acc([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match="1-D"):
        cluster_acc(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="empty"):
        clustering_scores([], [])
