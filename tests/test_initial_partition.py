"""The initial partition that starts the centres: k-means, or Ward along the kNN graph."""

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.cluster import KMeans

from sddecc_dist.model.initial_partition import consensus_choice, initial_partition

# Four points on a line; the partition into two that Ward's criterion prefers is {0, 1}, {5, 6}.
LINE = np.array([[0.0], [1.0], [5.0], [6.0]])


def _graph(edges, n=4):
    rows, cols = zip(*edges)
    return sp.csr_matrix((np.ones(len(edges)), (rows, cols)), shape=(n, n))


def _same_partition(labels, groups):
    return sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels)) == sorted(groups)


def test_ward_merges_only_along_graph_edges():
    # With every pair connected, Ward gives {0, 1}, {2, 3}.
    complete = _graph([(i, j) for i in range(4) for j in range(4) if i != j])
    labels, _ = initial_partition(LINE, 2, "ward", graph=complete)
    assert _same_partition(labels, [[0, 1], [2, 3]])
    # Edges 0-2, 1-3, 2-3 only: {2, 3} merge first (cost ½·1² = 0.5); then {2, 3} may join
    # 0 (cost ⅔·5.5² = 20.2) or 1 (cost ⅔·4.5² = 13.5), never 0 with 1 directly.
    labels, centres = initial_partition(LINE, 2, "ward", graph=_graph([(0, 2), (1, 3), (2, 3)]))
    assert _same_partition(labels, [[0], [1, 2, 3]])
    np.testing.assert_allclose(sorted(centres[:, 0]), [0.0, 4.0])


def test_centres_are_the_cluster_means_and_kmeans_is_sklearns():
    codes = np.random.default_rng(0).normal(size=(200, 3)) + np.repeat(np.eye(3) * 6, [70, 80, 50], axis=0)
    for method, graph in (("kmeans", None), ("ward", _graph([(i, (i + 1) % 200) for i in range(200)], 200))):
        labels, centres = initial_partition(codes, 3, method, graph=graph, n_init=4, seed=1)
        for c in range(3):
            np.testing.assert_allclose(centres[c], codes[labels == c].mean(0), atol=1e-6)
    reference = KMeans(3, n_init=4, random_state=1).fit(codes)
    labels, centres = initial_partition(codes, 3, "kmeans", n_init=4, seed=1)
    assert (labels == reference.labels_).all()
    np.testing.assert_allclose(centres, reference.cluster_centers_)


def test_bad_method_or_missing_graph_is_named():
    with pytest.raises(ValueError, match="unknown initial partition 'spectral'"):
        initial_partition(LINE, 2, "spectral")
    with pytest.raises(ValueError, match="ward start merges along the kNN graph"):
        initial_partition(LINE, 2, "ward")


def test_umap_gmm_start_recovers_separated_clusters_and_leaves_none_empty():
    """N2D's start on codes with an obvious answer: five well-separated Gaussian blobs in 6-d.
    Every blob is one cluster, the centres are the blobs' mean codes, no cluster is empty."""
    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(5), 60)
    codes = rng.normal(scale=0.3, size=(300, 6)) + 6.0 * rng.normal(size=(5, 6))[truth]
    labels, centres = initial_partition(codes, 5, "umap_gmm", n_init=3, seed=0)
    assert _same_partition(labels, [np.flatnonzero(truth == c).tolist() for c in range(5)])
    np.testing.assert_allclose(centres, np.stack([codes[labels == c].mean(0) for c in range(5)]))
    # seeded: the same call gives the same partition
    again, _ = initial_partition(codes, 5, "umap_gmm", n_init=3, seed=0)
    assert np.array_equal(labels, again)
    # more components than blobs: every component still names at least one sample
    labels, _ = initial_partition(codes, 8, "umap_gmm", n_init=1, seed=0)
    assert np.bincount(labels, minlength=8).min() >= 1


def test_consensus_choice_keeps_the_partition_the_others_agree_with():
    from sklearn.metrics import normalized_mutual_info_score

    truth = np.repeat(np.arange(4), 25)
    merged = np.where(truth == 1, 0, truth)  # two clusters merged, another split: UMAP + GMM's failure
    merged[truth == 3] = np.where(np.arange(25) < 12, 3, 1)
    relabelled = (truth + 1) % 4  # the same partition under other names
    rng = np.random.default_rng(0)
    noisy = truth.copy()
    noisy[rng.choice(100, 8, replace=False)] = rng.integers(0, 4, 8)
    assert consensus_choice([merged, relabelled, noisy]) == 1
    assert consensus_choice([truth]) == 0
    # against the criterion computed by brute force: the largest sum of NMI to the others
    candidates = [rng.integers(0, 4, 100) for _ in range(3)] + [merged, noisy]
    sums = [sum(normalized_mutual_info_score(a, b) for j, b in enumerate(candidates) if j != i)
            for i, a in enumerate(candidates)]
    assert consensus_choice(candidates) == int(np.argmax(sums))


