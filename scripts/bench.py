"""Every stage of a run beside its bare floor, measured in one process on the same data
(issue 20): how far each stage is from the fastest this hardware does the same work.

    python scripts/bench.py --data data/mnist --out bench/mnist               # all 70 000 images
    python scripts/bench.py --data data/mnist --out bench/mnist-10k --n 10000 # a random 10 000
    python scripts/bench.py --data data/usps --out bench/usps-x4 --n 37192    # tiled 4 times
    python scripts/bench.py --data data/mnist --out bench/gpu --device cuda train.mixed_precision=bf16

On a GPU (`--device auto` takes one when torch sees it) the graph stages use faiss-gpu when it
is installed, the training run and both sides of the step and inference rows run on the GPU,
and key=value overrides after the options go to the short training run and the bare steps'
config (autocast: train.mixed_precision).

`--n` below the set's size takes a random subset, above it tiles the images (each copy with
its own noise of one grey level, so that no two samples are equal); the subset or tiling is
written as a prepared set in OUT/data first. Stages (seconds, floor seconds, ratio):
  shard_read       the project's webdataset pipeline reading and decoding every image
                   (`load_all`, checksums included, as the trainer calls it), against reading
                   the same tar members into one numpy array with `tarfile`
  knn_exact        the graph stage's exact search (`knn_graph`, IndexFlatL2 in query blocks,
                   self removed), against a bare faiss IndexFlatL2 search of the same float32
                   matrix with the same threads
  knn_ivf          the fast paths (`knn_graph` with graph.index=ivf, pca, pca_ivf; the PCA
  knn_pca          ones keep min(64, d/2) dimensions), each against knn_exact; their recall@k
  knn_pca_ivf      over every sample (a neighbour is a hit when no farther than the exact
                   k-th one) is printed
  adjacency        A = max(A, A^T) and D^-1/2 (A + I) D^-1/2 as the trainer gets them (torch
                   CSR), against the same CSR built with scipy alone
  partition        METIS partitions for the cluster sampler (`partition_graph`), against
                   pymetis on a CSR already built
  pretrain_step    one pretraining step of the configured model as the trainer ran it (from
                   its metrics.jsonl: epochs 2 on, augmentation, logging and checkpoints
                   included), against forward + backward + optimiser step of the same model on
                   one batch already in memory
  joint_step       one joint epoch of the full-graph sampler as the trainer ran it (its last
                   metrics.jsonl line, the scoring it does every eval_every epochs included),
                   against the bare step on the whole graph in memory
  inference        the final inference of every image (`final_assignments`, layer by layer in
                   chunks, the images in memory as the full-graph sampler has them), against
                   the bare forward of every image in memory; both also as images per second
  predict          `sddecc predict`'s work on up to 10 000 of the images taken as new ones
                   (neighbours from the run's saved index, the GCN fed from their stored
                   rows), against a bare flat search of the same queries plus the encoder's
                   forward of them; both as images per second too
  end_to_end       with --end-to-end only: the configured recipe's whole run on the set, as a
                   user runs it (`launch/train.py`, OUT/full: pretraining, start, joint phase,
                   final inference; plus the graph's recorded build time, as it reuses the
                   graph the short run built), its ACC/NMI; on USPS against SDCN's
                   reference code measured on this kind of machine (587 s, ACC 0.7591:
                   ../shared/notes/platform.md), elsewhere without a floor
The two training stages come from one short real run (`launch/train.py` with the config,
OUT/run): 3 pretraining epochs, a k-means start, 5 warm-up and 10 joint epochs (the trainer's
joint step is the mean of the last 5). It writes
OUT/bench.json ({"environment", "n", "data", "stages": [{stage, seconds, floor_seconds,
ratio, floor}]}) and prints the same table. Run it on an idle machine: both sides of a row
run in this process, one after the other, under the same threads and BLAS environment
(OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE, reported, change BLAS speed; this script leaves them as
they are).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import faiss
import numpy as np
import scipy.sparse as sp
import torch
from rich.table import Table
from threadpoolctl import threadpool_info

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sddecc_dist.config import Config, IndexParams, load_config  # noqa: E402
from sddecc_dist.data import RawDataset, load_all, read_manifest, write_shards  # noqa: E402
from sddecc_dist.graph import knn_graph, load_graph, normalized_adjacency, symmetric_adjacency, to_scipy_csr  # noqa: E402
from sddecc_dist.graph.knn import measure_recall, resolve_use_gpu  # noqa: E402
from sddecc_dist.graph.partition import partition_graph  # noqa: E402
from sddecc_dist.model.sddecc import SDDECC  # noqa: E402
from sddecc_dist.pipeline import graph_features, graph_path, graph_view  # noqa: E402
from sddecc_dist.run_folder import RunFolder  # noqa: E402
from sddecc_dist.train.distributed import make_accelerator  # noqa: E402
from sddecc_dist.train.inference import final_assignments, node_share, rows_of  # noqa: E402
from sddecc_dist.train.loop import micro_batch_size  # noqa: E402
from sddecc_dist.train.predict import load_predict_state, predict_images  # noqa: E402
from sddecc_dist.train.samplers import finished_run_adjacency  # noqa: E402
from sddecc_dist.utils import console  # noqa: E402


def timed(function, *args, **kwargs):
    started = time.perf_counter()
    result = function(*args, **kwargs)
    return time.perf_counter() - started, result


def row(stage: str, seconds: float, floor_seconds: float, floor: str, **extra) -> dict:
    return {"stage": stage, "seconds": round(seconds, 6), "floor_seconds": round(floor_seconds, 6),
            "ratio": round(seconds / floor_seconds, 3) if floor_seconds > 0 else None, "floor": floor, **extra}


def environment() -> dict:
    blas = [{k: info.get(k) for k in ("internal_api", "version", "num_threads", "architecture")}
            for info in threadpool_info() if info.get("user_api") == "blas"]
    return {"torch": torch.__version__, "faiss": faiss.__version__, "torch_threads": torch.get_num_threads(),
            "faiss_threads": faiss.omp_get_max_threads(), "cpus": os.cpu_count(), "blas": blas,
            **{name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}}


# ---- the data: the set as it is, a random subset, or tiled copies ------------------------------

def bench_data(data: Path, n: int | None, out: Path) -> Path:
    if n is None:
        return data
    target = out / "data"
    if (target / "dataset.json").is_file() and read_manifest(target)["count"] == n:
        return target
    manifest = read_manifest(data)
    images, labels = load_all(data, manifest)
    count = len(images)
    rng = np.random.default_rng(0)
    if n <= count:
        keep = np.sort(rng.choice(count, n, replace=False))
        x, y = images[keep].numpy(), None if labels is None else labels[keep].numpy()
    else:  # tiled: each further copy moved by its own noise of one grey level
        copies = -(-n // count)
        x = np.concatenate([images.numpy()] + [np.clip(images.numpy() + rng.uniform(-1, 1, images.shape) / 255, 0, 1)
                                               for _ in range(copies - 1)])[:n].astype(np.float32)
        y = None if labels is None else np.tile(labels.numpy(), copies)[:n]
    raw = RawDataset(f"{manifest['name']}-{n}", x, y, (0.0, 1.0), manifest.get("n_classes"), manifest.get("class_names"))
    write_shards(raw, target)
    return target


# ---- stages ------------------------------------------------------------------------------------

def read_with_tarfile(data_dir: Path, manifest: dict) -> np.ndarray:
    """The floor of shard reading: every x.npy member of every shard into one array."""
    lo, hi = manifest["value_range"]
    out = np.empty((manifest["count"], *manifest["image_shape"]), dtype=np.float32)
    for shard in manifest["shards"]:
        with tarfile.open(data_dir / shard["file"]) as tar:
            for member in tar:
                if member.name.endswith(".x.npy"):
                    array = np.load(io.BytesIO(tar.extractfile(member).read()), allow_pickle=False)
                    out[int(member.name.split(".")[0])] = (array.astype(np.float32) - lo) / (hi - lo)
    return out


def stage_shard_read(data_dir: Path, manifest: dict) -> tuple[dict, torch.Tensor]:
    seconds, (images, _) = timed(load_all, data_dir, manifest)
    floor, array = timed(read_with_tarfile, data_dir, manifest)
    assert np.array_equal(array, images.numpy()), "the tarfile floor read other pixels than the pipeline"
    return row("shard_read", seconds, floor, "the same tar members into one numpy array with tarfile"), images


def bare_flat_search(x: np.ndarray, k: int, on_gpu: bool) -> np.ndarray:
    index = faiss.IndexFlatL2(x.shape[1])
    if on_gpu:  # FAISS's own recipe: the same index on every GPU
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index.search(x, k + 1)[1]


def stage_knn(features: np.ndarray, k: int, on_gpu: bool) -> tuple[list[dict], np.ndarray]:
    exact_seconds, (exact_distances, exact, _) = timed(knn_graph, features, k, IndexParams(index="flat"),
                                                       use_gpu=on_gpu)
    floor, _ = timed(bare_flat_search, features, k, on_gpu)
    where = "on the GPU" if on_gpu else f"{faiss.omp_get_max_threads()} threads"
    rows = [row("knn_exact", exact_seconds, floor, f"bare faiss IndexFlatL2 search, k={k}, {where}")]
    for kind in FAST_INDEXES:
        seconds, (approx_distances, _, info) = timed(knn_graph, features, k, fast_index_params(kind, features.shape[1]),
                                                     use_gpu=on_gpu)
        # recall@k over every sample: a neighbour found is a hit when no farther than the exact k-th
        recall = measure_recall(approx_distances, exact_distances)
        settings = ", ".join(f"{key} {info[key]}" for key in ("pca_dim", "nlist", "nprobe", "refine_factor") if key in info)
        rows.append(row(f"knn_{kind}", seconds, exact_seconds, f"the exact graph stage (knn_exact); recall@{k} "
                        f"{recall:.4f}, {settings}", recall=round(recall, 5)))
    return rows, exact


FAST_INDEXES = ("ivf", "pca", "pca_ivf")


def fast_index_params(kind: str, d: int) -> IndexParams:
    """The fast path `kind` with the library's defaults, the PCA ones on min(64, d/2) dimensions."""
    return IndexParams(index=kind, recall_queries=0, pca_dim=min(IndexParams.pca_dim, d // 2))


def scipy_adjacency(neighbors: np.ndarray, n: int) -> sp.csr_matrix:
    rows = np.repeat(np.arange(n), neighbors.shape[1])
    a = sp.csr_matrix((np.ones(rows.size, dtype=np.float32), (rows, neighbors.ravel())), shape=(n, n))
    a.data[:] = 1.0
    a = a.maximum(a.T) + sp.identity(n, dtype=np.float32, format="csr")
    scale = sp.diags(1.0 / np.sqrt(np.asarray(a.sum(axis=1)).ravel()))
    return (scale @ a @ scale).tocsr()


def bare_metis(sym: sp.csr_matrix, n_parts: int, seed: int) -> np.ndarray:
    import pymetis

    dtype = pymetis.zero_copy_dtype()
    graph = pymetis.CSRAdjacency(adj_starts=sym.indptr.astype(dtype), adjacent=sym.indices.astype(dtype))
    return np.asarray(pymetis.part_graph(n_parts, graph, options=pymetis.Options(seed=seed))[1])


def stage_graph(neighbors: np.ndarray, n: int, partition_size: int) -> list[dict]:
    seconds, adjacency = timed(normalized_adjacency, neighbors, n)  # the graph stage's Â
    floor, reference = timed(scipy_adjacency, neighbors, n)
    difference = abs(to_scipy_csr(adjacency) - reference).max()
    assert difference < 1e-6, f"the scipy floor built another matrix (max difference {difference})"
    n_parts = max(2, -(-n // partition_size))
    part_seconds, _ = timed(partition_graph, neighbors, n_parts, "metis", 0)
    sym = symmetric_adjacency(neighbors, n)
    part_floor, _ = timed(bare_metis, sym, n_parts, 0)
    return [row("adjacency", seconds, floor, "the same normalised CSR built with scipy alone"),
            row("partition", part_seconds, part_floor, f"pymetis part_graph into {n_parts} parts on a CSR "
                                                       "already built")]


# SDCN's reference code on USPS, on this kind of 2-core machine (../shared/notes/platform.md:
# graph 4.5 s, pretraining 60 s, training 527 s; final-epoch ACC 0.7591 over 3 seeds)
SDCN_USPS = {"seconds": 587.0, "acc": 0.7591}


def stage_end_to_end(config_path: Path, config: Config, data_dir: Path, run_dir: Path, manifest: dict,
                     device: torch.device, overrides: list[str]) -> dict:
    """The recipe's whole run, timed from outside as a user would. The short run built the kNN
    graph in the data folder and this run reuses it (a user's artifact is not deleted here):
    the graph's own recorded build time is added."""
    seconds, _ = timed(train_run, "the end-to-end run", config_path, data_dir, run_dir, device, overrides)
    graph_seconds = load_graph(graph_path(data_dir, config.graph.k, graph_view(config, manifest)))[1]["seconds"]
    seconds += graph_seconds
    metrics = json.loads((run_dir / "metrics.json").read_text())
    scores = {key: metrics.get(key) for key in ("acc", "nmi", "ari", "peak_rss_mib")}
    scores["graph_seconds"] = round(graph_seconds, 3)
    if manifest["name"] == "usps" and manifest["count"] == 9298:
        return row("end_to_end", seconds, SDCN_USPS["seconds"], f"SDCN's reference code on USPS here, "
                   f"{SDCN_USPS['seconds']:.0f} s at ACC {SDCN_USPS['acc']}; this run's ACC {scores['acc']:.4f}", **scores)
    return {"stage": "end_to_end", "seconds": round(seconds, 3), "floor_seconds": None, "ratio": None,
            "floor": f"none measured for {manifest['name']}; this run's ACC {scores['acc']:.4f}", **scores}


def train_run(what: str, config_path: Path, data_dir: Path, run_dir: Path, device: torch.device,
              settings: list[str]) -> None:
    """`launch/train.py` with the config and `settings`, as a user runs it; exits naming `what`
    with the end of its stderr if it fails."""
    command = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config_path),
               f"data_dir={data_dir}", f"output_dir={run_dir}", *settings]
    # the trainer takes a visible GPU by itself: hide it for a CPU benchmark
    env = {**os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if device.type == "cpu" else {})}
    out = subprocess.run(command, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr[-3000:]}")


def short_run(config_path: Path, data_dir: Path, run_dir: Path, device: torch.device, overrides: list[str]) -> Path:
    """The configured recipe, cut short, as a user runs it: its metrics.jsonl has each
    pretraining epoch's seconds and steps, and each joint line the mean seconds of its epochs."""
    if not RunFolder(run_dir).is_finished:
        train_run("the short training run", config_path, data_dir, run_dir, device,
                  ["train.pretrain_epochs=3", "train.pretrain_steps=0", "train.center_init=kmeans",
                   "train.kmeans_n_init=1", "train.self_label_epochs=0", "train.head_warmup_epochs=5",
                   "train.joint_epochs=15", "train.eval_every=5", "train.joint_sampler=full", *overrides])
    return run_dir


def bare_steps(model: SDDECC, optimizer: torch.optim.Optimizer, phase: str, x: torch.Tensor, steps: int,
               autocast: str | None, **kwargs) -> float:
    """Seconds per step of forward + backward + optimiser step, after one untimed step, under the
    run's autocast (train.mixed_precision) like the trainer's steps."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(autocast or "no")

    def step():
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            out = model(phase, x, **kwargs)
        terms = out[0] if isinstance(out, tuple) else out
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def steps_done():
        for _ in range(steps):
            step()
        synchronize(x.device)

    step()
    synchronize(x.device)
    seconds, _ = timed(steps_done)
    return seconds / steps


def synchronize(device: torch.device) -> None:
    """Wait for the GPU's queued work, so that a time is the work's and not its launch's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_training(run_dir: Path, images: torch.Tensor, adjacency: torch.Tensor, device: torch.device) -> list[dict]:
    run = RunFolder(run_dir)
    log = run.read_metrics_log()
    trained = run.load_model("final")
    config, manifest = trained.config, trained.manifest
    pretrain = [line for line in log if line["phase"] == "pretrain"][1:]  # the first epoch warms up
    trainer_step = sum(line["seconds"] for line in pretrain) / sum(line["steps"] for line in pretrain)
    # the last line's 5 joint epochs: past the first joint steps (the encoder's first gradients,
    # the warm-up's codes still read), one encoding pass of the other nodes among their 5 steps
    joint_line = [line for line in log if line["phase"] == "joint" and
                  line["epoch"] > config.train.head_warmup_epochs and "epoch_seconds" in line][-1]

    n, k = len(images), trained.model.n_clusters
    model = SDDECC(tuple(manifest["image_shape"]), k, config.model).to(device)
    optimizer = torch.optim.Adam(model.parameters(), config.train.pretrain_lr, fused=True)
    images, adjacency, autocast = images.to(device), adjacency.to(device), config.train.mixed_precision
    batch = images[:micro_batch_size(config, 1, n)]
    bare_pretrain = bare_steps(model, optimizer, "pretrain", batch, 5, autocast, loss_config=config.loss, target=batch)
    nodes = min(config.train.joint_encoder_nodes or n, n)
    joint = {"adjacency": adjacency, "loss_config": config.loss,
             "running_marginal": (torch.full((k,), 1.0 / k, device=device), 1.0),
             "start_labels": torch.randint(0, k, (n,), generator=torch.Generator().manual_seed(0)).to(device),
             "aux_index": torch.arange(min(config.train.joint_aux_batch_size, nodes), device=device)}
    refresh_note = ""
    if nodes < n:
        joint["encoder_index"] = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:nodes].to(device)
    if nodes < n and config.train.joint_encoding_refresh > 1:
        # as the trainer does it: the other nodes' codes read from a no-grad pass made every
        # joint_encoding_refresh steps, that pass's share counted in the floor
        refresh = config.train.joint_encoding_refresh
        encoding_seconds, background = timed(model.graph_encoding, images)
        bare_joint = bare_steps(model, optimizer, "joint", images, 3, autocast, background=background,
                                **joint) + encoding_seconds / refresh
        refresh_note = f", {nodes} with gradients, the others' codes from a pass every {refresh} steps"
    else:
        bare_joint = bare_steps(model, optimizer, "joint", images, 3, autocast, **joint)
    return [row("pretrain_step", trainer_step, bare_pretrain, f"forward + backward + fused Adam step on one batch "
                                                                f"of {len(batch)} in memory"),
            row("joint_step", joint_line["epoch_seconds"], bare_joint, f"the bare joint step on all {n} nodes in "
                                                                        f"memory{refresh_note}")]


