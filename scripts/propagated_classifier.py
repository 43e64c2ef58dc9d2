"""What the GCN's last propagation does to the self-labelling classifier's partition.

    python scripts/propagated_classifier.py RUN [--data-dir DIR]

For a finished run of a model with `model.self_label_head` it scores, against the labels: the
self-labelled start (RUN/self_label_assignments.txt), the final assignment, the final model's
classifier alone (argmax of its logits), those logits averaged over the kNN graph once and
twice (argmax Â z, Â² z: what Eq. 17's last propagation can do with them at best), and the
classifier's probabilities averaged once (argmax Â softmax(z)). A diagnostic: labels are read
here, never by training.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from sddecc_dist.data import load_all
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.graph import load_graph
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
    with torch.no_grad():
        logits = torch.cat([trained.model.encode(images[i:i + 4096]).logits for i in range(0, len(images), 4096)])
    adjacency, _ = load_graph(graph_path(data_dir, trained.config.graph.k, graph_view(trained.config, trained.manifest)))
    rows = {
        "self-labelled start": np.loadtxt(run.self_label_assignments_path, dtype=np.int64),
        "final assignment (GCN)": run.read_assignments(),
        "final classifier alone": logits.argmax(1).numpy(),
        "Â logits": smooth(adjacency, logits, 1).argmax(1).numpy(),
        "Â² logits": smooth(adjacency, logits, 2).argmax(1).numpy(),
        "Â softmax(logits)": smooth(adjacency, torch.softmax(logits, 1), 1).argmax(1).numpy(),
    }
    print("| partition | ACC | NMI | ARI |\n| --- | --- | --- | --- |")
    for name, assignment in rows.items():
        scores = clustering_scores(labels, assignment)
        print(f"| {name} | {scores['acc']:.4f} | {scores['nmi']:.4f} | {scores['ari']:.4f} |")


if __name__ == "__main__":
    main()
