"""What the GCN's last propagation does to the self-labelling classifier's partition.

    python scripts/propagated_classifier.py RUN [--data-dir DIR]

For a finished run of a model with `model.self_label_head` it scores, against the labels: the
self-labelled start (RUN/self_label_assignments.txt), the final assignment, the final model's
classifier alone (argmax of its logits), those logits averaged over the kNN graph once and
twice (argmax Â z, Â² z: what Eq. 17's last propagation can do with them at best), the
classifier's probabilities averaged once (argmax Â softmax(z)), and the logits averaged once over
other graphs: the kNN graph cut along the self-labelled partition (train.joint_graph=
within_start), and k = 3 nearest-neighbour graphs of the final codes and of the logits
themselves. A diagnostic: labels are read here, never by training.
"""

from __future__ import annotations

import argparse

import numpy as np
import scipy.sparse as sp
import torch

from sddecc_dist.data import load_all
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.graph import (
    edges_within,
    knn_search,
    load_neighbors,
    normalized_adjacency,
    renormalize,
    symmetric_adjacency,
)
from sddecc_dist.model.gcn import smooth
from sddecc_dist.pipeline import graph_path, graph_view
from sddecc_dist.run_folder import RunFolder, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--data-dir", help="the run's data folder, if it moved (default: the run's config's)")
    args = parser.parse_args()
    run = RunFolder(args.run)
    trained = load_model(run.model_file("final"), args.data_dir)
    if trained.model.self_label_classifier is None:
        raise SystemExit(f"{run.model_file('final')} has no self-labelling classifier (model.self_label_head)")
    data_dir = args.data_dir or trained.config.data_dir
    images, labels = load_all(data_dir, trained.manifest)
    if labels is None:
        raise SystemExit(f"{data_dir} has no labels: this diagnostic needs them")
    labels = np.asarray(labels)
    with torch.no_grad():  # per chunk only its logits and codes are kept, not its feature maps
        encoded = [(e.logits, e.mean) for e in (trained.model.encode(images[i:i + 4096])
                                                for i in range(0, len(images), 4096))]
    logits, codes = torch.cat([e[0] for e in encoded]), torch.cat([e[1] for e in encoded])
    n = len(labels)
    neighbors, _ = load_neighbors(graph_path(data_dir, trained.config.graph.k, graph_view(trained.config, trained.manifest)))
    knn = symmetric_adjacency(neighbors, n)
    adjacency = renormalize(knn + sp.identity(n, format="csr"))
    self_labelled = np.loadtxt(run.self_label_assignments_path, dtype=np.int64)
    within = edges_within(knn, self_labelled)
    cut = renormalize(within + sp.identity(n, format="csr"))

    def knn_adjacency(features: torch.Tensor) -> torch.Tensor:
        return normalized_adjacency(knn_search(features.numpy().astype(np.float32), 3)[1], n)

    rows = {
        "self-labelled start": self_labelled,
        "final assignment (GCN)": run.read_assignments(),
        "final classifier alone": logits.argmax(1).numpy(),
        "Â logits": smooth(adjacency, logits, 1).argmax(1).numpy(),
        "Â² logits": smooth(adjacency, logits, 2).argmax(1).numpy(),
        "Â softmax(logits)": smooth(adjacency, torch.softmax(logits, 1), 1).argmax(1).numpy(),
        f"Â logits, the graph cut along the self-labelled partition ({within.nnz / knn.nnz:.1%} of its edges)":
            smooth(cut, logits, 1).argmax(1).numpy(),
        "Â logits, a 3-NN graph of the codes": smooth(knn_adjacency(codes), logits, 1).argmax(1).numpy(),
        "Â logits, a 3-NN graph of the logits": smooth(knn_adjacency(logits), logits, 1).argmax(1).numpy(),
    }
    print("| partition | ACC | NMI | ARI |\n| --- | --- | --- | --- |")
    for name, assignment in rows.items():
        scores = clustering_scores(labels, assignment)
        print(f"| {name} | {scores['acc']:.4f} | {scores['nmi']:.4f} | {scores['ari']:.4f} |")


if __name__ == "__main__":
    main()
