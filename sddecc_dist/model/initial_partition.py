"""The first partition of the pretrained codes, whose cluster means start the centres μ_y.

Plain arrays in, plain arrays out: the trainer gathers and smooths the codes, scripts call the
same function on a checkpoint's codes.
"""

from __future__ import annotations

import functools
import itertools
import warnings

import numpy as np
import scipy.sparse as sp
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import normalized_mutual_info_score
from sklearn.mixture import GaussianMixture

# N2D's manifold (McConville et al. 2020): UMAP to this many dimensions, this many neighbours
# (fewer when a cluster of N/K samples has fewer), min_dist 0 (tight clusters for the GMM).
UMAP_COMPONENTS = 10
UMAP_NEIGHBOURS = 20


@functools.cache
def _umap():
    """umap-learn, imported on first use (0.8 s of numba and pynndescent that a run with
    another start, or a command that never fits UMAP, need not pay), with numba keeping its
    compiled functions on disk. umap-learn declares most of them without `cache=True`, so
    every process compiled them again: about 5.5 s of a 400-sample start's 6 s (0.4 s from
    the cache). `enable_caching` is what numba's own `cache=True` calls; where numba finds no
    usable cache folder it raises, and that function compiles per process, as before."""
    import umap
    import umap.distances
    import umap.layouts
    import umap.sparse
    import umap.umap_
    import umap.utils
    from numba.core.registry import CPUDispatcher

    for module in (umap.umap_, umap.layouts, umap.utils, umap.distances, umap.sparse):
        for function in vars(module).values():
            if isinstance(function, CPUDispatcher):
                try:
                    function.enable_caching()
                except RuntimeError:  # "cannot cache function ...: no locator available"
                    pass
    return umap


