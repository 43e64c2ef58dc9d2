"""The SDDECC training loop, start to finish, in one place.

    1. data:     shards (prepared if missing) -> images in memory, streamed minibatches
    2. graph:    kNN graph artifact over raw pixels (built if missing)
    3. pretrain: DDECN = reconstruction + λ1 MI (global, local) + λ2 prior KL, minibatches
    4. centres:  k-means on the pretrained mean codes (smoothed over the graph) -> μ_y
    5. joint:    Eq. 19, full-batch over the graph (the paper's setting, as SDCN)
    6. results:  assignments argmax_j Y_ij of the LAST epoch, metrics, checkpoints

Labels never influence training or selection: they are only read to score the run.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)
from sklearn.cluster import KMeans

from sddecc_dist.config import Config, ConfigError, to_dict
from sddecc_dist.data import load_all, read_manifest, stream_batches
from sddecc_dist.metrics import clustering_scores
from sddecc_dist.model.gcn import smooth
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.stages import ensure_graph, prepare_dataset
from sddecc_dist.utils import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    console,
    peak_memory_mib,
)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


def _format(parts: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in parts.items())


class Run:
    """The run folder: resolved config, metrics.jsonl, checkpoints/, metrics.json, assignments."""

    def __init__(self, output_dir: str | Path, is_main: bool):
        self.dir = Path(output_dir)
        self.checkpoints = self.dir / "checkpoints"
        self.is_main = is_main
        if is_main:
            self.checkpoints.mkdir(parents=True, exist_ok=True)

    def set_aside_previous(self) -> None:
        """A fresh run in a used folder: keep the earlier run's checkpoints in
        `checkpoints.previous/` (so --resume cannot mix the two) and start a new log."""
        if not any(self.checkpoints.iterdir()) and not (self.dir / "metrics.jsonl").exists():
            return
        console.log(f"[yellow]{self.dir} holds an earlier run: starting over, its checkpoints "
                    f"moved to checkpoints.previous/ (use --resume to continue a run instead)")
        previous = self.dir / "checkpoints.previous"
        if previous.exists():
            shutil.rmtree(previous)
        self.checkpoints.rename(previous)
        self.checkpoints.mkdir()
        (self.dir / "metrics.jsonl").unlink(missing_ok=True)

    def log_metrics(self, record: dict) -> None:
        if self.is_main:
            with open(self.dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")

    def save_checkpoint(self, name: str, state: dict) -> None:
        if self.is_main:
            atomic_torch_save(state, self.checkpoints / name)

    def latest_checkpoint(self) -> Path | None:
        """The furthest-along checkpoint: joint progress beats a finished pretraining, which
        beats a pretraining snapshot."""
        for name in ("joint-last.pt", "pretrain.pt", "pretrain-last.pt"):
            if (self.checkpoints / name).exists():
                return self.checkpoints / name
        return None


def _prepare_data(config: Config) -> dict:
    data_dir = Path(config.data_dir)
    if not (data_dir / "dataset.json").exists():
        if config.data.source is None:
            raise ConfigError(
                f"data_dir {data_dir} holds no dataset.json; prepare it with "
                f"`sddecc prepare SOURCE --out {data_dir}` or set data.source in the config"
            )
        prepare_dataset(
            config.data.source, data_dir, from_dir=config.data.from_dir, split=config.data.split,
            size=config.data.size, samples_per_shard=config.data.samples_per_shard,
        )
    return read_manifest(data_dir)


def _score(assignments: np.ndarray, labels: torch.Tensor | None) -> dict:
    return clustering_scores(labels.numpy(), assignments) if labels is not None else {}


def train(config: Config) -> dict:
    started = time.time()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    accelerator = Accelerator()
    set_seed(config.seed)
    run = Run(config.output_dir, accelerator.is_main_process)
    if accelerator.is_main_process:
        if not config.train.resume:
            run.set_aside_previous()
        atomic_write_text(run.dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))

    # 1. data ------------------------------------------------------------------------------
    manifest = _prepare_data(config)
    image_shape = tuple(manifest["image_shape"])
    n_clusters = config.n_clusters or manifest.get("n_classes")
    if not n_clusters:
        raise ConfigError(
            f"{config.data_dir}/dataset.json gives no number of classes: set n_clusters=K"
        )
    images, labels = load_all(config.data_dir, manifest)
    n = len(images)
    console.log(f"{manifest['name']}: {n} samples {image_shape}, {n_clusters} clusters")

    # 2. graph -----------------------------------------------------------------------------
    adjacency = None
    if config.model.use_gcn:
        if config.graph.k >= n:
            raise ConfigError(f"graph.k={config.graph.k} must be smaller than the number of samples ({n})")
        adjacency = ensure_graph(config.data_dir, config.graph.k, images, config.graph.use_gpu)
        adjacency = adjacency.to(accelerator.device)

    model = SDDECC(image_shape, n_clusters, config.model)
    pretrain_optimizer = torch.optim.Adam(model.parameters(), lr=config.train.pretrain_lr)
    model, pretrain_optimizer = accelerator.prepare(model, pretrain_optimizer)
    core = accelerator.unwrap_model(model)
    loss_config = config.loss

    # Resume: restore the furthest checkpoint, then skip what it already covers.
    pretrain_start, joint_start, resumed = 0, 0, None
    if config.train.resume and (path := run.latest_checkpoint()) is not None:
        resumed = torch.load(path, map_location="cpu", weights_only=False)
        core.load_state_dict(resumed["model"])
        torch.set_rng_state(resumed["torch_rng"])
        if resumed["phase"] == "pretrain":
            pretrain_optimizer.load_state_dict(resumed["optimizer"])
            pretrain_start = resumed["epoch"] + 1
        else:
            pretrain_start = config.train.pretrain_epochs
            joint_start = resumed["epoch"] + 1 if resumed["phase"] == "joint" else 0
        console.log(f"resumed from {path} ({resumed['phase']}, epoch {resumed['epoch']})")

    def state(phase: str, epoch: int, optimizer) -> dict:
        return {"phase": phase, "epoch": epoch, "model": core.state_dict(),
                "optimizer": optimizer.state_dict(), "torch_rng": torch.get_rng_state(),
                "config": to_dict(config)}

    # 3. pretrain --------------------------------------------------------------------------
    steps_per_epoch = math.ceil(n / config.train.pretrain_batch_size)
    with _progress() as progress:
        task = progress.add_task("pretrain", total=config.train.pretrain_epochs, completed=pretrain_start, status="")
        for epoch in range(pretrain_start, config.train.pretrain_epochs):
            epoch_start, sums, seen = time.time(), {}, 0
            batches = stream_batches(
                config.data_dir, config.train.pretrain_batch_size, config.data.shuffle_buffer,
                seed=config.seed * 100003 + epoch, manifest=manifest,
            )
            for step, (_, x, _) in enumerate(batches):
                x = x.to(accelerator.device)
                # Through the (possibly DDP-wrapped) module's forward, so gradients synchronise.
                terms = model("pretrain", x, loss_config=loss_config)
                pretrain_optimizer.zero_grad(set_to_none=True)
                accelerator.backward(terms.total)
                pretrain_optimizer.step()
                seen += len(x)
                for k, v in terms.parts.items():
                    sums[k] = sums.get(k, 0.0) + v * len(x)
                progress.update(task, status=f"step {step + 1}/{steps_per_epoch} "
                                f"{seen / (time.time() - epoch_start):.0f} samples/s")
            means = {k: v / seen for k, v in sums.items()}
            progress.update(task, advance=1)
            console.log(f"pretrain epoch {epoch + 1}/{config.train.pretrain_epochs} {_format(means)} "
                        f"({seen / (time.time() - epoch_start):.0f} samples/s)")
            run.log_metrics({"phase": "pretrain", "epoch": epoch + 1, **means})
            if (epoch + 1) % config.train.checkpoint_every == 0:
                run.save_checkpoint("pretrain-last.pt", state("pretrain", epoch, pretrain_optimizer))
    if pretrain_start < config.train.pretrain_epochs or resumed is None:
        run.save_checkpoint("pretrain.pt", state("pretrain-done", config.train.pretrain_epochs - 1, pretrain_optimizer))

    # 4. centres from k-means on the pretrained codes ----------------------------------------
    if joint_start == 0:
        codes = core.mean_codes(images, accelerator.device)
        smoothing = config.train.center_init_smoothing if adjacency is not None else 0
        if smoothing:
            codes = smooth(adjacency, codes.to(accelerator.device), smoothing).cpu()
        codes = codes.numpy()
        kmeans = KMeans(n_clusters, n_init=config.train.kmeans_n_init, random_state=config.seed).fit(codes)
        with torch.no_grad():
            core.centers.copy_(torch.from_numpy(kmeans.cluster_centers_).float())
        kmeans_scores = _score(kmeans.labels_, labels)
        console.log(f"k-means on pretrained codes (graph-smoothed {smoothing}x): {_format(kmeans_scores)}")
        run.log_metrics({"phase": "kmeans", "epoch": config.train.pretrain_epochs, **kmeans_scores})
        kmeans_assignments = kmeans.labels_

    # 5. joint training, full batch over the graph -------------------------------------------
    joint_epochs = config.train.joint_epochs if loss_config.cluster_kl else 0
    head_ids = {id(p) for p in core.head_parameters()}
    joint_optimizer = accelerator.prepare_optimizer(torch.optim.Adam([
        {"params": core.head_parameters(), "lr": config.train.head_lr},
        {"params": [p for p in core.parameters() if id(p) not in head_ids], "lr": config.train.joint_lr},
    ]))
    if resumed is not None and resumed["phase"] == "joint":
        joint_optimizer.load_state_dict(resumed["optimizer"])
    x_all = images.to(accelerator.device)
    aux_size = min(config.train.joint_aux_batch_size, n)
    with _progress() as progress:
        task = progress.add_task("joint", total=joint_epochs, completed=joint_start, status="")
        for epoch in range(joint_start, joint_epochs):
            epoch_start = time.time()
            if epoch < config.train.head_warmup_epochs:
                terms, y = model("head", x_all, adjacency=adjacency, loss_config=loss_config)
            else:
                aux_index = torch.randperm(n)[:aux_size].to(accelerator.device)
                terms, y = model("joint", x_all, adjacency=adjacency, aux_index=aux_index,
                                 loss_config=loss_config)
            joint_optimizer.zero_grad(set_to_none=True)
            accelerator.backward(terms.total)
            joint_optimizer.step()
            rate = n / (time.time() - epoch_start)
            progress.update(task, advance=1, status=f"{_format(terms.parts)} {rate:.0f} samples/s")
            if (epoch + 1) % config.train.eval_every == 0 or epoch + 1 == joint_epochs:
                # Y of this step was computed before the update: it scores epoch `epoch`'s model.
                scores = _score(y.argmax(1).cpu().numpy(), labels)
                console.log(f"joint epoch {epoch + 1}/{joint_epochs} {_format(terms.parts)} {_format(scores)}")
                run.log_metrics({"phase": "joint", "epoch": epoch + 1, **terms.parts, **scores})
            if (epoch + 1) % config.train.checkpoint_every == 0:
                run.save_checkpoint("joint-last.pt", state("joint", epoch, joint_optimizer))

    # 6. final assignments: the last epoch's model, no label-based selection -------------------
    if joint_epochs > 0:
        core.eval()
        with torch.no_grad():
            encoded = core.encode(x_all)
            y = core.cluster_probabilities(x_all, encoded, adjacency)
        core.train()
        assignments = y.argmax(1).cpu().numpy()
    else:
        assignments = kmeans_assignments
    scores = _score(assignments, labels)
    result = {
        **scores,
        "n_samples": n,
        "n_clusters": int(n_clusters),
        "n_used_clusters": int(len(np.unique(assignments))),
        "epoch": joint_epochs,
        "selection": "final epoch (no label-based selection)",
        "seconds": round(time.time() - started, 2),
        "peak_memory_mib": round(peak_memory_mib(), 1),
        "assignments": "assignments.txt",
    }
    if accelerator.is_main_process:
        run.save_checkpoint("final.pt", state("final", joint_epochs, joint_optimizer))
        atomic_write_text(run.dir / "assignments.txt", "\n".join(map(str, assignments.tolist())) + "\n")
        atomic_write_json(run.dir / "metrics.json", result)
    console.log(f"final (epoch {joint_epochs}): {_format(scores) or 'no labels: assignments only'} "
                f"in {result['seconds']:.0f}s, peak {result['peak_memory_mib']:.0f} MiB -> {run.dir}")
    return result
