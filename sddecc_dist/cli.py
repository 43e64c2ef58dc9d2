"""`sddecc` command line: prepare, graph, partition, train, predict, evaluate, show, and the reproduction
mode: reproduce, report, baseline, plot."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from rich.text import Text

from sddecc_dist.config import (
    Config,
    ConfigError,
    DataConfig,
    GraphConfig,
    TrainConfig,
    add_arguments,
    from_arguments,
    load_config,
    resolve_input_view,
)
from sddecc_dist.paper.published import TARGETS
from sddecc_dist.utils import console

# Each command imports its own implementation when it runs: `sddecc --help`, a mistyped key
# or `sddecc prepare` need not load the trainer, scikit-learn, UMAP and matplotlib (3.9 s
# before, most of a short command's time).


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, action="append",
                        help="YAML config (see configs/); repeat it to stack files, later ones override "
                             "(e.g. --config configs/paper/usps.yaml --config configs/ablations/convae.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the run folder's latest checkpoint")
    parser.add_argument("--new-version", action="store_true",
                        help="the run folder holds an earlier run: move it into RUN/previous/TIME/ and start anew")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. seed=1 output_dir=runs/x train.joint_epochs=50")


def run_train(args: argparse.Namespace) -> dict:
    overrides = (list(args.overrides) + (["train.resume=true"] if args.resume else [])
                 + (["train.new_version=true"] if args.new_version else []))
    config = load_config(args.config, overrides)  # a bad key is reported before the trainer loads
    from sddecc_dist.train.loop import train

    return train(config)


def _add_view_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--view", choices=["raw", "sobel", "auto"], default="raw",
                        help="what the graph compares: the pixels (raw, the paper's), their Sobel gradient "
                             "magnitude (sobel), or auto: sobel for 3-channel images. Training builds its graph "
                             "over its model.input_view (configs/default.yaml: auto)")


def _prepare(args) -> None:
    from sddecc_dist.pipeline import prepare_dataset

    prepare_dataset(args.source, args.out, from_dir=args.from_dir, split=args.split,
                    size=args.size, samples_per_shard=args.samples_per_shard)


def _view(args) -> str:
    """--view, with auto decided as training decides model.input_view: by the images' channels."""
    from sddecc_dist.data import read_manifest

    return resolve_input_view(args.view, read_manifest(args.data_dir)["image_shape"][0])


