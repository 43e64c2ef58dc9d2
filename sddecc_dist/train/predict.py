"""Clusters for images a run never saw: `sddecc predict RUN_DIR SOURCE --out FILE`.

A new image has no place in the training graph. It joins it as a node whose k edges go to its
k nearest training images, found with the run's FAISS index over the same features the graph
compared (RUN/predict/knn.index); the training nodes keep their rows. GCN layer l then gives it

    h_x = p_x / d_x + sum_j p_j / sqrt(d_x d_j),   d_x = k + 1,

p_x being its own row-wise layer input ([(1-δ)H + δZ] W, from its own encoding), p_j the input
rows of its neighbours in the final inference (RUN/predict/layer-inputs-L.npy) and d_j their degrees
in the training graph (the graph the final model was trained on, cut or not). A query equal to a
training image (distance 0) is that image: it gets that node's result of the final inference
(with --as-new, a new node whose neighbours are the next k, as in the graph, which leaves a node
itself out). docs/predict.md says what this approximation gives.
"""

from __future__ import annotations

import csv
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from sddecc_dist.config import Config
from sddecc_dist.data import DataError, load_source, read_manifest, sample_key, sample_keys, stream_share, verify_shards
from sddecc_dist.graph import build_search_index, load_search_index, save_search_index
from sddecc_dist.pipeline import graph_features, graph_view
from sddecc_dist.run_folder import RunFolder, RunFolderError, TrainedModel, assignments_csv, load_model
from sddecc_dist.train.distributed import progress_bars
from sddecc_dist.utils import atomic_torch_save, atomic_write_bytes

# 2: the layers' input rows in predict/layer-inputs-L.npy (memory-mapped), the index an IndexIDMap;
# 1: the rows inside graph_rows.pt (still read)
GRAPH_ROWS_FORMAT = 2
_BLOCK = 8192  # images in memory at a time: when the index is built, when predict reads, searches and assigns


def save_predict_state(run: RunFolder, config: Config, manifest: dict, n_layers: int, adjacency: sp.csr_matrix,
                       cut_along: np.ndarray | None, assignments: np.ndarray, confidence: np.ndarray,
                       images: torch.Tensor | None = None) -> None:
    """Write what `predict` needs of the training graph (main process, after the final inference,
    which wrote each of the GCN's `n_layers` layers' input rows to `run.predict_layer_inputs_path(l)`): `cut_along` is
    the partition the joint phase's graph was cut along (train.joint_graph=within_start), else
    None; `assignments` and `confidence` the final inference's. The FAISS index is built from
    `images` when the trainer holds them, else from the shards a block at a time, so that only
    the index itself grows with N (build_search_index)."""
    view, n = graph_view(config, manifest), int(manifest["count"])
    missing = [run.predict_layer_inputs_path(layer) for layer in range(n_layers)
               if not run.predict_layer_inputs_path(layer).is_file()]
    if missing:
        raise RunFolderError(f"run {run.path}: no {missing[0]} (the final inference writes it)")

    def chunks():
        if images is not None:
            for start in range(0, n, _BLOCK):
                yield np.arange(start, min(start + _BLOCK, n)), graph_features(images[start:start + _BLOCK], view)
        else:
            for ids, x, _ in stream_share(config.data_dir, _BLOCK, 0, 1, manifest):
                yield ids.numpy(), graph_features(x, view)

    d = graph_features(torch.zeros(1, *manifest["image_shape"]), view).shape[1]
    index, spec = build_search_index(chunks, n, d, config.graph)
    degrees = 1.0 / adjacency.diagonal()  # Â_jj = 1 / d_j: D^-1/2 (A + I) D^-1/2 with no self-edge in A
    atomic_torch_save({"format_version": GRAPH_ROWS_FORMAT, "n_layers": n_layers,
                       "degrees": torch.from_numpy(np.asarray(degrees, dtype=np.float32)), "k": config.graph.k,
                       "view": view, "index": spec,
                       "cut_along": None if cut_along is None else torch.from_numpy(np.asarray(cut_along)),
                       "assignments": torch.from_numpy(np.asarray(assignments, dtype=np.int64)),
                       "confidence": torch.from_numpy(np.asarray(confidence, dtype=np.float32))},
                      run.predict_state_path)
    save_search_index(run.predict_index_path, index)


