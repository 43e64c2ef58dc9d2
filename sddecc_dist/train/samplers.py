"""What each training step sees: minibatches of images for pretraining, graph batches for the
joint phase.

A joint sampler yields `GraphBatch`es: a set of nodes with their images, the normalised
adjacency among them, and which of them this rank scores. The training loop takes whatever it
is given; how the graph is cut into batches is the sampler's business:

    FullGraphSampler     every step is the whole graph (the paper's and SDCN's setting): every
                         image in memory on every rank, each rank scoring its own share.
    ClusterGCNSampler    Cluster-GCN (Chiang et al. 2019): each step is a few METIS partitions
                         with their induced, renormalised adjacency, streamed from
                         partition-ordered shards; memory bounded by the batch, not by N.

A new sampler is one class with the same four members (`steps_per_epoch`, `epoch`,
`node_share`, `state_dict`) and the graph for the start and inference (`adjacency`,
`adjacency_sp`, normalised from `sym_adjacency`, which `keep_edges_within` can cut along a
partition). Building a sampler runs the stages it needs (graph, partitions): call it inside
`accelerator.main_process_first()`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from accelerate import Accelerator

from sddecc_dist.config import Config, ConfigError
from sddecc_dist.data import (
    load_all,
    rank_shards,
    read_partitioned_manifest,
    shard_indices,
    stream_batches,
    stream_subgraphs,
)
from sddecc_dist.data.augment import RandomAffineAugment
from sddecc_dist.data import steps_per_epoch as partition_steps
from sddecc_dist.graph import (
    edges_within,
    induced_adjacency,
    load_graph,
    load_neighbors,
    normalize_with_self_loops,
    symmetric_adjacency,
    to_scipy_csr,
)
from sddecc_dist.pipeline import ensure_graph, ensure_partitioned_shards, graph_path, graph_view
from sddecc_dist.run_folder import RunFolder
from sddecc_dist.train.inference import NodeShare, node_share


class PretrainBatches:
    """Shuffled minibatches of images for DDECN pretraining. One process takes every sample
    (the last batch partial); several take equal numbers of full batches from their own shards,
    so that no rank waits in a collective for a batch another rank lacks. The batches are
    streamed from the shards through webdataset, or, given `images` (every sample, by global
    index), cut from memory: each rank shuffles its own shards' samples with a generator
    seeded by (seed, epoch). With train.pretrain_augment=affine the encoder sees randomly
    warped images."""

    def __init__(self, config: Config, manifest: dict, micro_batch: int, rank: int, world_size: int,
                 device: torch.device, images: torch.Tensor | None = None):
        self.config, self.manifest, self.device, self.images = config, manifest, device, images
        self.micro_batch, self.rank, self.world_size = micro_batch, rank, world_size
        n = manifest["count"]
        self.steps = None if world_size == 1 else n // (world_size * micro_batch)
        self.steps_per_epoch = math.ceil(n / micro_batch) if self.steps is None else self.steps
        train = config.train
        self.epochs = self.epochs_for(train.pretrain_epochs, train.pretrain_steps)
        self.augment = None
        if train.pretrain_augment == "affine":
            self.augment = RandomAffineAugment(train.augment_degrees, train.augment_translate, train.augment_scale)

    def epochs_for(self, epochs: int, optimiser_steps: int) -> int:
        """At least `epochs`, raised until they hold `optimiser_steps` optimiser steps (one per
        gradient_accumulation_steps micro-batches)."""
        per_epoch = max(1, self.steps_per_epoch // self.config.train.gradient_accumulation_steps)
        return max(epochs, math.ceil(optimiser_steps / per_epoch))

    def epoch(self, epoch: int,
              start_step: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """(step, the samples' global ids (CPU), encoder input, reconstruction target or None for
        the input itself) of `epoch`, on the device, from `start_step` on: the same seed gives
        the same order, so a resumed epoch continues exactly."""
        seed = self.config.seed * 100003 + epoch
        if self.images is None:
            batches = ((ids, images) for ids, images, _ in stream_batches(
                self.config.data_dir, self.micro_batch, self.config.data.shuffle_buffer, seed=seed,
                manifest=self.manifest, rank=self.rank, world_size=self.world_size, steps=self.steps))
            batches = ((step, *batch) for step, batch in enumerate(batches) if step >= start_step)  # read past
        else:
            batches = self._from_memory(seed, start_step)
        for step, ids, images in batches:
            images = images.to(self.device)
            if self.augment is None:
                yield step, ids, images, None
                continue
            warped = self.augment(images)
            yield step, ids, warped, images if self.config.train.augment_target == "clean" else None

    def _from_memory(self, seed: int, start_step: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        shards = [self.manifest["shards"][i] for i in rank_shards(self.manifest, self.rank, self.world_size)]
        own = torch.from_numpy(shard_indices(shards))
        order = own[torch.randperm(len(own), generator=torch.Generator().manual_seed(seed))]
        if self.steps is not None:  # several ranks: exactly `steps` full batches, reshuffled passes if short
            passes = math.ceil(self.steps * self.micro_batch / len(own))
            order = torch.cat([order] + [own[torch.randperm(len(own), generator=torch.Generator().manual_seed(
                seed * 1009 + extra))] for extra in range(1, passes)])[:self.steps * self.micro_batch]
        for step, start in enumerate(range(0, len(order), self.micro_batch)):
            if step >= start_step:  # a resumed epoch gathers only the batches it has not trained on
                ids = order[start:start + self.micro_batch]
                yield step, ids, self.images[ids]


@dataclass
class GraphBatch:
    ids: torch.Tensor  # global ids of the batch's nodes, in row order (CPU)
    images: torch.Tensor  # (B, C, H, W), on the device
    adjacency: torch.Tensor | None  # their normalised adjacency (torch CSR, device); None without the GCN
    scored: torch.Tensor | None  # rows whose loss this rank takes (device); None: every row
    share: float  # the batch's share of all the data (1.0: the whole graph)

    @property
    def scored_ids(self) -> torch.Tensor:
        """Global ids of the scored rows (CPU)."""
        return self.ids if self.scored is None else self.ids[self.scored.cpu()]


class JointSampler(ABC):
    adjacency: torch.Tensor | None  # Â of the whole graph (device), for the start's smoothing
    adjacency_sp: sp.csr_matrix | None  # the same as scipy CSR, for inference and the Ward start
    sym_adjacency: sp.csr_matrix | None  # A (symmetric, unweighted, no self loops) that Â normalises
    device: torch.device

    @property
    @abstractmethod
    def steps_per_epoch(self) -> int: ...

    @abstractmethod
    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, GraphBatch]]:
        """(step, batch) of `epoch`, from `start_step` on, the same on every resumption."""

    @abstractmethod
    def node_share(self) -> NodeShare:
        """This rank's share of the nodes, for the start and full-graph inference."""

    @abstractmethod
    def state_dict(self) -> dict:
        """What a resumed run must find again (a checkpoint of another sampler is refused)."""

    @property
    def images_in_memory(self) -> torch.Tensor | None:
        """Every image by global index (CPU) when the sampler holds them, else None."""
        return None

    def keep_edges_within(self, partition: np.ndarray) -> float:
        """From here on the graph holds only the edges inside `partition`'s clusters
        (train.joint_graph=within_start): Â, its scipy copy and the subgraphs the batches
        induce. Returns the fraction of edges kept."""
        within = edges_within(self.sym_adjacency, partition)
        kept = within.nnz / max(self.sym_adjacency.nnz, 1)
        self._set_graph(within)
        return kept

    def _set_graph(self, sym_adjacency: sp.csr_matrix, adjacency: torch.Tensor | None = None) -> None:
        """A, and Â: the given one (the graph artifact's), else D^-1/2 (A + I) D^-1/2 of A."""
        self.sym_adjacency = sym_adjacency
        if adjacency is None:
            adjacency = normalize_with_self_loops(sym_adjacency)
        self.adjacency_sp = to_scipy_csr(adjacency)
        self.adjacency = adjacency.to(self.device)

    def _load_graph(self, config: Config, manifest: dict, images: torch.Tensor | None) -> str:
        """The data folder's kNN graph (built and saved first when missing); returns its view."""
        check_graph_k(config, manifest["count"])
        view = graph_view(config, manifest)
        adjacency = ensure_graph(config.data_dir, config.graph.k, images, config.graph.use_gpu, params=config.graph,
                                 view=view)
        neighbors, _ = load_neighbors(graph_path(config.data_dir, config.graph.k, view))
        self._set_graph(symmetric_adjacency(neighbors, manifest["count"]), adjacency)  # Â as saved, not recomputed
        return view