def stage_inference(run_dir: Path, images: torch.Tensor, device: torch.device) -> dict:
    run = RunFolder(run_dir)
    trained = run.load_model("final")
    model, config, manifest = trained.model, trained.config, trained.manifest
    n = len(images)
    accelerator = make_accelerator(config)
    # the images in memory, as the full-graph sampler's final inference has them (the cluster
    # sampler streams them from the shards: add shard_read's time for that path)
    share = node_share(config.data_dir, manifest, 0, 1, config.train.inference_batch_size, images)
    adjacency_sp = finished_run_adjacency(run, config, manifest)  # the joint phase's graph, as the run had it
    adjacency = rows_of(adjacency_sp, torch.arange(n))  # the same, as one torch CSR for the bare forward
    model.to(accelerator.device)
    seconds, _ = timed(final_assignments, model, share, adjacency_sp, n, accelerator)
    model.eval().to(device)
    images, adjacency = images.to(device), adjacency.to(device)
    with torch.no_grad():
        floor, _ = timed(lambda: model.cluster_probabilities(images, model.graph_encoding(images), adjacency).sum()
                         .item())  # .item(): the GPU's work done
    return row("inference", seconds, floor, f"the bare forward of all {n} images in memory; "
                                            f"{n / seconds:.0f} against {n / floor:.0f} images/s",
               images_per_second=round(n / seconds, 1), floor_images_per_second=round(n / floor, 1))