def load_predict_state(run: RunFolder) -> tuple[dict, object]:
    """(state, FAISS index) that `save_predict_state` wrote: state["layer_inputs"][l] is layer
    l's (N, width) rows, memory-mapped (format 2) so that a lookup reads only the rows it needs."""
    if not run.predict_state_path.is_file() or not run.predict_index_path.is_file():
        raise RunFolderError(f"run {run.path}: no {run.predict_state_path.parent.name}/ folder (written by the "
                             f"final inference since predict exists); rerun the training to get one")
    state = torch.load(run.predict_state_path, weights_only=True)
    version = state.get("format_version")
    if version == 1:
        state["layer_inputs"] = [rows.numpy() for rows in state["layer_inputs"]]
    elif version == GRAPH_ROWS_FORMAT:
        state["layer_inputs"] = [np.load(run.predict_layer_inputs_path(layer), mmap_mode="r")
                                 for layer in range(state["n_layers"])]
    else:
        raise RunFolderError(f"{run.predict_state_path} has format {version}, expected 1 or {GRAPH_ROWS_FORMAT}")
    return state, load_search_index(run.predict_index_path)


def image_blocks(source: str | Path, image_shape: tuple, size: int | None = None,
                 block: int | None = None) -> tuple[list[str], Iterator[tuple[np.ndarray, torch.Tensor]]]:
    """A key for every image of `source` and its images in blocks of `block`: (positions in
    the key list, images (b, C, H, W) float32 in [0, 1]). A prepared folder (its samples' keys)
    is streamed from its shards, in their stored order (checksums verified first); an image
    folder (each file's path inside it), an .npz or a named set (the index) is read whole, as
    stored, and converted to floats a block at a time. `block` defaults to _BLOCK."""
    block = block or _BLOCK
    path = Path(source)
    if (path / "dataset.json").is_file():
        manifest = read_manifest(path)
        _check_shape(source, tuple(manifest["image_shape"]), image_shape, "")
        verify_shards(path, manifest)
        blocks = ((ids.numpy(), x) for ids, x, _ in stream_share(path, block, 0, 1, manifest))
        return sample_keys(path, manifest), blocks
    raw = load_source(source, size=size)
    _check_shape(source, tuple(raw.images.shape[1:]), image_shape, " (an image folder takes --size)")
    lo, hi = raw.value_range
    n = len(raw.images)
    blocks = ((np.arange(start, min(start + block, n)),
               torch.from_numpy((raw.images[start:start + block].astype(np.float32) - lo) / (hi - lo)))
              for start in range(0, n, block))
    return raw.keys or [sample_key(i) for i in range(n)], blocks


def _check_shape(source, shape: tuple, expected: tuple, hint: str) -> None:
    if shape != tuple(expected):
        raise DataError(f"{source}: images of shape {shape} (C, H, W), but the run was trained on "
                        f"{tuple(expected)}{hint}")


@torch.no_grad()
def predict_images(trained: TrainedModel, images: torch.Tensor, state: dict | None, index,
                   batch_size: int = 1024, with_codes: bool = False, known_as_known: bool = True):
    """(clusters, confidences, codes or None) of images (N, C, H, W) in [0, 1]. An image that is
    a training image gets that node's own result (`known_as_known`; False treats it as new, to
    measure the approximation)."""
    core = trained.model.eval()
    clusters, confidences, codes = [], [], []
    neighbours = known = None
    if core.use_gcn:
        k = state["k"]
        features = np.ascontiguousarray(graph_features(images, state["view"]))
        distances, found = index.search(features, k + 1)
        # A training image itself: distance 0 up to FAISS's rounding (|q|^2 + |x|^2 - 2 q.x in float32)
        itself = distances[:, 0] <= 1e-5 * (1.0 + (features.astype(np.float64) ** 2).sum(1))
        neighbours = torch.from_numpy(np.where(itself[:, None], found[:, 1:], found[:, :k]))
        known = torch.from_numpy(np.where(itself & known_as_known, found[:, 0], -1))
        degrees = state["degrees"]
        if state.get("cut_along") is not None:  # the graph was cut along a partition: so are the new edges
            neighbours = _within_plurality(neighbours, state["cut_along"])
    for start in range(0, len(images), batch_size):
        x = images[start:start + batch_size]
        encoded = core.encode(x)
        if core.use_gcn:
            near = neighbours[start:start + batch_size]
            valid = near >= 0  # an IVF search can find fewer than k; a cut graph keeps fewer
            near = near.clamp(min=0)
            d_x = 1.0 + valid.sum(1, keepdim=True).float()
            weights = valid.float() / torch.sqrt(d_x * degrees[near])
            h, representations = None, core.gcn_representations(encoded)
            for layer in range(core.gcn.n_layers):
                own = core.gcn.layer_input(layer, core.gcn_input(x), h, representations[layer - 1] if layer else None)
                rows = torch.from_numpy(np.asarray(state["layer_inputs"][layer][near.numpy()]))
                h = own / d_x + torch.einsum("bk,bkw->bw", weights, rows)
                if layer < core.gcn.n_layers - 1:
                    h = torch.relu(h)
            y = torch.softmax(h, dim=1)
        else:
            y = core.cluster_probabilities(x, encoded, None)
        confidence, cluster = y.max(1)
        if known is not None:  # the final inference's result for the training images themselves
            same = known[start:start + batch_size]
            rows = same >= 0
            cluster[rows], confidence[rows] = state["assignments"][same[rows]], state["confidence"][same[rows]]
        clusters.append(cluster)
        confidences.append(confidence)
        if with_codes:
            codes.append(encoded.mean)
    return (torch.cat(clusters).numpy(), torch.cat(confidences).numpy(),
            torch.cat(codes).numpy() if with_codes else None)