def initial_partition(
    codes: np.ndarray, n_clusters: int, method: str, *, graph: sp.spmatrix | None = None,
    n_init: int = 20, seed: int = 0, fit_sample: int = 100_000, knn: tuple[np.ndarray, np.ndarray] | None = None,
    candidates: int = 1, min_share: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), centres (K, d) = each cluster's mean code) of `codes` (N, d).

    kmeans: seeded, `n_init` restarts. ward: Ward's agglomerative clustering, deterministic,
    allowed to merge two clusters only where `graph` (the kNN adjacency, any values) has an
    edge between them: sparse, so no N x N distance matrix; sklearn joins disconnected
    components itself, with a warning. umap_gmm: N2D's start, a full-covariance Gaussian
    mixture (`n_init` starts, the best likelihood kept) on a UMAP embedding of the codes; UMAP
    is fitted on at most `fit_sample` codes (seeded) and the others are placed by its transform;
    `knn` is its neighbour search done already (see `umap_embedding`). With `candidates` > 1,
    umap_gmm is fitted that many times (seeds `seed`, `seed` + 1, ...) and the consensus
    candidate is kept (`consensus_choice`). With `min_share` > 0, umap_gmm's components of fewer
    than min_share * N / K samples are split away (`split_small_clusters`)."""
    if method == "umap_gmm":
        fits = [_umap_gmm(codes, n_clusters, n_init, seed + i, fit_sample, knn, min_share) for i in range(candidates)]
        return fits[consensus_choice([labels for labels, _ in fits])]
    if method == "kmeans":
        kmeans = KMeans(n_clusters, n_init=n_init, random_state=seed).fit(codes)
        return kmeans.labels_, kmeans.cluster_centers_
    if method == "ward":
        if graph is None:
            raise ValueError("the ward start merges along the kNN graph: pass graph=")
        labels = AgglomerativeClustering(n_clusters, linkage="ward", connectivity=graph).fit(codes).labels_
        return labels, np.stack([codes[labels == c].mean(0) for c in range(n_clusters)])
    raise ValueError(f"unknown initial partition {method!r}: expected 'kmeans', 'ward' or 'umap_gmm'")


def umap_neighbours(n: int, n_clusters: int) -> int:
    """UMAP's neighbourhood size for N samples in K clusters: 20, or N/K when fewer (a cluster
    must be able to hold a neighbourhood)."""
    return int(min(UMAP_NEIGHBOURS, max(2, n // n_clusters), n - 1))


def umap_embedding(codes: np.ndarray, n_clusters: int, seed: int, fit_sample: int = 100_000,
                   knn: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """N2D's UMAP embedding of `codes` (N, d): 10 dimensions (at most d), min_dist 0,
    `umap_neighbours(N, K)` neighbours. `knn` = (indices, Euclidean distances), each
    (N, umap_neighbours(N, K)) with every row's own sample first, is UMAP's neighbour search
    done by the caller (graph/knn.py's `umap_knn`, with FAISS); used when UMAP is fitted on
    every code (N <= fit_sample), since UMAP can transform new codes only with its own."""
    n = len(codes)
    neighbours = umap_neighbours(n, n_clusters)
    use_knn = knn is not None and n <= fit_sample
    if use_knn and knn[0].shape != (n, neighbours):
        raise ValueError(f"knn holds {knn[0].shape} neighbours; UMAP needs ({n}, {neighbours}), self first")
    reducer = _umap().UMAP(n_components=min(UMAP_COMPONENTS, codes.shape[1]), n_neighbors=neighbours, min_dist=0.0,
                        random_state=seed, n_jobs=1, precomputed_knn=(*knn, None) if use_knn else (None, None, None))
    if n <= fit_sample:
        with warnings.catch_warnings():  # "transform will be unavailable": it is not used
            warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]")
            return reducer.fit_transform(codes)
    fitted = np.sort(np.random.default_rng(seed).choice(n, size=fit_sample, replace=False))
    reducer.fit(codes[fitted])
    return reducer.transform(codes)


def _umap_gmm(codes: np.ndarray, n_clusters: int, n_init: int, seed: int, fit_sample: int,
              knn: tuple[np.ndarray, np.ndarray] | None, min_share: float) -> tuple[np.ndarray, np.ndarray]:
    labels, _ = umap_gmm_labels(codes, n_clusters, n_init, seed, fit_sample, knn, min_share)
    return labels, np.stack([codes[labels == c].mean(0) for c in range(n_clusters)])


def umap_gmm_labels(codes: np.ndarray, n_clusters: int, n_init: int, seed: int, fit_sample: int,
                    knn: tuple[np.ndarray, np.ndarray] | None, min_share: float) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,), the UMAP embedding they were fitted on) of one umap_gmm start: UMAP, the
    GMM, then the size floor when `min_share` > 0 (scripts read the embedding to diagnose it)."""
    embedding = umap_embedding(codes, n_clusters, seed, fit_sample, knn)
    labels = gmm_partition(embedding, n_clusters, n_init, seed)
    if min_share > 0:
        labels = split_small_clusters(embedding, labels, n_clusters, min_share, seed)
    return labels, embedding


def gmm_partition(embedding: np.ndarray, n_clusters: int, n_init: int, seed: int) -> np.ndarray:
    """Labels (N,) of a full-covariance Gaussian mixture fitted to `embedding` (`n_init`
    starts, the best likelihood kept), every component naming at least one sample."""
    mixture = GaussianMixture(n_clusters, covariance_type="full", n_init=n_init, random_state=seed,
                              reg_covar=1e-5).fit(embedding)
    responsibilities = mixture.predict_proba(embedding)
    labels = responsibilities.argmax(1)
    # A component that wins no sample still names a cluster: give it its most likely sample.
    for empty in np.flatnonzero(np.bincount(labels, minlength=n_clusters) == 0):
        candidates = np.flatnonzero(np.bincount(labels, minlength=n_clusters)[labels] > 1)
        labels[candidates[responsibilities[candidates, empty].argmax()]] = empty
    return labels


def split_small_clusters(points: np.ndarray, labels: np.ndarray, n_clusters: int, min_share: float,
                         seed: int) -> np.ndarray:
    """`labels` with every cluster of fewer than `min_share` * N / K points replaced: the largest
    other cluster is split in two by 2-means on `points` (one half takes the small cluster's
    id) and each of the small cluster's points joins the cluster whose mean (without them) is
    nearest. One cluster a round, at most K rounds.

    Why: with min_dist 0, UMAP packs a tight sub-group (27 of digits' 182 ones, written
    alike; at 10^6 warped digits, two groups of about 10 000 mixed images) into a dense blob
    that a GMM component takes whole, while two classes share another component: a cluster
    spent on a sub-group, two classes merged. A size floor is a prior on the clusters, not a
    fit: with min_share = 1/5, no set whose largest class holds at most five times its smallest
    has a class below the floor (its smallest class holds at least about a fifth of N / K). The
    split runs before the merge, so that 2-means does not just cut the blob away again."""
    labels = labels.copy()
    n = len(labels)
    for _ in range(n_clusters):
        counts = np.bincount(labels, minlength=n_clusters)
        small = int(counts.argmin())
        if counts[small] >= min_share * n / n_clusters:
            break
        blob = np.flatnonzero(labels == small)
        counts[small] = -1
        largest = np.flatnonzero(labels == int(counts.argmax()))
        halves = KMeans(2, n_init=10, random_state=seed).fit_predict(points[largest])
        labels[largest[halves == 1]] = small
        others = np.ones(n, dtype=bool)
        others[blob] = False
        means = np.stack([points[others & (labels == c)].mean(0) for c in range(n_clusters)])
        labels[blob] = ((points[blob, None, :] - means[None]) ** 2).sum(2).argmin(1)
    return labels


def consensus_choice(partitions: list[np.ndarray]) -> int:
    """Index of the partition with the highest mean NMI to the others: Strehl and Ghosh's
    (2002) average-NMI criterion for a consensus partition, searched over the candidates
    themselves. UMAP + GMM is unstable where clusters touch: one seed in a few merges two
    clusters and splits another (USPS-2000: ACC 0.94, 0.94, 0.81, 0.94, 0.81 over five seeds of
    one run's codes); the partition the others agree with most is the one they share."""
    if len(partitions) == 1:
        return 0
    agreement = np.zeros((len(partitions), len(partitions)))
    for i, j in itertools.combinations(range(len(partitions)), 2):
        agreement[i, j] = agreement[j, i] = normalized_mutual_info_score(partitions[i], partitions[j])
    return int(agreement.sum(1).argmax())  # ties: the first, i.e. the run's own seed


def keep_start_clusters(labels: np.ndarray, start: np.ndarray) -> np.ndarray:
    """`labels` (a partition that refines `start`, e.g. the self-labelling classifier's), with
    every cluster of `start` that `labels` left empty given back its start members: a refinement
    moves samples between clusters, it does not remove one (a start cluster of two images can
    lose both to a neighbour)."""
    labels = labels.copy()
    for cluster in np.setdiff1d(np.unique(start), labels):
        labels[start == cluster] = cluster
    return labels