def stage_predict(run_dir: Path, images: torch.Tensor, features: np.ndarray, count: int = 10000) -> dict:
    """`sddecc predict`'s work on up to `count` of the images, each treated as a new image (its
    neighbours found in the run's saved index, the GCN fed from their stored rows), against its
    two unavoidable parts done bare: a flat search of the same queries among the training
    features, and the encoder's forward of the same images."""
    run = RunFolder(run_dir)
    trained = run.load_model("final")
    state, index = load_predict_state(run)
    m = min(count, len(images))
    queries = images[:m]
    seconds, _ = timed(predict_images, trained, queries, state, index, known_as_known=False)
    flat = faiss.IndexFlatL2(features.shape[1])
    flat.add(features)
    search_seconds, _ = timed(flat.search, features[:m], state["k"] + 1)
    model = trained.model.eval()
    with torch.no_grad():
        forward_seconds, _ = timed(lambda: [model.encode(queries[i:i + 1024]) for i in range(0, m, 1024)])
    floor = search_seconds + forward_seconds
    return row("predict", seconds, floor, f"a bare flat search of the same {m} queries and the encoder's forward "
                                          f"of them; {m / seconds:.0f} against {m / floor:.0f} images/s",
               images_per_second=round(m / seconds, 1), floor_images_per_second=round(m / floor, 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "mnist", help="a prepared set (sddecc prepare)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, help="images: a random subset below the set's size, tiled copies above")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: the GPU when torch sees one (faiss-gpu for the graph when installed)")
    parser.add_argument("--end-to-end", action="store_true",
                        help="also time the configured recipe's whole run on the set (OUT/full)")
    parser.add_argument("overrides", nargs="*", help="key=value for the short training run (e.g. "
                                                     "train.mixed_precision=bf16)")
    args = parser.parse_args()
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if cuda else "cpu")
    on_gpu = cuda and resolve_use_gpu(None)
    if not (args.data / "dataset.json").is_file():
        raise SystemExit(f"{args.data} is not a prepared set (no dataset.json): run `sddecc prepare` first")
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = bench_data(args.data, args.n, args.out)
    manifest = read_manifest(data_dir)
    config = load_config(args.config, [f"data_dir={data_dir}", *args.overrides])
    env = {**environment(), "device": str(device), "faiss_gpu": on_gpu}
    console.log(f"{manifest['name']}: {manifest['count']} images {tuple(manifest['image_shape'])}; {env}")

    stages = []

    def done(*rows: dict) -> None:  # each row as it is measured: the whole takes minutes at 70 000 images
        for stage in rows:
            stages.append(stage)
            floor = "-" if stage["floor_seconds"] is None else f"{stage['floor_seconds']:.4g} s"
            console.log(f"{stage['stage']}: {stage['seconds']:.4g} s, floor {floor}")

    shard_row, images = stage_shard_read(data_dir, manifest)
    done(shard_row)
    features = np.ascontiguousarray(graph_features(images, graph_view(config, manifest)), dtype=np.float32)
    knn_rows, neighbors = stage_knn(features, config.graph.k, on_gpu)
    done(*knn_rows)
    done(*stage_graph(neighbors, len(images), config.train.partition_size))
    adjacency = normalized_adjacency(neighbors, len(images))
    console.log("the short training run (launch/train.py) ...")
    run_dir = short_run(args.config, data_dir, args.out / "run", device, args.overrides)
    done(*stage_training(run_dir, images, adjacency, device))
    done(stage_inference(run_dir, images, device))
    done(stage_predict(run_dir, images, features))
    if args.end_to_end:
        console.log("the whole run (launch/train.py) ...")
        done(stage_end_to_end(args.config, config, data_dir, args.out / "full", manifest, device, args.overrides))

    result = {"environment": env, "n": manifest["count"], "data": str(data_dir), "stages": stages}
    (args.out / "bench.json").write_text(json.dumps(result, indent=1))
    table = Table(title=f"{manifest['name']}, {manifest['count']} images: each stage and its floor")
    for column in ("stage", "seconds", "floor s", "ratio", "floor"):
        table.add_column(column, justify="left" if column in ("stage", "floor") else "right")
    for stage in stages:
        table.add_row(stage["stage"], f"{stage['seconds']:.4g}",
                      "-" if stage["floor_seconds"] is None else f"{stage['floor_seconds']:.4g}",
                      f"{stage['ratio']:.2f}" if stage["ratio"] is not None else "-", stage["floor"])
    console.print(table)
    console.print(f"-> {args.out / 'bench.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
