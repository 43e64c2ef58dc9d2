"""Time the pieces of the default recipe's full-graph steps on a prepared set (issue 18's cost).

    python scripts/bench_joint_step.py --data-dir data/mnist --model runs/mnist/checkpoints/pretrain.pt

It loads the images, the kNN graph and a pretrained model, then times, with the recipe's
settings (configs/default.yaml, or --config):
  graph_encoding   the no-grad encoder pass over every image, keeping what the GCN reads
  head step        one warm-up step: the GCN's forward and backward on the kept encoding
  joint step       one joint step with train.joint_encoder_nodes, the other nodes encoded now
  joint step, read one joint step whose other nodes' codes are read from an earlier pass
                   (train.joint_encoding_refresh > 1 between two passes)
and prints each with the process's peak RSS so far. Times are wall-clock seconds; run it on an
idle machine. It prints the BLAS settings of the environment, which change the figures.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from sddecc_dist.config import load_config
from sddecc_dist.data import load_all, read_manifest
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.pipeline import ensure_graph, graph_view
from sddecc_dist.run_folder import read_model_file
from sddecc_dist.utils import peak_memory_mib

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, type=Path, help="a prepared set (sddecc prepare)")
    parser.add_argument("--model", required=True, type=Path, help="a model file, e.g. RUN/checkpoints/pretrain.pt")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    env = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, environment {env}")

    config = load_config(args.config, [f"data_dir={args.data_dir}"])
    manifest = read_manifest(args.data_dir)
    images, _ = load_all(args.data_dir, manifest)
    adjacency = ensure_graph(args.data_dir, config.graph.k, images, False, params=config.graph,
                             view=graph_view(config, manifest))
    n, k = len(images), manifest.get("n_classes") or config.n_clusters
    model = SDDECC(tuple(manifest["image_shape"]), k, config.model)
    _, saved = read_model_file(args.model)
    model.load_trained(saved["model"])
    start_labels = torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0))
    common = {"adjacency": adjacency, "loss_config": config.loss, "start_labels": start_labels}
    print(f"{n} images {tuple(manifest['image_shape'])}, peak {peak_memory_mib():.0f} MiB")

    started = time.time()
    encoding = model.graph_encoding(images)
    print(f"graph_encoding of {n}: {time.time() - started:.2f} s, peak {peak_memory_mib():.0f} MiB")

    def timed(what: str, phase: str, **kwargs) -> None:
        for _ in range(args.repeats):
            model.zero_grad(set_to_none=True)
            started = time.time()
            terms, _ = model(phase, images, **common, **kwargs)
            forward = time.time() - started
            terms.total.backward()
            print(f"{what}: forward {forward:.2f} s, backward {time.time() - started - forward:.2f} s, "
                  f"peak {peak_memory_mib():.0f} MiB")

    timed("head step", "head", encoded=encoding)
    nodes = min(config.train.joint_encoder_nodes or n, n)
    joint = {"aux_index": torch.arange(min(config.train.joint_aux_batch_size, nodes)),
             "running_marginal": (torch.full((k,), 1.0 / k), 1.0)}
    if nodes < n:
        joint["encoder_index"] = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:nodes]
    timed(f"joint step ({nodes} nodes with gradients)", "joint", **joint)
    if nodes < n:
        timed("joint step, the others read", "joint", **joint, background=encoding)


if __name__ == "__main__":
    main()
