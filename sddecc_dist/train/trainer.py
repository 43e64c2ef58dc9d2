"""The SDDECC training loop, start to finish, in one place.

    1. data:     shards (prepared if missing); each rank streams its own share
    2. graph:    kNN graph artifact over raw pixels (built if missing); for the cluster
                 sampler also METIS partitions and partition-ordered shards
    3. pretrain: DDECN = reconstruction + λ1 MI (global, local) + λ2 prior KL, minibatches
    4. centres:  k-means on the pretrained mean codes (smoothed over the graph) -> μ_y
    5. joint:    Eq. 19, full batch over the graph (the paper's setting) or Cluster-GCN subgraphs
    6. results:  assignments argmax_j Y_ij of the LAST epoch (layer-wise full-graph inference),
                 metrics, checkpoints

One process or many: Accelerate (DDP, or DeepSpeed from the launch config) synchronises the
gradients; the model and the data layer know nothing of ranks. Labels never influence training
or selection: they are only read to score the run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import yaml
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DistributedDataParallelKwargs,
    InitProcessGroupKwargs,
    broadcast,
    gather_object,
    set_seed,
)
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sddecc_dist.config import Config, ConfigError, method_name, to_dict
from sddecc_dist.data import (
    load_all,
    rank_shards,
    read_manifest,
    read_partitioned_manifest,
    shard_indices,
    steps_per_epoch,
    stream_batches,
    stream_share,
    stream_subgraphs,
)
from sddecc_dist.graph import induced_adjacency, load_neighbors, symmetric_adjacency, to_scipy_csr
from sddecc_dist.metrics import clustering_scores
from sddecc_dist.model.gcn import propagate, smooth
from sddecc_dist.model.initial_partition import initial_partition
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.stages import (
    ensure_graph,
    ensure_partitioned_shards,
    graph_path,
    index_params,
    prepare_dataset,
)
from sddecc_dist.utils import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    console,
    gather_rows,
    peak_memory_mib,
)

PHASES = ("pretrain", "joint")


def log(*args, **kwargs) -> None:
    """console.log on the main process only."""
    if PartialState().is_main_process:
        console.log(*args, **kwargs)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not PartialState().is_main_process,
    )


def _format(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in parts.items())


# ---- where a run is, and how it survives being stopped --------------------------------------

@dataclass
class Position:
    """The next step to run: phase, epoch within it, step within the epoch."""

    phase: str = "pretrain"
    epoch: int = 0
    step: int = 0

    @property
    def name(self) -> str:  # sorts in training order
        return f"ckpt-{PHASES.index(self.phase)}-{self.epoch:05d}-{self.step:07d}"


class Preempted(SystemExit):
    """Raised after a checkpoint was saved on SIGTERM / SIGUSR1; exit status 128 + signal."""


class StopSignal:
    """SIGTERM and SIGUSR1 (Slurm's pre-emption and time-limit warnings) only set a flag; the
    loop checks it after each step, all ranks agree through one all-reduce, save and exit."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal number if any rank got one, else 0 (every rank calls this every step)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="sum").item() > 0) * (self.signum or signal.SIGTERM)


class Run:
    """The run folder: config.yaml, metrics.jsonl, checkpoints/, initial_assignments.txt (the
    partition the centres come from), metrics.json, assignments.txt.

    Checkpoints are Accelerate state folders (model, optimiser, every rank's RNG; DeepSpeed
    writes its own shards there) plus position.json, saved as checkpoints/.tmp-NAME and renamed
    once complete, so a crash never leaves a folder that looks valid; the newest
    `keep` are kept."""

    def __init__(self, output_dir: str | Path, accelerator: Accelerator, keep: int):
        self.dir = Path(output_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.keep = keep
        if self.is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()

    def set_aside_previous(self) -> None:
        """A fresh run in a used folder: keep the earlier run's checkpoints in
        `checkpoints.previous/` (so --resume cannot mix the two) and start a new log."""
        if self.is_main and (any(self.checkpoints.iterdir()) or (self.dir / "metrics.jsonl").exists()):
            log(f"[yellow]{self.dir} holds an earlier run: starting over, its checkpoints "
                f"moved to checkpoints.previous/ (use --resume to continue a run instead)")
            previous = self.dir / "checkpoints.previous"
            if previous.exists():
                shutil.rmtree(previous)
            self.checkpoints.rename(previous)
            self.checkpoints.mkdir()
            (self.dir / "metrics.jsonl").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()

    def log_metrics(self, record: dict) -> None:
        if self.is_main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def export_model(self, name: str, core: torch.nn.Module, config: Config, position: Position) -> None:
        """A plain model file for other stages and scripts (k-means on codes, evaluation)."""
        if self.is_main:
            atomic_torch_save({"phase": position.phase, "epoch": position.epoch,
                               "model": core.state_dict(), "config": to_dict(config)},
                              self.checkpoints / name)

    def save(self, position: Position, extra: dict) -> None:
        """Every rank calls this (each saves its RNG state; DeepSpeed its shards)."""
        final = self.checkpoints / position.name
        tmp = self.checkpoints / f".tmp-{position.name}"
        if self.is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp))
        self.accelerator.wait_for_everyone()
        if self.is_main:
            atomic_write_json(tmp / "position.json", {**vars(position), **extra})
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in self.valid_checkpoints()[self.keep:]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def valid_checkpoints(self) -> list[Path]:
        """Complete checkpoint folders, newest first (a folder without position.json is not one)."""
        folders = [p for p in self.checkpoints.glob("ckpt-*") if (p / "position.json").is_file()]
        return sorted(folders, key=lambda p: p.name, reverse=True)

    def restore(self) -> tuple[Position, dict] | None:
        """Load the newest checkpoint that loads; skip (with a warning) any that does not."""
        for folder in self.valid_checkpoints():
            try:
                info = json.loads((folder / "position.json").read_text())
                self.accelerator.load_state(str(folder))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log(f"[yellow]checkpoint {folder} is unreadable ({type(error).__name__}: "
                    f"{error}); trying an older one")
                continue
            position = Position(info.pop("phase"), info.pop("epoch"), info.pop("step"))
            log(f"resumed from {folder} ({position.phase}, epoch {position.epoch}, step {position.step})")
            return position, info
        return None


