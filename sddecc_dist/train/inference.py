"""Codes, cluster probabilities and assignments for a whole dataset, each rank computing its
own share of the nodes and the shares gathered on every rank.

The GCN's Y needs every node's neighbours, so it runs one layer at a time over the whole graph
(`predict_layerwise`): only one layer's activations exist at a time, never the autograd graph.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from accelerate import Accelerator

from sddecc_dist.config import Config
from sddecc_dist.data import rank_shards, shard_indices, stream_share
from sddecc_dist.graph.knn import umap_knn
from sddecc_dist.model.gcn import propagate, smooth
from sddecc_dist.model.initial_partition import initial_partition, umap_neighbours
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.train.distributed import gather_rows
from sddecc_dist.utils import atomic_write_bytes

Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # global ids, images, labels (-1: none)
_COPY_ROWS = 65536  # nodes per block when a layer's rows are copied out of the spool


@dataclass
class NodeShare:
    """This rank's share of the nodes: the samples of its shards (r, r + R, ...), their global
    ids in the order `chunks()` yields them, read from memory or streamed from the shards."""

    ids: torch.Tensor
    chunks: Callable[[], Iterator[Chunk]]


def node_share(data_dir: str | Path, manifest: dict, rank: int, world_size: int, chunk_size: int,
               images: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> NodeShare:
    """Chunks of `chunk_size` nodes: sliced from `images` (every sample, by global index) when
    they are in memory, else streamed from the shards of `data_dir`."""
    shards = [manifest["shards"][i] for i in rank_shards(manifest, rank, world_size)]
    ids = torch.from_numpy(shard_indices(shards))
    if images is None:
        return NodeShare(ids, lambda: stream_share(data_dir, chunk_size, rank, world_size, manifest))
    lab = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)
    return NodeShare(ids, lambda: ((ids[i:i + chunk_size], images[ids[i:i + chunk_size]], lab[ids[i:i + chunk_size]])
                                   for i in range(0, len(ids), chunk_size)))


def rows_of(adjacency: sp.csr_matrix, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the normalised adjacency, all columns, as a torch CSR tensor."""
    rows = sp.csr_matrix(adjacency[ids.numpy()], dtype=np.float32)
    return torch.sparse_csr_tensor(torch.from_numpy(rows.indptr).long(), torch.from_numpy(rows.indices).long(),
                                   torch.from_numpy(rows.data), size=rows.shape, check_invariants=False)


