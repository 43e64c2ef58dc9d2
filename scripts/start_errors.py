"""Where does the start go wrong: at its clusters' borders, or whole clusters (two classes
merged, one split)? On a run's pretrained codes (checkpoints/pretrain.pt):

    python scripts/start_errors.py runs/x/checkpoints/pretrain.pt --data-dir data/x [--seed 0]

Fits the trainer's start (UMAP + GMM on FAISS neighbours, with the size floor of the run's
config: the run's own start for the same seed) and prints, as JSON lines:
- its ACC, and the ACC of the most central 75 %, 50 % and 25 % of each cluster (under the
  whole partition's cluster-to-class matching; central = highest density of a Gaussian fitted
  to the cluster in the UMAP embedding). Errors at the borders: these rise towards 1. Errors
  of whole clusters: they stay near the whole partition's ACC, and no refinement of the
  borders (self-labelling on confident samples, SCAN or SPICE style) can mend them;
- the table of clusters (rows) against classes (columns);
- for each pair of clusters, the share of the smaller one's kNN edges (the codes' own
  neighbours, UMAP's) that cross to the other, in thousandths: a split class whose halves
  share few edges is split in the codes themselves, not by the GMM.
Labels are read here only, to score.
"""

import argparse
import json

import numpy as np
import scipy.sparse as sp
from scipy.stats import multivariate_normal

from sddecc_dist.data import load_all
from sddecc_dist.eval.metrics import correctly_matched
from sddecc_dist.graph.knn import umap_knn
from sddecc_dist.model.initial_partition import umap_gmm_labels, umap_neighbours
from sddecc_dist.run_folder import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_file")
    parser.add_argument("--data-dir", help="default: the model config's data_dir")
    parser.add_argument("--seed", type=int, default=0, help="the start's seed (a run's `seed`)")
    args = parser.parse_args()

    trained = load_model(args.model_file, args.data_dir)
    images, classes = load_all(args.data_dir or trained.config.data_dir)
    if classes is None:
        raise SystemExit("the data have no labels to score the start with")
    classes = classes.numpy()
    codes = trained.model.mean_codes(images, "cpu").numpy()
    k, n = trained.model.n_clusters, len(codes)
    train = trained.config.train
    if n > train.start_fit_sample:
        raise SystemExit(f"{n} codes: this script fits UMAP on all of them; at most {train.start_fit_sample}")
    neighbours = umap_knn(codes, umap_neighbours(n, k))
    labels, embedding = umap_gmm_labels(codes, k, train.kmeans_n_init, args.seed, train.start_fit_sample, neighbours,
                                        train.start_min_share)

    table = np.zeros((k, classes.max() + 1), dtype=int)  # clusters x classes, printed below
    np.add.at(table, (labels, classes), 1)
    correct = correctly_matched(classes, labels)
    density = np.empty(n)
    for c in range(k):
        members = labels == c
        points = embedding[members]
        covariance = np.cov(points.T) + 1e-5 * np.eye(points.shape[1])
        density[members] = multivariate_normal(points.mean(0), covariance, allow_singular=True).logpdf(points)
    central = {}
    for share in (0.75, 0.5, 0.25):
        kept = np.zeros(n, dtype=bool)
        for c in range(k):
            members = np.flatnonzero(labels == c)
            kept[members[np.argsort(-density[members], kind="stable")[:max(1, round(share * len(members)))]]] = True
        central[str(share)] = round(float(correct[kept].mean()), 4)
    print(json.dumps({"acc": round(float(correct.mean()), 4), "central_acc": central}))
    print(json.dumps({"clusters_by_classes": table.tolist()}))

    others = neighbours[0][:, 1:]  # each row's own sample first
    edges = sp.csr_matrix((np.ones(others.size), (np.repeat(np.arange(n), others.shape[1]), others.ravel())),
                          shape=(n, n))
    edges = ((edges + edges.T) > 0).astype(float)
    membership = sp.csr_matrix((np.ones(n), (np.arange(n), labels)), shape=(n, k))
    between = (membership.T @ edges @ membership).toarray()
    degree = between.sum(1)
    crossing = np.round(1000 * between / np.minimum.outer(degree, degree)).astype(int)
    np.fill_diagonal(crossing, 0)
    print(json.dumps({"crossing_edges_per_mille": crossing.tolist()}))


if __name__ == "__main__":
    main()
