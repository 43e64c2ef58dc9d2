"""How often a sample's kNN graph neighbours share its class: the graph's purity, per view.

    python scripts/graph_purity.py DATA_DIR [DATA_DIR ...] [--k 3] [--view raw sobel]

For each prepared, labelled set and view it builds (or loads) the graph artifact the trainer
would use (`pipeline.ensure_graph`) and prints the share of the k neighbours of each sample that
carry its label. A diagnostic: labels are read here, never by training.
"""

from __future__ import annotations

import argparse

import numpy as np

from sddecc_dist.data import load_all
from sddecc_dist.graph import load_neighbors
from sddecc_dist.pipeline import GRAPH_VIEWS, ensure_graph, graph_path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dirs", nargs="+", metavar="DATA_DIR")
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--view", nargs="+", choices=GRAPH_VIEWS, default=list(GRAPH_VIEWS))
    args = parser.parse_args()
    for data_dir in args.data_dirs:
        images, labels = load_all(data_dir)
        if labels is None:
            raise SystemExit(f"{data_dir} has no labels: purity needs them")
        for view in args.view:
            ensure_graph(data_dir, args.k, images, view=view)
            neighbors, _ = load_neighbors(graph_path(data_dir, args.k, view))
            y = labels.numpy()
            print(f"{data_dir} {view}: kNN purity {np.mean(y[neighbors] == y[:, None]):.4f} (k={args.k}, N={len(y)})")


if __name__ == "__main__":
    main()