@torch.no_grad()
def predict_layerwise(core: SDDECC, share: NodeShare, adjacency: sp.csr_matrix | None, n: int,
                      accelerator: Accelerator, layer_inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Y for this rank's share of the full graph, one GCN layer at a time.

    Per layer, each rank computes the row-wise part [(1-δ)H + δZ] W for its own nodes in
    chunks, the rows are gathered into one (N, width) matrix, and each rank multiplies its rows
    of Â with it. Z: with model.gcn_features=pooled (a few hundred numbers a node) every layer's
    Z is kept from one encoder pass over the share, made with the first layer's; with flattened
    maps (tens of KB a node) the encoder runs again on each chunk for each layer, so that only
    one layer's Z is ever held. Returns Y for the share's rows, in `share.ids` order.
    `layer_inputs`, when given, receives each layer's gathered (N, width) rows on the CPU: what
    a new node's neighbours pass to it (predict.py)."""
    was_training = core.training
    core.eval()
    device = accelerator.device
    if not core.use_gcn:  # ablations without the GCN: Y is row-wise, no graph
        y = torch.cat([core.cluster_probabilities(x, core.encode(x.to(device)), None) for _, x, _ in share.chunks()])
        core.train(was_training)
        return y
    gcn = core.gcn
    own_rows = rows_of(adjacency, share.ids).to(device)
    kept = [] if core.pooled_gcn_features else None  # each chunk's Z^(1..L+1), from the first layer's pass
    h = None
    for layer in range(gcn.n_layers):
        previous = None if h is None else (lambda offset, count, h=h: h[offset:offset + count])
        parts = [part for _, part in _layer_input_chunks(core, share, layer, previous, device, kept)]
        rows = gather_rows(accelerator, share.ids, torch.cat(parts), n)
        if layer_inputs is not None:
            layer_inputs.append(rows.cpu())
        h = propagate(own_rows, rows)
        if layer < gcn.n_layers - 1:
            h = torch.relu(h)
    core.train(was_training)
    return torch.softmax(h, dim=1)


@torch.no_grad()
def predict_layerwise_spooled(core: SDDECC, share: NodeShare, adjacency: sp.csr_matrix | None, n: int,
                              accelerator: Accelerator, spool: Path, chunk_size: int = 4096,
                              layer_input_files: Callable[[int], Path] | None = None) -> torch.Tensor:
    """Y for this rank's share, as `predict_layerwise` computes it, with no (N, width) matrix in
    memory: each layer's rows go to disk and come back chunk by chunk.

    Per layer: (1) each rank writes the row-wise part [(1-δ)H + δZ] W of its own nodes, chunk by
    chunk, to SPOOL/rows-L-rank-R.npy (H read back from its own previous-layer file); (2) after a
    barrier, each chunk of its nodes reads the rows of exactly the nodes its rows of Â touch (its
    neighbours, whichever rank holds them: the boundary is read, not approximated) from those
    files, multiplies, and writes its H to SPOOL/h-L-rank-R.npy. Memory per rank is a chunk's
    images, rows and neighbour rows, the rank's rows of Â and a few numbers per node (which rank
    holds it, where); the files are memory-mapped only while a chunk reads them. SPOOL must be a
    folder every rank sees (the run folder). The same sums in the same order as the in-memory
    path, so the same Y. `layer_input_files` (main process): layer l's rows of every node, as
    `predict_layerwise` gives them, are copied from the spool into the file it names for l, a
    block of nodes at a time (`predict`'s state)."""
    was_training = core.training
    core.eval()
    if not core.use_gcn:
        y = predict_layerwise(core, share, None, n, accelerator)
        core.train(was_training)
        return y
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    spool = Path(spool)
    if accelerator.is_main_process:  # of an earlier inference killed mid-way
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(parents=True)
    accelerator.wait_for_everyone()
    # which rank holds each node, and at which row of its files
    holders = gather_rows(accelerator, share.ids, torch.stack(
        [torch.full((len(share.ids),), rank), torch.arange(len(share.ids))], 1).to(device), n).cpu().numpy()
    own_adjacency = sp.csr_matrix(adjacency[share.ids.numpy()], dtype=np.float32)
    gcn, h_file = core.gcn, None
    for layer in range(gcn.n_layers):
        rows_file = spool / f"rows-{layer}-rank-{rank}.npy"
        _write_layer_inputs(core, share, layer, h_file, rows_file, device)
        accelerator.wait_for_everyone()  # every rank's rows of this layer are on disk
        files = [spool / f"rows-{layer}-rank-{r}.npy" for r in range(world)]
        if layer_input_files is not None:
            write_rows_npy(layer_input_files(layer), n, (_read_rows(files, holders[start:start + _COPY_ROWS, 0],
                                                                    holders[start:start + _COPY_ROWS, 1]).numpy()
                                                         for start in range(0, n, _COPY_ROWS)))
        out, next_h_file = None, spool / f"h-{layer}-rank-{rank}.npy"
        for start in range(0, len(share.ids), chunk_size):
            block = own_adjacency[start:start + chunk_size]
            columns, local = np.unique(block.indices, return_inverse=True)
            neighbours = _read_rows(files, holders[columns, 0], holders[columns, 1])
            sub = torch.sparse_csr_tensor(torch.from_numpy(block.indptr).long(), torch.from_numpy(local).long(),
                                          torch.from_numpy(block.data), size=(block.shape[0], len(columns)),
                                          check_invariants=False)
            h = propagate(sub.to(device), neighbours.to(device))
            if layer < gcn.n_layers - 1:
                h = torch.relu(h)
            if out is None:
                out = np.lib.format.open_memmap(next_h_file, mode="w+", dtype=np.float32,
                                                shape=(len(share.ids), h.shape[1]))
            out[start:start + len(h)] = h.cpu().numpy()
        out.flush()
        del out
        accelerator.wait_for_everyone()  # every rank has read this layer's rows
        rows_file.unlink()
        if h_file is not None:
            h_file.unlink()
        h_file = next_h_file
    y = torch.softmax(torch.from_numpy(np.load(h_file)), dim=1)
    h_file.unlink()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(spool, ignore_errors=True)
    core.train(was_training)
    return y


def _layer_input_chunks(core: SDDECC, share: NodeShare, layer: int, previous: Callable | None,
                        device, kept: list[list[torch.Tensor]] | None = None) -> Iterator[tuple[int, torch.Tensor]]:
    """(offset, rows) for each chunk of the share, in share order: layer `layer`'s row-wise
    inputs ([(1-δ)H + δZ] W, X W for the first layer), re-running the encoder on the chunk for Z;
    `previous(offset, count)` gives the previous layer's H of those nodes (None: first layer).
    `kept`, when given: the first layer's pass appends each chunk's Z^(1..L+1) to it, and the
    later layers take Z from it (the same chunks, so the same values) instead of reading and
    encoding the chunk again."""
    if layer and kept:
        offset = 0
        for representations in kept:
            count = len(representations[0])
            h = previous(offset, count)
            yield offset, core.gcn.layer_input(layer, None, h, representations[layer - 1]).float()
            offset += count
        return
    offset = 0
    for chunk_ids, x, _ in share.chunks():
        if not torch.equal(chunk_ids, share.ids[offset:offset + len(chunk_ids)]):
            raise RuntimeError(f"the share's chunks arrive out of order at node {int(chunk_ids[0])}")
        x = x.to(device)
        if kept is not None:  # the first layer's pass: every layer's Z of this chunk, once
            kept.append(core.gcn_representations(core.encode(x)))
        z = core.gcn_representations(core.encode(x))[layer - 1] if layer else None
        h = previous(offset, len(chunk_ids)) if previous is not None else None
        yield offset, core.gcn.layer_input(layer, core.gcn_input(x), h, z).float()
        offset += len(chunk_ids)


def _write_layer_inputs(core: SDDECC, share: NodeShare, layer: int, h_file: Path | None, rows_file: Path,
                        device) -> None:
    """Layer `layer`'s row-wise inputs of the share's nodes, chunk by chunk, into `rows_file`
    (H of the previous layer read from `h_file`, in the same order)."""
    def previous(offset: int, count: int) -> torch.Tensor:
        rows = np.load(h_file, mmap_mode="r")  # mapped only while this chunk reads it
        return torch.from_numpy(np.array(rows[offset:offset + count])).to(device)

    out = None
    for offset, part in _layer_input_chunks(core, share, layer, previous if h_file is not None else None, device):
        part = part.cpu().numpy()
        if out is None:
            out = np.lib.format.open_memmap(rows_file, mode="w+", dtype=np.float32, shape=(len(share.ids), part.shape[1]))
        out[offset:offset + len(part)] = part
    out.flush()
    del out


def write_rows_npy(path: Path, n: int, blocks: Iterator[np.ndarray]) -> None:
    """An (n, width) float32 .npy at `path` from consecutive row blocks, streamed into a
    temporary file and renamed into place (atomic_write_bytes): one block in memory at a time."""
    def write(f) -> None:
        header_written, rows = False, 0
        for block in blocks:
            block = np.ascontiguousarray(block, dtype=np.float32)
            if not header_written:
                np.lib.format.write_array_header_1_0(
                    f, {"descr": np.lib.format.dtype_to_descr(block.dtype), "fortran_order": False,
                        "shape": (n, block.shape[1])})
                header_written = True
            f.write(block.tobytes())
            rows += len(block)
        if rows != n:
            raise RuntimeError(f"{path}: {rows} rows written, expected {n}")

    atomic_write_bytes(path, write)


def _read_rows(files: list[Path], holder: np.ndarray, row: np.ndarray) -> torch.Tensor:
    """Rows (len(holder), width): row `row[i]` of the file of rank `holder[i]`, each file
    memory-mapped only while it is read."""
    out = None
    for rank, path in enumerate(files):
        mine = np.flatnonzero(holder == rank)
        if len(mine) == 0:
            continue
        rows = np.load(path, mmap_mode="r")
        if out is None:
            out = np.empty((len(holder), rows.shape[1]), dtype=np.float32)
        out[mine] = rows[row[mine]]
        del rows
    return torch.from_numpy(out)


def assignments(core: SDDECC, share: NodeShare, adjacency: sp.csr_matrix | None, n: int,
                accelerator: Accelerator) -> np.ndarray:
    """argmax_j Y_ij of every node (Eq. 20), each rank predicting its share, on every rank."""
    y = predict_layerwise(core, share, adjacency, n, accelerator)
    return gather_rows(accelerator, share.ids, y.argmax(1).to(accelerator.device), n).cpu().numpy()


def final_assignments(core: SDDECC, share: NodeShare, adjacency: sp.csr_matrix | None, n: int,
                      accelerator: Accelerator, spool: Path | None = None, chunk_size: int = 4096,
                      layer_input_files: Callable[[int], Path] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(argmax_j Y_ij, max_j Y_ij) of every node: the run's assignments and their confidence,
    on every rank. With `spool`, the layers' rows go through files there
    (`predict_layerwise_spooled`) instead of memory. `layer_input_files`: where the main process
    writes each GCN layer's input rows of every node, what `predict` needs of the training
    graph (`RunFolder.predict_layer_inputs_path`; nothing is written without a GCN)."""
    files = layer_input_files if core.use_gcn and accelerator.is_main_process else None
    if spool is None:
        layer_inputs = [] if files is not None else None
        y = predict_layerwise(core, share, adjacency, n, accelerator, layer_inputs)
        for layer, rows in enumerate(layer_inputs or []):
            write_rows_npy(files(layer), n, iter([rows.numpy()]))
    else:
        y = predict_layerwise_spooled(core, share, adjacency, n, accelerator, spool, chunk_size, files)
    confidence, labels = y.max(1)
    gathered = gather_rows(accelerator, share.ids, torch.stack([labels.float(), confidence], 1).to(accelerator.device), n)
    return gathered[:, 0].long().cpu().numpy(), gathered[:, 1].cpu().numpy()


def gather_labels(share: NodeShare, n: int, accelerator: Accelerator) -> np.ndarray | None:
    """Every node's label (only to score), gathered from the shares; None if unlabelled."""
    labels = torch.cat([c[2] for c in share.chunks()]).to(accelerator.device)
    labels = gather_rows(accelerator, share.ids, labels, n).cpu().numpy()
    return labels if (labels >= 0).all() else None


@torch.no_grad()
def mean_codes(core: SDDECC, share: NodeShare, n: int, accelerator: Accelerator,
               ids: np.ndarray | None = None) -> torch.Tensor:
    """Mean codes of every node (N, d), or of the nodes `ids` (sorted; (len(ids), d) in that
    order), on every rank, each rank encoding the nodes of its own share."""
    was_training = core.training
    core.eval()
    wanted = None if ids is None else torch.from_numpy(np.asarray(ids))
    codes, positions = [], []
    for chunk_ids, x, _ in share.chunks():
        if wanted is not None:  # only the wanted rows go through the encoder
            place = torch.searchsorted(wanted, chunk_ids).clamp_max(len(wanted) - 1)
            hit = wanted[place] == chunk_ids
            x, chunk_ids = x[hit], place[hit]
        codes.append(core.encode(x.to(accelerator.device)).mean.float())
        positions.append(chunk_ids)
    core.train(was_training)
    rows = n if wanted is None else len(wanted)
    return gather_rows(accelerator, torch.cat(positions), torch.cat(codes), rows).cpu()


@torch.no_grad()
def self_label_assignments(core: SDDECC, share: NodeShare, n: int,
                           accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(argmax of the self-labelling classifier's logits, the mean codes, the logits' softmax)
    of every node, on every rank, each rank encoding its own share once."""
    was_training = core.training
    core.eval()
    labels, codes, probabilities = [], [], []
    for _, x, _ in share.chunks():
        encoded = core.encode(x.to(accelerator.device))
        labels.append(encoded.logits.argmax(1))
        codes.append(encoded.mean.float())
        probabilities.append(torch.softmax(encoded.logits.float(), dim=1))
    core.train(was_training)
    return (gather_rows(accelerator, share.ids, torch.cat(labels), n).cpu().numpy(),
            gather_rows(accelerator, share.ids, torch.cat(codes), n).cpu().numpy(),
            gather_rows(accelerator, share.ids, torch.cat(probabilities), n).cpu().numpy())


def start_partition(core: SDDECC, share: NodeShare, adjacency: torch.Tensor | None,
                    adjacency_sp: sp.csr_matrix | None, n: int, config: Config, n_clusters: int,
                    accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray]:
    """The start: the first partition of the mean codes smoothed over the graph, and its
    cluster means (the centres μ_y): k-means (seeded) or Ward along the graph's edges
    (deterministic). Both run on the gathered codes, so every rank computes the same one."""
    codes = mean_codes(core, share, n, accelerator)
    steps = config.train.center_init_smoothing if adjacency is not None else 0
    if steps:
        codes = smooth(adjacency, codes.to(accelerator.device), steps).cpu()
    codes = codes.numpy()
    knn = None
    if config.train.center_init == "umap_gmm" and n <= config.train.start_fit_sample:
        knn = umap_knn(codes, umap_neighbours(n, n_clusters), config.graph.use_gpu)  # FAISS, not UMAP's own
    return initial_partition(codes, n_clusters, config.train.center_init, graph=adjacency_sp,
                             n_init=config.train.kmeans_n_init, seed=config.seed,
                             fit_sample=config.train.start_fit_sample, knn=knn,
                             candidates=config.train.start_candidates, min_share=config.train.start_min_share)