def test_umap_gmm_with_candidates_keeps_the_consensus_of_its_seeds_fits():
    rng = np.random.default_rng(2)
    truth = np.repeat(np.arange(4), 50)
    codes = rng.normal(scale=1.0, size=(200, 5)) + 3.0 * rng.normal(size=(4, 5))[truth]
    fits = [initial_partition(codes, 4, "umap_gmm", n_init=2, seed=s)[0] for s in (5, 6, 7)]
    labels, centres = initial_partition(codes, 4, "umap_gmm", n_init=2, seed=5, candidates=3)
    np.testing.assert_array_equal(labels, fits[consensus_choice(fits)])
    np.testing.assert_allclose(centres, np.stack([codes[labels == c].mean(0) for c in range(4)]))


def test_umap_embedding_is_fitted_on_a_sample_and_places_the_rest():
    from sddecc_dist.model.initial_partition import umap_embedding

    rng = np.random.default_rng(1)
    truth = np.repeat(np.arange(3), 100)
    codes = rng.normal(scale=0.2, size=(300, 4)) + 5.0 * rng.normal(size=(3, 4))[truth]
    embedding = umap_embedding(codes, 3, seed=0, fit_sample=120)
    assert embedding.shape == (300, 4)  # min(10 components, d = 4)
    # the transformed samples land with their own blob: nearest blob centre in the embedding
    centres = np.stack([embedding[truth == c].mean(0) for c in range(3)])
    nearest = ((embedding[:, None] - centres[None]) ** 2).sum(2).argmin(1)
    assert (nearest == truth).mean() > 0.98


def test_a_refinement_gives_an_emptied_start_cluster_back_its_members():
    from sddecc_dist.model.initial_partition import keep_start_clusters

    start = np.array([0, 0, 1, 1, 2, 2, 3])
    refined = np.array([0, 1, 1, 1, 1, 1, 0])  # clusters 2 and 3 emptied, a sample of 0 moved
    np.testing.assert_array_equal(keep_start_clusters(refined, start), [0, 1, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(keep_start_clusters(start, start), start)  # nothing emptied: unchanged
    np.testing.assert_array_equal(refined, [0, 1, 1, 1, 1, 1, 0])  # the input is not modified


def test_a_cluster_under_the_size_floor_is_split_away_and_its_points_join_the_nearest():
    """The failure it mends, in 2-d: classes A, B, C of 100 points each, and a tight blob of 10
    more of class A beside it. Three clusters were spent as {blob}, {A}, {B and C merged}: the
    floor (a fifth of N / K = 310 / 3) splits B-and-C by 2-means and gives the blob to A."""
    from sddecc_dist.model.initial_partition import split_small_clusters

    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [20.0, 0.0], [20.0, 8.0], [0.0, 5.0]])  # A, B, C, A's blob
    points = np.concatenate([rng.normal(scale=1.0, size=(100, 2)) + centres[c] for c in range(3)]
                            + [rng.normal(scale=0.1, size=(10, 2)) + centres[3]])
    truth = np.repeat([0, 1, 2, 0], [100, 100, 100, 10])
    before = np.repeat([1, 2, 2, 0], [100, 100, 100, 10])  # cluster 0 the blob, cluster 2 holds B and C
    after = split_small_clusters(points, before, 3, min_share=0.2, seed=0)
    assert _same_partition(after, [np.flatnonzero(truth == c).tolist() for c in range(3)])
    assert np.bincount(after, minlength=3).min() == 100
    np.testing.assert_array_equal(before, np.repeat([1, 2, 2, 0], [100, 100, 100, 10]))  # input unchanged
    # a floor the blob meets (10 >= 0.05 * 310 / 3), or clusters all above it: nothing moves
    np.testing.assert_array_equal(split_small_clusters(points, before, 3, min_share=0.05, seed=0), before)
    np.testing.assert_array_equal(split_small_clusters(points, truth, 3, min_share=0.2, seed=0), truth)


def test_clusters_that_meet_the_size_floor_are_kept():
    """Blobs of unequal sizes within five times of each other (the smallest 0.4 of N / K): the
    floor of 1/5 moves nothing, by itself or inside umap_gmm."""
    from sddecc_dist.model.initial_partition import split_small_clusters

    rng = np.random.default_rng(0)
    truth = np.repeat(np.arange(5), [30, 45, 60, 90, 150])
    codes = rng.normal(scale=0.3, size=(len(truth), 6)) + 6.0 * rng.normal(size=(5, 6))[truth]
    np.testing.assert_array_equal(split_small_clusters(codes, truth, 5, min_share=0.2, seed=0), truth)
    labels, _ = initial_partition(codes, 5, "umap_gmm", n_init=3, seed=0, min_share=0.2)
    assert _same_partition(labels, [np.flatnonzero(truth == c).tolist() for c in range(5)])
