"""Can the start be refined without labels? EM of a Gaussian mixture, and label spreading
along the kNN graph, both begun from the initial partition of a checkpoint's smoothed codes.

    python scripts/refine_start.py runs/reproduce/usps/convae_mi_gcn-s0/checkpoints/pretrain.pt --smoothing 64

Prints ACC / NMI of the start (Ward by default, as `train.center_init`), then:
- EM of scikit-learn's GaussianMixture (spherical, diagonal, full covariances) whose weights,
  means and precisions are the start's clusters', after 1, 5 and up to 100 iterations;
- label spreading (Zhou et al. 2004: F <- alpha S F + (1 - alpha) Y0 on the normalised kNN
  adjacency S, 200 steps) from a confident core of the start: samples whose graph neighbours
  all share their cluster and whose full-covariance posterior gives their own cluster > 0.9.
docs/method.md ("What else was measured") says what these figures showed on USPS.
"""

import argparse
import warnings

import numpy as np
import torch
from scipy.special import softmax
from scipy.stats import multivariate_normal
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from sddecc_dist.data import load_all
from sddecc_dist.graph import to_scipy_csr
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.model.gcn import smooth
from sddecc_dist.model.initial_partition import initial_partition
from sddecc_dist.pipeline import ensure_graph, graph_view
from sddecc_dist.run_folder import load_model

REG_COVAR = 1e-6


def partition_moments(codes: np.ndarray, labels: np.ndarray, n_clusters: int
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cluster's weight (K,), mean (K, d) and covariance (K, d, d): the M-step of a
    Gaussian mixture on the partition's one-hot responsibilities."""
    weights = np.bincount(labels, minlength=n_clusters) / len(labels)
    means = np.stack([codes[labels == c].mean(0) for c in range(n_clusters)])
    covariances = np.stack([np.cov(codes[labels == c].T, bias=True) + REG_COVAR * np.eye(codes.shape[1])
                            for c in range(n_clusters)])
    return weights, means, covariances


def mixture_from_partition(moments: tuple[np.ndarray, np.ndarray, np.ndarray], covariance_type: str,
                           max_iter: int) -> GaussianMixture:
    """A GaussianMixture initialised at a partition's moments, through scikit-learn's documented
    *_init arguments."""
    weights, means, covariances = moments
    n_clusters = len(weights)
    if covariance_type == "full":
        precisions = np.stack([np.linalg.inv(c) for c in covariances])
    elif covariance_type == "diag":
        precisions = np.stack([1.0 / np.diag(c) for c in covariances])
    else:  # spherical: one variance per cluster, the mean of its diagonal
        precisions = np.array([1.0 / np.diag(c).mean() for c in covariances])
    return GaussianMixture(n_clusters, covariance_type=covariance_type, max_iter=max_iter, tol=1e-6,
                           reg_covar=REG_COVAR, weights_init=weights, means_init=means,
                           precisions_init=precisions)


def label_spreading(adjacency: torch.Tensor, seeds: np.ndarray, labels: np.ndarray, n_clusters: int,
                    alpha: float, steps: int = 200) -> np.ndarray:
    """argmax of F after `steps` of F <- alpha * S F + (1 - alpha) * Y0, Y0 one-hot on `seeds`."""
    start = torch.zeros(len(labels), n_clusters)
    start[torch.from_numpy(np.flatnonzero(seeds)), torch.from_numpy(labels[seeds])] = 1.0
    spread = start.clone()
    for _ in range(steps):
        spread = alpha * (adjacency @ spread) + (1 - alpha) * start
    return spread.argmax(1).numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--smoothing", type=int, default=64, help="t in Â^t Z, as train.center_init_smoothing")
    parser.add_argument("--method", choices=["kmeans", "ward"], default="ward")
    args = parser.parse_args()

    trained = load_model(args.checkpoint)
    config, manifest, model = trained.config, trained.manifest, trained.model
    n_clusters = model.n_clusters
    images, labels = load_all(config.data_dir, manifest)
    labels = labels.numpy()
    adjacency = ensure_graph(config.data_dir, config.graph.k, images, view=graph_view(config, manifest))
    graph = to_scipy_csr(adjacency)
    codes = smooth(adjacency, model.mean_codes(images, "cpu"), args.smoothing).numpy().astype(np.float64)

    def report(name: str, partition: np.ndarray, subset: np.ndarray | None = None) -> None:
        keep = slice(None) if subset is None else subset
        scores = clustering_scores(labels[keep], partition[keep])
        print(f"{name}: acc {scores['acc']:.4f} nmi {scores['nmi']:.4f}", flush=True)

    start, _ = initial_partition(codes, n_clusters, args.method, graph=graph, seed=config.seed)
    report(f"{args.method} start on Â^{args.smoothing} codes", start)
    moments = partition_moments(codes, start, n_clusters)

    for covariance_type in ("spherical", "diag", "full"):
        for max_iter in (1, 5, 100):
            mixture = mixture_from_partition(moments, covariance_type, max_iter)
            with warnings.catch_warnings():  # stopping early is the point of max_iter 1 and 5
                warnings.simplefilter("ignore", ConvergenceWarning)
                mixture.fit(codes)
            report(f"GMM {covariance_type}, {mixture.n_iter_} EM iterations", mixture.predict(codes))

    # The confident core: every graph neighbour in the same cluster, and the full-covariance
    # posterior of the start's own clusters (EM's first E-step) above 0.9 for that cluster.
    edges = graph.tocoo()
    off_diagonal = edges.row != edges.col
    rows, cols = edges.row[off_diagonal], edges.col[off_diagonal]
    disagreeing = np.bincount(rows[start[rows] != start[cols]], minlength=len(start))
    weights, means, covariances = moments
    log_joint = np.stack([multivariate_normal(mean, covariance).logpdf(codes) + np.log(weight)
                          for weight, mean, covariance in zip(weights, means, covariances)], axis=1)
    own = softmax(log_joint, axis=1)[np.arange(len(start)), start]
    core = (disagreeing == 0) & (own > 0.9)
    print(f"confident core: {core.mean():.3f} of the samples")
    report("  the start on the core", start, core)
    for alpha in (0.9, 0.99):
        report(f"label spreading from the core, alpha {alpha}",
               label_spreading(adjacency, core, start, n_clusters, alpha))


if __name__ == "__main__":
    main()