def _within_plurality(neighbours: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """Keep (else mark -1) the edges to the neighbours in the cluster most of them are in (the
    nearest one's on a tie): the new node's cluster of the partition the training graph was cut
    along, as far as its neighbours tell, and the cut's rule for its edges."""
    clusters = partition[neighbours.clamp(min=0)]
    votes = torch.zeros(len(clusters), int(partition.max()) + 1).scatter_add_(
        1, clusters, (neighbours >= 0).float())
    votes[torch.arange(len(clusters)), clusters[:, 0]] += 0.5  # ties: the nearest neighbour's
    keep = clusters == votes.argmax(1, keepdim=True)
    return torch.where(keep & (neighbours >= 0), neighbours, torch.full_like(neighbours, -1))


def predict(run_dir: str | Path, source: str | Path, out: str | Path, with_codes: bool = False,
            size: int | None = None, as_new: bool = False) -> dict:
    """Assign every image of `source` to one of the run's clusters; write `out` (CSV, or
    Parquet for a .parquet name, with pyarrow). Returns counts and throughput. `as_new`: treat
    an image that is a training image as a new one (to measure the approximation)."""
    run, out = RunFolder(run_dir), Path(out)
    if not run.model_file("final").is_file():
        raise RunFolderError(f"run {run.path}: no final model ({run.model_file('final')}); predict needs a finished run")
    trained = load_model(run.model_file("final"))
    state = index = None
    if trained.model.use_gcn:
        state, index = load_predict_state(run)
    keys, blocks = image_blocks(source, tuple(trained.manifest["image_shape"]), size)
    n, seconds = len(keys), 0.0
    clusters, confidence = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.float32)
    filled = np.zeros(n, dtype=bool)
    codes = np.empty((n, trained.model.latent_dim), dtype=np.float32) if with_codes else None
    with progress_bars() as progress:
        task = progress.add_task("predict", total=n, status="")
        for positions, images in blocks:  # one block of images in memory at a time
            start = time.perf_counter()
            block_clusters, block_confidence, block_codes = predict_images(
                trained, images, state, index, with_codes=with_codes, known_as_known=not as_new)
            seconds += time.perf_counter() - start
            clusters[positions], confidence[positions], filled[positions] = block_clusters, block_confidence, True
            if with_codes:
                codes[positions] = block_codes
            progress.advance(task, len(positions))
    if not filled.all():
        raise DataError(f"{source}: image {int(np.argmin(filled))} of {n} never arrived from its shards")
    _write_table(out, keys, clusters, confidence, codes)
    return {"images": n, "seconds": seconds, "images_per_second": n / max(seconds, 1e-9),
            "clusters_used": int(len(np.unique(clusters))), "out": str(out)}


def _write_table(out: Path, keys: list[str], clusters: np.ndarray, confidence: np.ndarray,
                 codes: np.ndarray | None) -> None:
    if out.suffix.lower() != ".parquet":
        atomic_write_bytes(out, lambda f: f.write(assignments_csv(keys, clusters, confidence, codes).encode()))
        return
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DataError(f"{out}: Parquet needs pyarrow (pip install -e '.[parquet]'); or write a .csv") from error
    columns = {"key": keys, "cluster": clusters.astype(np.int64), "confidence": confidence.astype(np.float32)}
    if codes is not None:
        columns.update({f"code_{i}": codes[:, i] for i in range(codes.shape[1])})
    table = pa.table(columns)
    atomic_write_bytes(out, lambda f: pq.write_table(table, f))


def read_predicted_clusters(path: str | Path) -> np.ndarray:
    """The `cluster` column of a table `predict` wrote (CSV, or Parquet with pyarrow)."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".parquet":
            import pyarrow.parquet as pq
            return np.asarray(pq.read_table(path, columns=["cluster"]).column("cluster").to_numpy(), dtype=np.int64)
        with open(path, newline="") as f:
            return np.array([int(row["cluster"]) for row in csv.DictReader(f)], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as error:
        raise DataError(f"{path} is not a table of `sddecc predict` (no integer 'cluster' column): {error}") from error
