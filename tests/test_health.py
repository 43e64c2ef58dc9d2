"""Label-free health of an assignment, against hand-computed figures."""

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, silhouette_score

from sddecc_dist.eval.health import cluster_health, degenerate_warnings, silhouette_ids


def test_sizes_entropy_and_agreement_by_hand():
    assignments = np.array([0, 0, 0, 1, 1, 3])  # K = 4: cluster 2 empty
    start = np.array([0, 0, 1, 1, 1, 3])
    health = cluster_health(assignments, 4, start=start)
    assert health["clusters_used"] == 3
    assert health["size_min"] == 0.0 and health["size_max"] == pytest.approx(0.5)
    p = np.array([3, 2, 1]) / 6
    assert health["size_entropy"] == pytest.approx(-(p * np.log(p)).sum() / math.log(4), abs=1e-6)
    assert health["start_agreement"] == pytest.approx(adjusted_rand_score(start, assignments), abs=1e-6)
    assert cluster_health(np.arange(8) % 4, 4)["size_entropy"] == pytest.approx(1.0)


def test_silhouette_on_the_codes_matches_scikit_learn():
    rng = np.random.default_rng(0)
    codes = np.concatenate([rng.normal(0, 0.1, (50, 2)), rng.normal(3, 0.1, (50, 2))])
    assignments = np.repeat([0, 1], 50)
    health = cluster_health(assignments, 2, codes=codes)
    assert health["silhouette"] == pytest.approx(silhouette_score(codes, assignments), abs=1e-6)
    assert health["silhouette"] > 0.9
    # one cluster: no silhouette (it is undefined), not an error
    assert cluster_health(np.zeros(100, dtype=int), 2, codes=codes)["silhouette"] is None


def test_degenerate_results_are_named():
    collapsed = cluster_health(np.zeros(10, dtype=int), 5)
    assert degenerate_warnings(collapsed, 5) == ["only 1 of 5 clusters hold samples",
                                                 "one cluster holds 100% of the samples"]
    healthy = cluster_health(np.arange(10) % 5, 5)
    assert degenerate_warnings(healthy, 5) == []
    # two clusters: 54 % in one is a plain class imbalance (USPS digits 0 and 1), 80 % is not
    assert degenerate_warnings({"clusters_used": 2, "size_max": 0.54}, 2) == []
    assert degenerate_warnings({"clusters_used": 2, "size_max": 0.8}, 2) == ["one cluster holds 80% of the samples"]
    assert degenerate_warnings({"clusters_used": 3, "size_max": 0.54}, 3) == ["one cluster holds 54% of the samples"]


def test_silhouette_needs_only_its_sample_codes_and_is_scikit_learns_sampled_one():
    rng = np.random.default_rng(1)
    assignments = rng.integers(0, 3, 500)
    codes = rng.normal(0, 1, (500, 4)) + assignments[:, None]
    expected = silhouette_score(codes, assignments, sample_size=100, random_state=7)
    whole = cluster_health(assignments, 3, codes=codes, silhouette_sample=100, seed=7)
    ids = silhouette_ids(500, 100, seed=7)
    sampled = cluster_health(assignments, 3, codes=codes[ids], code_ids=ids, silhouette_sample=100, seed=7)
    assert whole["silhouette"] == pytest.approx(expected, abs=1e-6)
    assert sampled["silhouette"] == whole["silhouette"]
    with pytest.raises(ValueError, match="code_ids"):
        cluster_health(assignments, 3, codes=codes[ids[1:]], code_ids=ids[1:], silhouette_sample=100, seed=7)