# ---- the pieces the loop composes -------------------------------------------------------------

def _make_accelerator(config: Config) -> Accelerator:
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    on_cpu = not torch.cuda.is_available()
    handlers = [
        # Each phase leaves parts of the model unused (the GCN in pretraining, the DDECN in the
        # head warm-up): DDP must not wait for their gradients.
        DistributedDataParallelKwargs(find_unused_parameters=True),
    ]
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo on CPU (DeepSpeed would pick another backend); only when launched with several
        # processes: with this handler a lone process would look for a process group.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a CPU machine starts processes
        # that each think they are alone (platform.md). DeepSpeed brings its own CPU accelerator.
        cpu=on_cpu and not deepspeed,
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )


def _prepare_data(config: Config, accelerator: Accelerator) -> dict:
    data_dir = Path(config.data_dir)
    with accelerator.main_process_first():  # rank 0 writes missing shards, the others then read
        if not (data_dir / "dataset.json").exists():
            if config.data.source is None:
                raise ConfigError(
                    f"data_dir {data_dir} holds no dataset.json; prepare it with "
                    f"`sddecc prepare SOURCE --out {data_dir}` or set data.source in the config"
                )
            if accelerator.is_main_process:
                prepare_dataset(
                    config.data.source, data_dir, from_dir=config.data.from_dir, split=config.data.split,
                    size=config.data.size, samples_per_shard=config.data.samples_per_shard,
                )
        return read_manifest(data_dir)


