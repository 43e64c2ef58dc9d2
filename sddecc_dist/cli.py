"""`sddecc` command line: prepare, graph, train, evaluate."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from sddecc_dist.config import ConfigError
from sddecc_dist.utils import console


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. seed=1 output_dir=runs/x train.joint_epochs=50")


def run_train(args: argparse.Namespace) -> dict:
    from sddecc_dist.config import load_config
    from sddecc_dist.train.trainer import train

    overrides = list(args.overrides) + (["train.resume=true"] if args.resume else [])
    return train(load_config(args.config, overrides))


def _prepare(args) -> None:
    from sddecc_dist.stages import prepare_dataset

    prepare_dataset(args.source, args.out, from_dir=args.from_dir, split=args.split,
                    size=args.size, samples_per_shard=args.samples_per_shard)


def _graph(args) -> None:
    """Single process, or, under torchrun / accelerate launch with WORLD_SIZE > 1, one rank of
    a sharded build (each rank reads its share of the shards; rank 0 writes the artifact)."""
    import os

    from sddecc_dist.graph import IndexParams
    from sddecc_dist.stages import ensure_graph

    params = IndexParams(index=args.index, exact_max_n=args.exact_max_n, ivf_max_n=args.ivf_max_n,
                         nlist=args.nlist, nprobe=args.nprobe, pq_m=args.pq_m, train_sample=args.train_sample,
                         recall_queries=args.recall_queries)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        ensure_graph(args.data_dir, args.k, use_gpu=args.use_gpu, rebuild=args.rebuild, params=params)
        return

    import torch
    import torch.distributed as dist

    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend)  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the launcher
    try:
        if dist.get_world_size() != world_size:
            raise ConfigError(f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks")
        ensure_graph(args.data_dir, args.k, use_gpu=args.use_gpu, rebuild=args.rebuild, params=params, sharded=True)
    finally:
        if started_here:
            dist.destroy_process_group()


def _partition(args) -> None:
    """METIS partitions of the kNN graph and the shards rewritten in partition order (the
    artifacts the Cluster-GCN sampler streams); the training run builds them itself if missing."""
    from sddecc_dist.graph import ensure_partitions
    from sddecc_dist.stages import ensure_partitioned_shards, partitioned_dir

    if args.rebuild:  # both artifacts go: the shards are tied to the partition they were made from
        ensure_partitions(args.data_dir, args.k, args.parts, args.method, args.seed, rebuild=True)
        shutil.rmtree(partitioned_dir(args.data_dir, args.k, args.parts), ignore_errors=True)
    out = ensure_partitioned_shards(args.data_dir, args.k, args.parts, args.method,
                                    args.partitions_per_shard, seed=args.seed)
    print(out)


def _evaluate(args) -> None:
    """Score a run's assignments file against the labels in a prepared data folder."""
    import numpy as np

    from sddecc_dist.data import load_all
    from sddecc_dist.metrics import clustering_scores

    path = Path(args.run_dir) / "assignments.txt"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {args.run_dir} a finished run folder?")
    assignments = np.loadtxt(path, dtype=np.int64, ndmin=1)
    _, labels = load_all(args.data_dir)
    if labels is None:
        raise ConfigError(f"{args.data_dir} has no labels to score against")
    if len(labels) != len(assignments):
        raise ConfigError(f"{path} has {len(assignments)} assignments but {args.data_dir} has {len(labels)} samples")
    scores = clustering_scores(labels.numpy(), assignments)
    print(" ".join(f"{k} {v:.4f}" for k, v in scores.items()))  # the result: stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sddecc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="write a dataset as webdataset shards + dataset.json")
    prepare.add_argument("source", help="digits | usps | mnist | fashion-mnist | file.npz | image folder")
    prepare.add_argument("--out", required=True, help="output folder for shards and manifest")
    prepare.add_argument("--from", dest="from_dir", help="read raw files from this folder instead of downloading")
    prepare.add_argument("--split", default="all", choices=["all", "train", "test"])
    prepare.add_argument("--size", type=int, help="resize folder images to SIZE x SIZE")
    prepare.add_argument("--samples-per-shard", type=int, default=10000)
    prepare.set_defaults(func=_prepare)

    graph = commands.add_parser("graph", help="build the kNN graph artifact of a prepared folder")
    graph.add_argument("data_dir")
    graph.add_argument("--k", type=int, default=3)
    graph.add_argument("--use-gpu", action=argparse.BooleanOptionalAction, default=None)
    graph.add_argument("--rebuild", action="store_true", help="replace an existing artifact")
    # defaults as sddecc_dist.graph.IndexParams (and the graph: section of a config)
    graph.add_argument("--index", default="auto", choices=["auto", "flat", "ivf", "ivfpq"],
                       help="auto: exact up to --exact-max-n samples, IVF-Flat up to --ivf-max-n, then IVF-PQ")
    graph.add_argument("--exact-max-n", type=int, default=100_000)
    graph.add_argument("--ivf-max-n", type=int, default=10_000_000)
    graph.add_argument("--nlist", type=int, default=0, help="IVF lists; 0: 4 sqrt(n) per index")
    graph.add_argument("--nprobe", type=int, default=16, help="IVF lists searched per query")
    graph.add_argument("--pq-m", type=int, default=0, help="IVF-PQ bytes per vector; 0: automatic")
    graph.add_argument("--train-sample", type=int, default=0, help="IVF training vectors; 0: automatic")
    graph.add_argument("--recall-queries", type=int, default=1000,
                       help="queries on which recall@k against exact search is measured (0: skip)")
    graph.add_argument("--backend", choices=["gloo", "nccl"],
                       help="torch.distributed backend when WORLD_SIZE > 1 (default: nccl if CUDA, else gloo)")
    graph.set_defaults(func=_graph)

    partition = commands.add_parser("partition", help="partition the kNN graph and write partition-ordered shards")
    partition.add_argument("data_dir")
    partition.add_argument("--k", type=int, default=3)
    partition.add_argument("--parts", type=int, required=True,
                           help="number of partitions (training uses ceil(N / train.partition_size))")
    partition.add_argument("--method", default="metis", choices=["metis", "random"])
    partition.add_argument("--partitions-per-shard", type=int, default=8)
    partition.add_argument("--seed", type=int, default=0, help="the run's seed (training uses its own)")
    partition.add_argument("--rebuild", action="store_true", help="replace existing artifacts")
    partition.set_defaults(func=_partition)

    train = commands.add_parser("train", help="pretrain and jointly train SDDECC")
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser("evaluate", help="score a run's assignments against labels")
    evaluate.add_argument("run_dir")
    evaluate.add_argument("--data-dir", required=True)
    evaluate.set_defaults(func=_evaluate)

    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as error:  # ConfigError, DataError, GraphError: user-facing messages
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
