"""The initial partition (k-means or Ward along the kNN graph) of a checkpoint's mean codes,
raw and smoothed over the kNN graph (Â^t Z).

    python scripts/kmeans_on_codes.py runs/usps-s0/checkpoints/pretrain.pt --smoothing 0 4 --method kmeans ward

Prints ACC / NMI / ARI for each method and number of smoothing steps: the "AE + k-means"
baseline (k-means, t = 0) and what `train.center_init` with `train.center_init_smoothing` = t
starts the joint phase from.
"""

import argparse

from sddecc_dist.data import load_all
from sddecc_dist.graph import to_scipy_csr
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.model.gcn import smooth
from sddecc_dist.model.initial_partition import initial_partition
from sddecc_dist.pipeline import ensure_graph, graph_view
from sddecc_dist.run_folder import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--smoothing", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--n-init", type=int, default=20)
    parser.add_argument("--method", nargs="+", choices=["kmeans", "ward"], default=["kmeans"])
    args = parser.parse_args()

    trained = load_model(args.checkpoint)
    config, manifest, model = trained.config, trained.manifest, trained.model  # with the run's own resolved config
    n_clusters = model.n_clusters
    images, labels = load_all(config.data_dir, manifest)
    codes = model.mean_codes(images, "cpu")
    adjacency = ensure_graph(config.data_dir, config.graph.k, images, view=graph_view(config, manifest))
    graph = to_scipy_csr(adjacency)
    for steps in sorted(args.smoothing):
        smoothed = smooth(adjacency, codes, steps)
        for method in args.method:
            partition, _ = initial_partition(smoothed.numpy(), n_clusters, method, graph=graph,
                                             n_init=args.n_init, seed=config.seed)
            scores = clustering_scores(labels.numpy(), partition)
            print(f"{method} smoothing {steps}: " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