def _score(assignments: np.ndarray, labels: np.ndarray | None) -> dict:
    return clustering_scores(labels, assignments) if labels is not None else {}


def _rows_of(adjacency: sp.csr_matrix, ids: torch.Tensor) -> torch.Tensor:
    """Rows `ids` of the normalised adjacency, all columns, as a torch CSR tensor."""
    rows = sp.csr_matrix(adjacency[ids.numpy()], dtype=np.float32)
    return torch.sparse_csr_tensor(torch.from_numpy(rows.indptr).long(), torch.from_numpy(rows.indices).long(),
                                   torch.from_numpy(rows.data), size=rows.shape, check_invariants=False)


ChunkSource = Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


def _share_ids(manifest: dict, rank: int, world_size: int) -> torch.Tensor:
    """Global ids of this rank's share of the nodes: the samples of its shards, in stream order."""
    return torch.from_numpy(shard_indices([manifest["shards"][i] for i in rank_shards(manifest, rank, world_size)]))


def _share_chunks(config: Config, manifest: dict, images: torch.Tensor | None, labels: torch.Tensor | None,
                  rank: int, world_size: int) -> ChunkSource:
    """This rank's share of the nodes (`_share_ids`), in chunks of (ids, images, labels): from
    memory when the images are loaded, else streamed from shards."""
    size = config.train.inference_batch_size
    if images is not None:
        ids = _share_ids(manifest, rank, world_size)
        lab = labels if labels is not None else torch.full((len(images),), -1, dtype=torch.long)
        return lambda: ((ids[i:i + size], images[ids[i:i + size]], lab[ids[i:i + size]])
                        for i in range(0, len(ids), size))
    return lambda: stream_share(config.data_dir, size, rank, world_size, manifest)


@torch.no_grad()
def predict_layerwise(core: SDDECC, chunks: ChunkSource, ids: torch.Tensor, adjacency: sp.csr_matrix, n: int,
                      accelerator: Accelerator) -> torch.Tensor:
    """Y for this rank's share of the full graph, one GCN layer at a time.

    Per layer, each rank computes the row-wise part [(1-δ)H + δZ] W for its own nodes in
    chunks (re-running the encoder on the chunk for Z), the rows are gathered into one
    (N, width) matrix, and each rank multiplies its rows of Â with it. Only one layer's
    activations exist at a time. `ids`: the share's node ids, in the order `chunks` yields
    them (`_share_ids`). Returns Y for those rows."""
    was_training = core.training
    core.eval()
    device = accelerator.device
    if not core.use_gcn:  # ablations without the GCN: Y is row-wise, no graph
        y = torch.cat([core.cluster_probabilities(x, core.encode(x.to(device)), None) for _, x, _ in chunks()])
        core.train(was_training)
        return y
    gcn = core.gcn
    own_rows = _rows_of(adjacency, ids).to(device)
    h = None
    for layer in range(gcn.n_layers):
        parts, offset = [], 0
        for chunk_ids, x, _ in chunks():
            if not torch.equal(chunk_ids, ids[offset:offset + len(chunk_ids)]):
                raise RuntimeError(f"the share's chunks arrive out of order at node {int(chunk_ids[0])}")
            x = x.to(device)
            z = core.gcn_representations(core.encode(x))[layer - 1] if layer else None
            h_chunk = h[offset:offset + len(chunk_ids)] if h is not None else None
            parts.append(gcn.layer_input(layer, x.flatten(1), h_chunk, z).float())
            offset += len(chunk_ids)
        h = propagate(own_rows, gather_rows(accelerator, ids, torch.cat(parts), n))
        if layer < gcn.n_layers - 1:
            h = torch.relu(h)
    core.train(was_training)
    return torch.softmax(h, dim=1)


def _assignments(core, chunks, ids, adjacency, n, accelerator) -> np.ndarray:
    """argmax_j Y_ij of every node (Eq. 20), each rank predicting its share, on every rank."""
    y = predict_layerwise(core, chunks, ids, adjacency, n, accelerator)
    return gather_rows(accelerator, ids, y.argmax(1).to(accelerator.device), n).cpu().numpy()