def finished_run_adjacency(run: RunFolder, config: Config, manifest: dict) -> sp.csr_matrix:
    """Â of a finished run's joint phase, as its samplers had it: the data folder's kNN graph
    artifact as saved, or with train.joint_graph=within_start only its edges inside the
    partition the joint phase started from (the self-labelled one when the run has it),
    renormalised as `keep_edges_within` does. For rerunning a run's inference alone."""
    path = graph_path(config.data_dir, config.graph.k, graph_view(config, manifest))
    if config.train.joint_graph != "within_start":
        return to_scipy_csr(load_graph(path)[0])
    start = (run.read_self_label_assignments() if run.self_label_assignments_path.is_file()
             else run.read_initial_assignments())
    within = edges_within(symmetric_adjacency(load_neighbors(path)[0], manifest["count"]), start)
    return to_scipy_csr(normalize_with_self_loops(within))


def build_joint_sampler(config: Config, manifest: dict, accelerator: Accelerator) -> JointSampler:
    if config.train.joint_sampler == "cluster":
        return ClusterGCNSampler(config, manifest, accelerator)
    return FullGraphSampler(config, manifest, accelerator)


def check_graph_k(config: Config, n: int) -> None:
    if config.graph.k >= n:
        raise ConfigError(f"graph.k={config.graph.k} must be smaller than the number of samples ({n})")


