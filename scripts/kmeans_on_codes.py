"""k-means on a checkpoint's mean codes, raw and smoothed over the kNN graph (Â^t Z).

    python scripts/kmeans_on_codes.py runs/usps-s0/checkpoints/pretrain.pt --smoothing 0 4

Prints ACC / NMI / ARI for each number of smoothing steps: the "AE + k-means" baseline
(t = 0) and what `train.center_init_smoothing` = t starts the joint phase from.
"""

import argparse

import torch
from sklearn.cluster import KMeans

from sddecc_dist.config import config_from_dict
from sddecc_dist.data import load_all, read_manifest
from sddecc_dist.metrics import clustering_scores
from sddecc_dist.model.gcn import smooth
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.stages import ensure_graph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--smoothing", type=int, nargs="+", default=[0, 4])
    parser.add_argument("--n-init", type=int, default=20)
    args = parser.parse_args()

    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    config = config_from_dict(state["config"], args.checkpoint)  # the run's own resolved config
    manifest = read_manifest(config.data_dir)
    n_clusters = config.n_clusters or manifest["n_classes"]
    model = SDDECC(tuple(manifest["image_shape"]), n_clusters, config.model)
    model.load_state_dict(state["model"])
    images, labels = load_all(config.data_dir, manifest)
    codes = model.mean_codes(images, "cpu")
    adjacency = ensure_graph(config.data_dir, config.graph.k, images)
    for steps in sorted(args.smoothing):
        smoothed = smooth(adjacency, codes, steps)
        kmeans = KMeans(n_clusters, n_init=args.n_init, random_state=config.seed).fit(smoothed.numpy())
        scores = clustering_scores(labels.numpy(), kmeans.labels_)
        print(f"smoothing {steps}: " + " ".join(f"{k} {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