def _labels(chunks: ChunkSource, ids: torch.Tensor, n: int, accelerator: Accelerator) -> np.ndarray | None:
    """Every node's label (only to score), gathered from the shares; None if unlabelled."""
    labels = torch.cat([c[2] for c in chunks()]).to(accelerator.device)
    labels = gather_rows(accelerator, ids, labels, n).cpu().numpy()
    return labels if (labels >= 0).all() else None


def _initial_clusters(core, chunks, ids, adjacency, adjacency_sp, n, config: Config, n_clusters: int,
                      accelerator) -> tuple[np.ndarray, np.ndarray]:
    """The first partition of the mean codes smoothed over the graph, and its cluster means
    (the centres μ_y): k-means (seeded) or Ward along the graph's edges (deterministic). Both
    run on the gathered codes, so every rank computes the same partition."""
    codes = _mean_codes(core, chunks, ids, n, accelerator)
    smoothing = config.train.center_init_smoothing if adjacency is not None else 0
    if smoothing:
        codes = smooth(adjacency, codes.to(accelerator.device), smoothing).cpu()
    return initial_partition(codes.numpy(), n_clusters, config.train.center_init, graph=adjacency_sp,
                             n_init=config.train.kmeans_n_init, seed=config.seed)


def _reset_moments(optimizer) -> None:
    """Fresh Adam moments for the joint phase, as a new optimiser would have: the pretraining
    moments (scaled by the reconstruction-dominated gradients) would mis-scale its first steps.
    DeepSpeed keeps its moments in its own partitions; there they carry over."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, torch.optim.Optimizer):
        inner.state.clear()


def _sync_deepspeed_master(optimizer) -> None:
    """DeepSpeed ZeRO keeps its own fp32 master copy of every parameter, which would overwrite
    weights set directly on the module at the next step: refresh it from the module."""
    restore = getattr(getattr(optimizer, "optimizer", None), "_restore_from_bit16_weights", None)
    if restore is not None:
        restore()


@torch.no_grad()
def _mean_codes(core: SDDECC, chunks: ChunkSource, ids: torch.Tensor, n: int, accelerator: Accelerator) -> torch.Tensor:
    """Mean codes of every node (N, d) on every rank, each rank encoding its own share."""
    was_training = core.training
    core.eval()
    codes = torch.cat([core.encode(x.to(accelerator.device)).mean.float() for _, x, _ in chunks()])
    core.train(was_training)
    return gather_rows(accelerator, ids, codes, n).cpu()


def _set_learning_rates(optimizer, ddecn_lr: float, head_lr: float) -> None:
    """One optimiser for the whole run (DeepSpeed takes one per model): its two parameter
    groups, DDECN + centres and the head, get the learning rates of the current phase."""
    for group, lr in zip(optimizer.param_groups, (ddecn_lr, head_lr)):
        group["lr"] = lr


# ---- the run -----------------------------------------------------------------------------------

def train(config: Config) -> dict:
    started = time.time()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    accelerator = _make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(config.seed)  # the same on every rank: same initial weights, same k-means
    run = Run(config.output_dir, accelerator, config.train.keep_checkpoints)
    if not config.train.resume:
        run.set_aside_previous()
    if accelerator.is_main_process:
        atomic_write_text(run.dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))

    # 1. data ------------------------------------------------------------------------------
    manifest = _prepare_data(config, accelerator)
    image_shape = tuple(manifest["image_shape"])
    n = manifest["count"]
    n_clusters = config.n_clusters or manifest.get("n_classes")
    if not n_clusters:
        raise ConfigError(f"{config.data_dir}/dataset.json gives no number of classes: set n_clusters=K")
    train_cfg, loss_config = config.train, config.loss
    micro_batch, rest = divmod(train_cfg.pretrain_batch_size, world * train_cfg.gradient_accumulation_steps)
    if rest or micro_batch < 2:
        raise ConfigError(
            f"train.pretrain_batch_size={train_cfg.pretrain_batch_size} is the global batch: it must be "
            f"a multiple of processes ({world}) x gradient_accumulation_steps "
            f"({train_cfg.gradient_accumulation_steps}) with at least 2 samples per micro-batch"
        )
    full_batch = train_cfg.joint_sampler == "full"
    # The full-batch joint phase holds every image on every rank (small sets only).
    images, labels = load_all(config.data_dir, manifest) if full_batch else (None, None)
    log(f"{manifest['name']}: {n} samples {image_shape}, {n_clusters} clusters, "
        f"{world} process(es) on {accelerator.device}, joint sampler {train_cfg.joint_sampler}")

    # 2. graph (and, for the cluster sampler, partitions) ----------------------------------
    adjacency = adjacency_sp = sym_adjacency = part_dir = None
    if config.model.use_gcn:
        if config.graph.k >= n:
            raise ConfigError(f"graph.k={config.graph.k} must be smaller than the number of samples ({n})")
        with accelerator.main_process_first():
            adjacency = ensure_graph(config.data_dir, config.graph.k, images, config.graph.use_gpu,
                                     params=index_params(config.graph))
            if not full_batch:
                n_parts = max(1, math.ceil(n / train_cfg.partition_size))
                part_dir = ensure_partitioned_shards(config.data_dir, config.graph.k, n_parts,
                                                     train_cfg.partition_method, train_cfg.partitions_per_shard,
                                                     seed=config.seed)
        adjacency_sp = to_scipy_csr(adjacency)
        if not full_batch:
            neighbors, _ = load_neighbors(graph_path(config.data_dir, config.graph.k))
            sym_adjacency = symmetric_adjacency(neighbors, n)
            part_manifest = read_partitioned_manifest(part_dir)
        adjacency = adjacency.to(accelerator.device)
    elif not full_batch:
        raise ConfigError("train.joint_sampler=cluster needs the GCN (model.use_gcn=true)")
    chunks = _share_chunks(config, manifest, images, labels, rank, world)
    share_ids = _share_ids(manifest, rank, world)
    label_array = _labels(chunks, share_ids, n, accelerator)

    # 3. model and one optimiser with two groups: DDECN + centres, and the head -------------
    model = SDDECC(image_shape, n_clusters, config.model)
    head_ids = {id(p) for p in model.head_parameters()}
    optimizer = torch.optim.Adam([
        {"params": [p for p in model.parameters() if id(p) not in head_ids], "lr": train_cfg.pretrain_lr},
        {"params": model.head_parameters(), "lr": 0.0},
    ])
    if accelerator.state.deepspeed_plugin is not None:
        # No DataLoader goes through prepare(): DeepSpeed must be told the micro-batch size.
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)

    position, extra = Position(), {}
    if train_cfg.init_from:
        state = torch.load(train_cfg.init_from, map_location="cpu", weights_only=False)
        # A pretrained model written before q(y) was a buffer: its q(y) was the uniform one.
        core.load_state_dict({"cluster_prior": core.cluster_prior, **state["model"]})
        _sync_deepspeed_master(optimizer)
        position = Position("joint", 0, 0)
        log(f"pretrained model from {train_cfg.init_from}: pretraining skipped")
    if train_cfg.resume:
        restored = run.restore()
        if restored is not None:
            position, extra = restored
        else:
            log(f"[yellow]no checkpoint in {run.checkpoints}: starting from scratch")
            run.set_aside_previous()

    def checkpoint(at: Position, **more) -> None:
        run.save(at, {**extra, **more})

    with StopSignal() as stop, _progress() as progress:

        def after_step(phase: str, epoch: int, step: int, steps_in_epoch: int) -> None:
            """Called after every optimiser step; on a signal, saves the position of the next one."""
            signum = stop.agreed(accelerator)
            if signum:
                at = Position(phase, epoch, step + 1) if step + 1 < steps_in_epoch else Position(phase, epoch + 1, 0)
                checkpoint(at)
                log(f"[yellow]signal {signum}: saved {run.checkpoints / at.name}; exiting so the "
                    f"job can be requeued (resume with train.resume=true)")
                raise Preempted(128 + signum)

        # 4. pretraining -----------------------------------------------------------------------
        if position.phase == "pretrain":
            # One process streams every sample (last batch partial); several take equal counts.
            steps = None if world == 1 else n // (world * micro_batch)
            steps_in_epoch = math.ceil(n / micro_batch) if steps is None else steps
            task = progress.add_task("pretrain", total=train_cfg.pretrain_epochs, completed=position.epoch, status="")
            for epoch in range(position.epoch, train_cfg.pretrain_epochs):
                epoch_start, sums, seen = time.time(), {}, 0
                skip = position.step if epoch == position.epoch else 0
                batches = stream_batches(
                    config.data_dir, micro_batch, config.data.shuffle_buffer,
                    seed=config.seed * 100003 + epoch, manifest=manifest, rank=rank, world_size=world, steps=steps,
                )
                _set_learning_rates(optimizer, train_cfg.pretrain_lr, 0.0)
                for step, (_, x, _) in enumerate(batches):
                    if step < skip:  # resuming mid-epoch: the same seed gives the same order
                        continue
                    x = x.to(accelerator.device)
                    with accelerator.accumulate(model):
                        # Through the (DDP/DeepSpeed-wrapped) forward, so gradients synchronise.
                        terms = model("pretrain", x, loss_config=loss_config)
                        accelerator.backward(terms.total)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    seen += len(x)
                    for k, v in terms.parts.items():
                        sums[k] = sums.get(k, 0.0) + v * len(x)
                    progress.update(task, status=f"step {step + 1} {seen * world / (time.time() - epoch_start):.0f} samples/s")
                    after_step("pretrain", epoch, step, steps_in_epoch)
                means = {k: v / max(seen, 1) for k, v in sums.items()}
                progress.update(task, advance=1)
                log(f"pretrain epoch {epoch + 1}/{train_cfg.pretrain_epochs} {_format(means)} "
                    f"({seen * world / (time.time() - epoch_start):.0f} samples/s)")
                run.log_metrics({"phase": "pretrain", "epoch": epoch + 1, **means,
                                 "peak_memory_mib": round(peak_memory_mib(), 1)})
                if (epoch + 1) % train_cfg.checkpoint_every == 0 and epoch + 1 < train_cfg.pretrain_epochs:
                    checkpoint(Position("pretrain", epoch + 1, 0))
            run.export_model("pretrain.pt", core, config, Position("pretrain", train_cfg.pretrain_epochs))
            position = Position("joint", 0, 0)
        elif train_cfg.init_from and accelerator.is_main_process:  # keep the stage's artifact in this run
            shutil.copyfile(train_cfg.init_from, run.checkpoints / "pretrain.pt")

        # 5. centres from the initial partition of the pretrained codes (once; saved with the next checkpoint)
        if position == Position("joint", 0, 0) and not extra.get("centres_ready"):
            init_labels, init_centres = _initial_clusters(core, chunks, share_ids, adjacency, adjacency_sp, n,
                                                          config, n_clusters, accelerator)
            with torch.no_grad():
                core.centers.copy_(broadcast(torch.from_numpy(init_centres).float().to(accelerator.device)))
                if config.loss.cluster_prior == "init":  # q(y): the partition's proportions
                    proportions = np.bincount(init_labels, minlength=n_clusters) / len(init_labels)
                    core.cluster_prior.copy_(torch.from_numpy(proportions).float().to(accelerator.device))
            if accelerator.is_main_process:
                atomic_write_text(run.dir / "initial_assignments.txt", "\n".join(map(str, init_labels.tolist())) + "\n")
            _sync_deepspeed_master(optimizer)
            _reset_moments(optimizer)
            kmeans_scores = _score(init_labels, label_array)
            extra = {"centres_ready": True, "kmeans": kmeans_scores}
            log(f"{train_cfg.center_init} on pretrained codes (graph-smoothed "
                f"{train_cfg.center_init_smoothing if adjacency is not None else 0}x): {_format(kmeans_scores)}")
            run.log_metrics({"phase": "kmeans", "epoch": train_cfg.pretrain_epochs, **kmeans_scores,
                             "peak_memory_mib": round(peak_memory_mib(), 1)})
            checkpoint(Position("joint", 0, 0))

        # 6. joint training ----------------------------------------------------------------------
        joint_epochs = train_cfg.joint_epochs if loss_config.cluster_kl else 0
        start_labels = None
        if train_cfg.head_warmup_target == "start" and position.epoch < train_cfg.head_warmup_epochs:
            # step 5's partition; a resumed run reads it back from the file step 5 wrote
            accelerator.wait_for_everyone()  # the main process wrote it
            partition = np.loadtxt(run.dir / "initial_assignments.txt", dtype=np.int64)
            start_labels = torch.from_numpy(partition).to(accelerator.device)
        if full_batch:
            x_all = images.to(accelerator.device)
            own_ids = share_ids.to(accelerator.device)  # this rank's loss nodes
            joint_steps = 1
        else:
            joint_steps = steps_per_epoch(part_manifest, train_cfg.partitions_per_batch, world)
            # The data's cluster marginal, estimated over the steps (see marginal_balance_kl):
            # starts uniform, saved with the checkpoints so that a resumed run continues it.
            marginal = torch.tensor(extra.get("running_marginal") or [1.0 / n_clusters] * n_clusters,
                                    device=accelerator.device)
        task = progress.add_task("joint", total=joint_epochs, completed=position.epoch, status="")
        last_parts = {}
        for epoch in range(position.epoch, joint_epochs):
            epoch_start = time.time()
            warm_up = epoch < train_cfg.head_warmup_epochs
            phase = "head" if warm_up else "joint"
            skip = position.step if epoch == position.epoch else 0
            if full_batch:
                batches = iter([(None, None, None)])
            else:
                batches = stream_subgraphs(part_dir, train_cfg.partitions_per_batch, config.seed, epoch,
                                           rank, world, manifest=part_manifest)
            _set_learning_rates(optimizer, 0.0 if warm_up else train_cfg.joint_lr, train_cfg.head_lr)
            for step in range(joint_steps):
                ids, x, _ = next(batches)
                if step < skip:
                    continue
                if full_batch:
                    x, graph, loss_index = x_all, adjacency, own_ids
                else:
                    x, graph, loss_index = x.to(accelerator.device), induced_adjacency(sym_adjacency, ids), None
                    graph = graph.to(accelerator.device)
                pool = loss_index if loss_index is not None else torch.arange(len(x), device=accelerator.device)
                aux_index = pool[torch.randperm(len(pool))[:train_cfg.joint_aux_batch_size].to(pool.device)]
                kwargs = {"adjacency": graph, "loss_config": loss_config, "loss_index": loss_index}
                if not full_batch:
                    kwargs["running_marginal"] = (marginal, len(x) / n)
                if not warm_up:
                    kwargs["aux_index"] = aux_index
                elif start_labels is not None:  # the loss nodes' clusters in the initial partition
                    kwargs["start_labels"] = start_labels[own_ids if full_batch else ids.to(accelerator.device)]
                terms, y = model(phase, x, **kwargs)
                accelerator.backward(terms.total)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if not full_batch:  # move the estimate by this step's nodes, over all ranks
                    used = accelerator.reduce(torch.cat([y.sum(0), y.new_tensor([len(y)])]), reduction="sum")
                    share = float(used[-1]) / n
                    marginal = (1 - share) * marginal + share * used[:-1] / used[-1]
                    extra["running_marginal"] = marginal.tolist()
                progress.update(task, status=f"step {step + 1}/{joint_steps} {_format(terms.parts)}")
                after_step("joint", epoch, step, joint_steps)
            progress.update(task, advance=1)
            last_parts = {**terms.parts, "peak_memory_mib": round(peak_memory_mib(), 1)}
            # With subgraphs, scoring needs a full-graph inference; the last epoch's is the
            # final one below (so that training's memory peak is measured without it).
            due = (epoch + 1) % train_cfg.eval_every == 0 or epoch + 1 == joint_epochs
            if due and (full_batch or epoch + 1 < joint_epochs):
                if full_batch:  # Y of this step was computed before the update: epoch `epoch`'s model
                    assignments = y.argmax(1).cpu().numpy()
                else:
                    assignments = _assignments(core, chunks, share_ids, adjacency_sp, n, accelerator)
                scores = _score(assignments, label_array)
                rate = n / (time.time() - epoch_start)
                log(f"joint epoch {epoch + 1}/{joint_epochs} {_format(terms.parts)} {_format(scores)} "
                    f"({rate:.0f} samples/s)")
                run.log_metrics({"phase": "joint", "epoch": epoch + 1, **last_parts, **scores})
            if (epoch + 1) % train_cfg.checkpoint_every == 0 and epoch + 1 < joint_epochs:
                checkpoint(Position("joint", epoch + 1, 0))

    # Training's high-water mark, before the full-graph inference (which holds one layer's
    # activations for all N): with the cluster sampler it should not grow with N beyond O(N·k).
    training_peak = peak_memory_mib()

    # 7. final assignments: the last epoch's model, no label-based selection -------------------
    if joint_epochs > 0:
        assignments = _assignments(core, chunks, share_ids, adjacency_sp, n, accelerator)
    else:  # ConvAE + k-means: the k-means assignments of step 5 are the result
        assignments, _ = _initial_clusters(core, chunks, share_ids, adjacency, adjacency_sp, n, config, n_clusters,
                                           accelerator)
    scores = _score(assignments, label_array)
    if joint_epochs > 0 and not full_batch and position.epoch < joint_epochs:
        log(f"joint epoch {joint_epochs}/{joint_epochs} {_format(last_parts)} {_format(scores)}")
        run.log_metrics({"phase": "joint", "epoch": joint_epochs, **last_parts, **scores})
    # DDP / DeepSpeed keep replicas identical; recorded per rank so that tests and users can see it.
    flat = torch.cat([p.detach().float().flatten().cpu() for p in core.parameters()])
    digests = gather_object([hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]])
    result = {
        **scores,
        "dataset": manifest["name"],
        "method": method_name(config),
        "seed": config.seed,
        "n_samples": n,
        "n_clusters": int(n_clusters),
        "n_used_clusters": int(len(np.unique(assignments))),
        "epoch": joint_epochs,
        "selection": "final epoch (no label-based selection)",
        "world_size": world,
        "parameter_sha256_per_rank": digests,
        "seconds": round(time.time() - started, 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "training_peak_memory_mib": round(training_peak, 1),
        "assignments": "assignments.txt",
    }
    checkpoint(Position("joint", joint_epochs, 0), done=True)
    run.export_model("final.pt", core, config, Position("joint", joint_epochs))
    if accelerator.is_main_process:
        atomic_write_text(run.dir / "assignments.txt", "\n".join(map(str, assignments.tolist())) + "\n")
        atomic_write_json(run.dir / "metrics.json", result)
    log(f"final (epoch {joint_epochs}): {_format(scores) or 'no labels: assignments only'} "
                f"in {result['seconds']:.0f}s, peak {result['peak_memory_mib']:.0f} MiB -> {run.dir}")
    accelerator.end_training()
    return result
