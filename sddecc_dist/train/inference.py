"""Codes, cluster probabilities and assignments for a whole dataset, each rank computing its
own share of the nodes and the shares gathered on every rank.

The GCN's Y needs every node's neighbours, so it runs one layer at a time over the whole graph
(`predict_layerwise`): only one layer's activations exist at a time, never the autograd graph.
"""

from __future__ import annotations

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

Chunk = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # global ids, images, labels (-1: none)


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
    chunks (re-running the encoder on the chunk for Z), the rows are gathered into one
    (N, width) matrix, and each rank multiplies its rows of Â with it. Returns Y for the
    share's rows, in `share.ids` order. `layer_inputs`, when given, receives each layer's
    gathered (N, width) rows on the CPU: what a new node's neighbours pass to it (predict.py)."""
    was_training = core.training
    core.eval()
    device = accelerator.device
    if not core.use_gcn:  # ablations without the GCN: Y is row-wise, no graph
        y = torch.cat([core.cluster_probabilities(x, core.encode(x.to(device)), None) for _, x, _ in share.chunks()])
        core.train(was_training)
        return y
    gcn = core.gcn
    own_rows = rows_of(adjacency, share.ids).to(device)
    h = None
    for layer in range(gcn.n_layers):
        parts, offset = [], 0
        for chunk_ids, x, _ in share.chunks():
            if not torch.equal(chunk_ids, share.ids[offset:offset + len(chunk_ids)]):
                raise RuntimeError(f"the share's chunks arrive out of order at node {int(chunk_ids[0])}")
            x = x.to(device)
            z = core.gcn_representations(core.encode(x))[layer - 1] if layer else None
            h_chunk = h[offset:offset + len(chunk_ids)] if h is not None else None
            parts.append(gcn.layer_input(layer, core.gcn_input(x), h_chunk, z).float())
            offset += len(chunk_ids)
        rows = gather_rows(accelerator, share.ids, torch.cat(parts), n)
        if layer_inputs is not None:
            layer_inputs.append(rows.cpu())
        h = propagate(own_rows, rows)
        if layer < gcn.n_layers - 1:
            h = torch.relu(h)
    core.train(was_training)
    return torch.softmax(h, dim=1)


def assignments(core: SDDECC, share: NodeShare, adjacency: sp.csr_matrix | None, n: int,
                accelerator: Accelerator) -> np.ndarray:
    """argmax_j Y_ij of every node (Eq. 20), each rank predicting its share, on every rank."""
    y = predict_layerwise(core, share, adjacency, n, accelerator)
    return gather_rows(accelerator, share.ids, y.argmax(1).to(accelerator.device), n).cpu().numpy()


def final_assignments(core: SDDECC, share: NodeShare, adjacency: sp.csr_matrix | None, n: int,
                      accelerator: Accelerator) -> tuple[np.ndarray, np.ndarray, list[torch.Tensor] | None]:
    """(argmax_j Y_ij, max_j Y_ij, each GCN layer's input rows) of every node: the run's
    assignments and their confidence on every rank, and on the main process what `predict`
    needs of the training graph (None elsewhere, and without a GCN)."""
    layer_inputs = [] if core.use_gcn and accelerator.is_main_process else None
    y = predict_layerwise(core, share, adjacency, n, accelerator, layer_inputs)
    confidence, labels = y.max(1)
    gathered = gather_rows(accelerator, share.ids, torch.stack([labels.float(), confidence], 1).to(accelerator.device), n)
    return gathered[:, 0].long().cpu().numpy(), gathered[:, 1].cpu().numpy(), layer_inputs


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
                             fit_sample=config.train.start_fit_sample, knn=knn)