def _graph(args) -> None:
    """Single process, or, under torchrun / accelerate launch with WORLD_SIZE > 1, one rank of
    a sharded build (each rank reads its share of the shards; rank 0 writes the artifact)."""
    import torch
    import torch.distributed as dist

    from sddecc_dist.pipeline import ensure_graph

    params = from_arguments(GraphConfig, args)
    view = _view(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        ensure_graph(args.data_dir, params.k, use_gpu=params.use_gpu, rebuild=args.rebuild, params=params,
                     view=view)
        return
    backend = args.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    started_here = not dist.is_initialized()
    if started_here:
        dist.init_process_group(backend)  # RANK, WORLD_SIZE, MASTER_ADDR/PORT from the launcher
    try:
        if dist.get_world_size() != world_size:
            raise ConfigError(f"WORLD_SIZE={world_size} but the process group has {dist.get_world_size()} ranks")
        ensure_graph(args.data_dir, params.k, use_gpu=params.use_gpu, rebuild=args.rebuild, params=params,
                     sharded=True, view=view)
    finally:
        if started_here:
            dist.destroy_process_group()


def _partition(args) -> None:
    """METIS partitions of the kNN graph and the shards rewritten in partition order (the
    artifacts the Cluster-GCN sampler streams); the training run builds them itself if missing."""
    from sddecc_dist.pipeline import ensure_partitioned_shards, ensure_partitions, partitioned_dir

    view = _view(args)
    if args.rebuild:  # both artifacts go: the shards are tied to the partition they were made from
        ensure_partitions(args.data_dir, args.k, args.parts, args.partition_method, args.seed, rebuild=True,
                          view=view)
        shutil.rmtree(partitioned_dir(args.data_dir, args.k, args.parts, view), ignore_errors=True)
    out = ensure_partitioned_shards(args.data_dir, args.k, args.parts, args.partition_method,
                                    args.partitions_per_shard, seed=args.seed, view=view)
    print(out)


def _predict(args) -> None:
    from sddecc_dist.train.predict import predict

    result = predict(args.run_dir, args.source, args.out, with_codes=args.codes, size=args.size, as_new=args.as_new)
    console.log(f"{result['images']} images into {result['clusters_used']} clusters in {result['seconds']:.1f} s "
                f"({result['images_per_second']:.0f} images/s) -> {result['out']}")


def _evaluate(args) -> None:
    """Score a run's assignments, or a `predict` table (its `cluster` column, row i for sample
    i), against the labels in a prepared data folder."""
    from sddecc_dist.data import load_all
    from sddecc_dist.eval.metrics import clustering_scores
    from sddecc_dist.run_folder import RunFolder
    from sddecc_dist.train.predict import read_predicted_clusters

    source = Path(args.run_dir)
    if source.is_file():
        assignments, where = read_predicted_clusters(source), source
    else:
        run = RunFolder(source)
        assignments, where = run.read_assignments(), run.assignments_path
    _, labels = load_all(args.data_dir)
    if labels is None:
        raise ConfigError(f"{args.data_dir} has no labels to score against")
    if len(labels) != len(assignments):
        raise ConfigError(f"{where} has {len(assignments)} assignments but {args.data_dir} has "
                          f"{len(labels)} samples")
    scores = clustering_scores(labels.numpy(), assignments)
    print(" ".join(f"{k} {v:.4f}" for k, v in scores.items()))  # the result: stdout


def _show(args) -> None:
    from sddecc_dist.eval.page import write_page

    page = write_page(args.run_dir, data_dir=args.data_dir, per_cluster=args.per_cluster,
                      map_samples=args.map_samples, seed=args.seed)
    console.log(f"wrote {page}")
    if args.open:
        print(page.resolve().as_uri())  # the result: stdout, for a browser or a script


def _reproduce(args) -> None:
    from sddecc_dist.paper.reproduce import reproduce

    reproduce(args.target, args.dataset, list(range(args.first_seed, args.first_seed + args.seeds)),
              runs_dir=args.runs_dir, configs_dir=args.configs_dir, overrides=args.overrides,
              launcher=args.launcher, dry_run=args.dry_run, base_config=args.config, only=args.only)


def _report(args) -> None:
    from sddecc_dist.paper.report import report

    text = report(args.runs, out=args.out, allow_unfinished=args.allow_unfinished)
    if args.out is None:
        print(text)
    else:
        console.log(f"report written to {args.out}")


def _baseline(args) -> None:
    from sddecc_dist.eval.baselines import kmeans_on_pixels

    kmeans_on_pixels(args.data_dir, args.out, seed=args.seed, n_init=args.n_init, n_clusters=args.n_clusters)


def _plot(args) -> None:
    from sddecc_dist.eval.plots import embedding_tsne, lambda_heatmaps

    if args.kind == "tsne":
        for run_dir in args.runs:
            path = embedding_tsne(run_dir, Path(args.out) / f"tsne_{Path(run_dir).name}.png",
                                  n_samples=args.samples, seed=args.seed)
            console.log(f"wrote {path}")
    else:
        for path in lambda_heatmaps(args.runs, args.out):
            console.log(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sddecc", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    # Flags below come from the config definitions (sddecc_dist.config): one default, one help.
    prepare = commands.add_parser("prepare", help="write a dataset as webdataset shards + dataset.json")
    prepare.add_argument("source", help="digits | usps | mnist | fashion-mnist | file.npz | image folder")
    prepare.add_argument("--out", required=True, help="output folder for shards and manifest")
    add_arguments(prepare, DataConfig, ["from_dir", "split", "size", "samples_per_shard"], {"from_dir": "--from"})
    prepare.set_defaults(func=_prepare)

    graph = commands.add_parser("graph", help="build the kNN graph artifact of a prepared folder")
    graph.add_argument("data_dir")
    add_arguments(graph, GraphConfig)
    _add_view_argument(graph)
    graph.add_argument("--rebuild", action="store_true", help="replace an existing artifact")
    graph.add_argument("--backend", choices=["gloo", "nccl"],
                       help="torch.distributed backend when WORLD_SIZE > 1 (default: nccl if CUDA, else gloo)")
    graph.set_defaults(func=_graph)

    partition = commands.add_parser("partition", help="partition the kNN graph and write partition-ordered shards")
    partition.add_argument("data_dir")
    add_arguments(partition, GraphConfig, ["k"])
    partition.add_argument("--parts", type=int, required=True,
                           help="number of partitions (training uses ceil(N / train.partition_size))")
    add_arguments(partition, TrainConfig, ["partition_method", "partitions_per_shard"],
                  {"partition_method": "--method"})
    add_arguments(partition, Config, ["seed"])
    _add_view_argument(partition)
    partition.add_argument("--rebuild", action="store_true", help="replace existing artifacts")
    partition.set_defaults(func=_partition)

    train = commands.add_parser("train", help="pretrain and jointly train SDDECC")
    add_train_arguments(train)
    train.set_defaults(func=run_train)

    predict = commands.add_parser("predict", help="assign new images to a finished run's clusters (CSV or Parquet)")
    predict.add_argument("run_dir", help="a finished run folder (checkpoints/final.pt, predict/)")
    predict.add_argument("source", help="what `prepare` takes: a prepared folder, an image folder, a .npz or a named set")
    predict.add_argument("--out", required=True, help="FILE.csv, or FILE.parquet (needs pyarrow)")
    predict.add_argument("--codes", action="store_true", help="add each image's code (code_0, code_1, ...)")
    predict.add_argument("--size", type=int, help="resize an image folder's images to SIZE x SIZE, as prepare does")
    predict.add_argument("--as-new", action="store_true",
                         help="an image that is a training image joins the graph as a new node too (by default it "
                              "gets its own node's result): measures the approximation (docs/predict.md)")
    predict.set_defaults(func=_predict)

    evaluate = commands.add_parser("evaluate", help="score a run's assignments (or a predict table) against labels")
    evaluate.add_argument("run_dir", help="a run folder, or a CSV / Parquet file that `sddecc predict` wrote")
    evaluate.add_argument("--data-dir", required=True)
    evaluate.set_defaults(func=_evaluate)

    show = commands.add_parser("show", help="a static HTML page of a finished run: RUN_DIR/report/index.html")
    show.add_argument("run_dir", help="a finished run folder")
    show.add_argument("--data-dir", help="the run's data folder, when it has moved (default: the run config's)")
    show.add_argument("--per-cluster", type=int, default=16,
                      help="images of each cluster's most, and of its least, confident members")
    show.add_argument("--map-samples", type=int, default=10_000, help="samples in the 2-D map of the codes")
    show.add_argument("--seed", type=int, default=0, help="draws the map's samples")
    show.add_argument("--open", action="store_true", help="print the page's file:// URL")
    show.set_defaults(func=_show)

    reproduce = commands.add_parser(
        "reproduce", help="run (or resume) the runs of one of the paper's tables or figures and write it")
    reproduce.add_argument("target", choices=TARGETS)
    reproduce.add_argument("--dataset", required=True,
                           help="usps, mnist or fashion-mnist (their configs/paper/ file), or any name with --config")
    reproduce.add_argument("--config", help="base config instead of the dataset's configs/paper/ file")
    reproduce.add_argument("--seeds", type=int, default=10, help="seeds per row (the paper: 10); fig6 uses the first")
    reproduce.add_argument("--first-seed", type=int, default=0)
    reproduce.add_argument("--runs-dir", default="runs/reproduce", help="run folders go to RUNS_DIR/DATASET/")
    reproduce.add_argument("--configs-dir", default="configs", help="holds paper/ and ablations/")
    reproduce.add_argument("--launcher", default="",
                           help="command that starts each training run, e.g. 'accelerate launch --num_processes 2' "
                                "(default: this python)")
    reproduce.add_argument("--dry-run", action="store_true", help="print the runs' commands, run nothing")
    reproduce.add_argument("--only", nargs="+", metavar="VARIANT",
                           help="run and report only these variants (e.g. kmeans_pixels ae_kmeans)")
    reproduce.add_argument("overrides", nargs="*", metavar="key=value",
                           help="config overrides for every run, e.g. data.from_dir=../shared/datasets/usps")
    reproduce.set_defaults(func=_reproduce)

    report = commands.add_parser("report", help="Markdown table of run folders beside the paper's numbers")
    report.add_argument("runs", nargs="+", help="run folders, or folders of run folders")
    report.add_argument("--out", help="write the Markdown here (default: print it)")
    report.add_argument("--allow-unfinished", action="store_true",
                        help="list runs without metrics.json under the table instead of failing")
    report.set_defaults(func=_report)

    baseline = commands.add_parser("baseline", help="the K-means-on-raw-pixels baseline as a run folder")
    baseline.add_argument("data_dir")
    baseline.add_argument("--out", required=True, help="run folder to write")
    baseline.add_argument("--seed", type=int, default=0)
    baseline.add_argument("--n-init", type=int, default=10)
    baseline.add_argument("--n-clusters", type=int, help="default: the dataset's number of classes")
    baseline.set_defaults(func=_baseline)

    plot = commands.add_parser("plot", help="t-SNE of runs' embeddings (Fig. 6) or lambda heatmaps (Fig. 7)")
    plot.add_argument("kind", choices=["tsne", "lambda"])
    plot.add_argument("runs", nargs="+", help="run folders")
    plot.add_argument("--out", required=True, help="folder for the PNG files")
    plot.add_argument("--samples", type=int, default=2000, help="t-SNE: samples drawn from the dataset")
    plot.add_argument("--seed", type=int, default=0)
    plot.set_defaults(func=_plot)

    args, extra = parser.parse_known_args(argv)
    # `reproduce TARGET --dataset D ... key=value`: overrides after the options land here
    # (argparse gives a positional list only one place to match).
    if extra and args.command == "reproduce" and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "only", None):
        # `--only VARIANT... key=value`: nargs="+" also takes the overrides after it; a variant
        # name never holds "=", so those tokens are overrides.
        args.overrides = [*args.overrides, *(o for o in args.only if "=" in o)]
        args.only = [o for o in args.only if "=" not in o] or None
        if args.only is None:
            parser.error("--only needs at least one variant name before the key=value overrides")
    return run_reporting_errors(args.func, args)


def run_reporting_errors(func, *args) -> int:
    """Call `func(*args)`; a bad input (the project's errors: ConfigError, DataError, GraphError,
    RunFolderError, all ValueErrors) or an unwritable file (OSError: read-only, no permission,
    disk full) ends in one line that names it and exit status 2 or 1, without a traceback.
    SDDECC_DEBUG=1 in the environment re-raises them, traceback and all."""
    try:
        func(*args)
    except (ValueError, OSError) as error:
        if os.environ.get("SDDECC_DEBUG"):
            raise
        if isinstance(error, OSError):
            where = f"{error.filename}: " if error.filename else ""
            _print_error(f"{where}{error.strerror or error} (SDDECC_DEBUG=1 shows the traceback)")
            return 1
        _print_error(str(error))
        return 2
    return 0


def _print_error(message: str) -> None:
    """One line, whatever its length (a path cut in two cannot be pasted), and the message
    as it is: no rich markup read in it (a key like `a[0]`, a path with brackets)."""
    console.print(Text.assemble(("error:", "red"), " ", message), soft_wrap=True)


if __name__ == "__main__":
    sys.exit(main())