class FullGraphSampler(JointSampler):
    """One step per epoch over the whole graph; every image on every rank (small sets only)."""

    def __init__(self, config: Config, manifest: dict, accelerator: Accelerator):
        self.config, self.manifest, self.accelerator = config, manifest, accelerator
        self.n, self.device = manifest["count"], accelerator.device
        self.images, self.labels = load_all(config.data_dir, manifest)
        self.adjacency = self.adjacency_sp = self.sym_adjacency = None
        if config.model.use_gcn:
            self._load_graph(config, manifest, self.images)
        self._share = node_share(config.data_dir, manifest, accelerator.process_index, accelerator.num_processes,
                                 config.train.inference_batch_size, self.images, self.labels)
        self._images = None  # on the device, at the first batch

    @property
    def steps_per_epoch(self) -> int:
        return 1

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, GraphBatch]]:
        if start_step > 0:
            return
        if self._images is None:
            self._images = self.images.to(self.accelerator.device)
        yield 0, GraphBatch(torch.arange(self.n), self._images, self.adjacency,
                            scored=self._share.ids.to(self.accelerator.device), share=1.0)

    def node_share(self) -> NodeShare:
        return self._share

    def state_dict(self) -> dict:
        return {"sampler": "full", "n": self.n}

    @property
    def images_in_memory(self) -> torch.Tensor:
        return self.images


class ClusterGCNSampler(JointSampler):
    """Each step the union of `partitions_per_batch` METIS partitions of about `partition_size`
    nodes, with the adjacency induced on them and renormalised there."""

    def __init__(self, config: Config, manifest: dict, accelerator: Accelerator):
        if not config.model.use_gcn:
            raise ConfigError("train.joint_sampler=cluster needs the GCN (model.use_gcn=true)")
        train = config.train
        self.config, self.manifest, self.accelerator = config, manifest, accelerator
        self.n, self.device = manifest["count"], accelerator.device
        self.n_parts = max(1, math.ceil(self.n / train.partition_size))
        view = self._load_graph(config, manifest, None)
        self.part_dir = ensure_partitioned_shards(config.data_dir, config.graph.k, self.n_parts,
                                                  train.partition_method, train.partitions_per_shard,
                                                  seed=config.seed, view=view)
        self.part_manifest = read_partitioned_manifest(self.part_dir)
        self._steps = partition_steps(self.part_manifest, train.partitions_per_batch, accelerator.num_processes)
        self._share = node_share(config.data_dir, manifest, accelerator.process_index, accelerator.num_processes,
                                 train.inference_batch_size)

    @property
    def steps_per_epoch(self) -> int:
        return self._steps

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[tuple[int, GraphBatch]]:
        device = self.accelerator.device
        batches = stream_subgraphs(self.part_dir, self.config.train.partitions_per_batch, self.config.seed, epoch,
                                   self.accelerator.process_index, self.accelerator.num_processes,
                                   manifest=self.part_manifest)
        for step in range(self._steps):
            ids, images, _ = next(batches)
            if step < start_step:  # resuming mid-epoch: the same seed gives the same batches
                continue
            yield step, GraphBatch(ids, images.to(device), induced_adjacency(self.sym_adjacency, ids).to(device),
                                   scored=None, share=len(ids) / self.n)

    def node_share(self) -> NodeShare:
        return self._share

    def state_dict(self) -> dict:
        section = self.part_manifest["partitioned"]
        return {"sampler": "cluster", "n": self.n, "n_parts": self.n_parts,
                "partitions_per_batch": self.config.train.partitions_per_batch,
                "partition_fingerprint": section["partition_fingerprint"]}
