"""How much does the UMAP + GMM start depend on its seed, and which candidate does the
consensus choice keep? On a run's pretrained codes (checkpoints/pretrain.pt):

    python scripts/start_candidates.py runs/x/checkpoints/pretrain.pt --data-dir data/x --candidates 5
    python scripts/start_candidates.py runs/x/checkpoints/pretrain.pt --data-dir data/x --min-share 0.2

Prints each seed's ACC / NMI (labels are read here only, to score), their mean, and the
candidate `consensus_choice` keeps without labels (docs/method.md, "Five starts"); with
--min-share, each seed's fit also with that size floor (`split_small_clusters`) beside it, and
the smallest cluster's share of N / K of both (the floor applied to the same seed's UMAP
embedding and GMM as the plain fit). UMAP's neighbours come from FAISS where the trainer's
start takes them from there (`train/inference.py`: up to `train.start_fit_sample` codes), so
the first seed's fit is the run's own start.
"""

import argparse
import json

import numpy as np

from sddecc_dist.data import load_all
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.graph.knn import umap_knn
from sddecc_dist.model.initial_partition import (consensus_choice, gmm_partition, split_small_clusters,
                                                 umap_embedding, umap_neighbours)
from sddecc_dist.run_folder import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_file")
    parser.add_argument("--data-dir", help="default: the model config's data_dir")
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0, help="the first candidate's seed")
    parser.add_argument("--min-share", type=float, default=0.0, help="also each fit with this size floor")
    args = parser.parse_args()

    trained = load_model(args.model_file, args.data_dir)
    images, labels = load_all(args.data_dir or trained.config.data_dir)
    if labels is None:
        raise SystemExit("the data have no labels to score the candidates with")
    codes = trained.model.mean_codes(images, "cpu").numpy()
    k = trained.model.n_clusters
    fit_sample = trained.config.train.start_fit_sample
    knn = umap_knn(codes, umap_neighbours(len(codes), k)) if len(codes) <= fit_sample else None  # the trainer's
    partitions, floored = [], []
    for seed in range(args.seed, args.seed + args.candidates):  # initial_partition's umap_gmm, step by step
        embedding = umap_embedding(codes, k, seed, fit_sample, knn)
        partitions.append(gmm_partition(embedding, k, n_init=10, seed=seed))
        if args.min_share:
            floored.append(split_small_clusters(embedding, partitions[-1], k, args.min_share, seed))
    report = _summary(partitions, labels.numpy(), k)
    chosen = consensus_choice(partitions)
    report.update(chosen=chosen, chosen_acc=report["acc"][chosen])
    if args.min_share:
        report["floored"] = _summary(floored, labels.numpy(), k)
    print(json.dumps(report))


def _summary(partitions: list[np.ndarray], labels: np.ndarray, k: int) -> dict:
    """Each partition's ACC and NMI, their mean ACC, and its smallest cluster's share of N / K."""
    scores = [clustering_scores(labels, p) for p in partitions]
    return {"acc": [round(s["acc"], 3) for s in scores], "nmi": [round(s["nmi"], 3) for s in scores],
            "mean_acc": round(float(np.mean([s["acc"] for s in scores])), 3),
            "min_share": [_smallest_share(p, k) for p in partitions]}


def _smallest_share(partition: np.ndarray, k: int) -> float:
    """The smallest cluster's size over N / K."""
    return round(float(np.bincount(partition, minlength=k).min() * k / len(partition)), 3)


if __name__ == "__main__":
    main()
