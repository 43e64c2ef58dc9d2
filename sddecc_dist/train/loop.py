"""The SDDECC training loop, start to finish, in one place.

    1. data:     shards (prepared if missing); each rank streams its own share. Then the run
                 folder is locked for this run, or refused if it holds another (never overwritten)
    2. graph:    the joint sampler builds what it needs (kNN graph, for Cluster-GCN partitions)
    3. pretrain: DDECN = reconstruction + λ1 MI (global, local) + λ2 prior KL, minibatches
    4. start:    k-means, Ward or UMAP + GMM on the pretrained mean codes -> μ_y
       self-label (optional): the encoder and a classifier learn the start's clusters from
                 augmented images; the classifier's partition replaces the start
    5. joint:    Eq. 19 on the sampler's graph batches (whole graph, or Cluster-GCN subgraphs)
    6. results:  assignments argmax_j Y_ij of the LAST epoch (layer-wise full-graph inference),
                 metrics, checkpoints

One process or many: Accelerate (DDP, or DeepSpeed from the launch config) synchronises the
gradients; the model and the data layer know nothing of ranks (train/distributed.py does).
Labels never influence training or selection: they are only read to score the run.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast, broadcast_object_list, gather_object, set_seed
from rich.progress import Progress

from sddecc_dist.config import Config, ConfigError, method_name
from sddecc_dist.data import load_all, read_manifest, sample_keys
from sddecc_dist.eval.health import cluster_health, degenerate_warnings, silhouette_ids
from sddecc_dist.eval.metrics import clustering_scores
from sddecc_dist.model.initial_partition import keep_start_clusters
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.pipeline import prepare_dataset
from sddecc_dist.run_folder import RunFolder, RunFolderError, RunLock, read_model_file
from sddecc_dist.train import inference
from sddecc_dist.train.checkpoint import Checkpointer, Position, TrainerState
from sddecc_dist.train.distributed import (
    StopSignal,
    log,
    make_accelerator,
    progress_bars,
    reset_optimizer_moments,
    set_deepspeed_micro_batch,
    stopped_on_signal,
    sum_over_ranks,
    sync_master_weights,
)
from sddecc_dist.train.inference import NodeShare
from sddecc_dist.train.predict import save_predict_state
from sddecc_dist.train.samplers import JointSampler, PretrainBatches, build_joint_sampler, check_graph_k
from sddecc_dist.utils import peak_memory_mib


@dataclass
class Training:
    """What one training run composes; the phase functions below take it."""

    config: Config
    accelerator: Accelerator
    run: RunFolder
    checkpointer: Checkpointer
    state: TrainerState
    model: torch.nn.Module  # wrapped for DDP / DeepSpeed: the forward that synchronises gradients
    core: SDDECC  # the same model, unwrapped
    optimizer: torch.optim.Optimizer
    sampler: JointSampler
    share: NodeShare  # this rank's nodes, for the start and inference
    labels: np.ndarray | None  # only to score
    n: int
    n_clusters: int
    pretrain: PretrainBatches
    progress: Progress
    stop: StopSignal
    # wall seconds of each stage this process ran (a resumed run: only what it ran), for metrics.json
    stage_seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str):
        began = time.time()
        try:
            yield
        finally:
            self.stage_seconds[name] = round(self.stage_seconds.get(name, 0.0) + time.time() - began, 2)

    def checkpoint(self, at: Position) -> None:
        self.state.position = at
        self.checkpointer.save(self.state)

    def after_step(self, at: Position, steps_in_epoch: int) -> None:
        """Called after every optimiser step; on a signal, saves the position of the next one."""
        signum = self.stop.agreed(self.accelerator)
        if signum:
            following = at.next(steps_in_epoch)
            self.checkpoint(following)
            log(f"[yellow]signal {signum}: saved {self.run.checkpoint_dir(following.name)}; stopping with exit "
                f"status {128 + signum} (continue it with --resume, train.resume=true)")
            raise stopped_on_signal(signum, self.accelerator)

    def score(self, assignments: np.ndarray) -> dict:
        return clustering_scores(self.labels, assignments) if self.labels is not None else {}

    def health(self, assignments: np.ndarray, start: np.ndarray | None) -> dict:
        """Label-free figures of an assignment (eval/health.py), on every rank alike."""
        # Only the silhouette's sample is encoded: 2000 images, not N, at every logged epoch.
        ids = silhouette_ids(self.n, seed=self.config.seed)
        codes = inference.mean_codes(self.core, self.share, self.n, self.accelerator, ids=ids).numpy()
        return cluster_health(assignments, self.n_clusters, start=start, codes=codes, code_ids=ids,
                              seed=self.config.seed)

    def log_metrics(self, record: dict) -> None:
        if self.accelerator.is_main_process:
            self.run.append_metrics(record)


def logged_before(position: Position, record: dict) -> bool:
    """Whether a metrics.jsonl record was logged before the checkpoint at `position` was saved:
    each phase logs its line, then saves its checkpoint (pretraining epoch e: line "epoch": e,
    then Position("pretrain", e); the start and self-labelling lines, then Position("joint", 0);
    joint epoch e: line "epoch": e, then Position("joint", e))."""
    order = {"pretrain": 0, "kmeans": 1, "self_label": 1, "joint": 2}
    if record.get("phase") not in order:
        return True  # no line of this loop's: kept as it is
    at = (order[position.phase], position.epoch)
    if order[record["phase"]] == 1:
        return at[0] == 2
    return (order[record["phase"]], record.get("epoch", 0)) <= at


def train(config: Config) -> dict:
    started = time.time()
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    accelerator = make_accelerator(config)
    set_seed(config.seed)  # the same on every rank: same initial weights, same k-means
    run = RunFolder(config.output_dir)

    # 1. data, checked (and prepared when missing) before the run folder is touched -----------------
    manifest = _prepare_data(config, accelerator)
    n = manifest["count"]
    n_clusters = config.n_clusters or manifest.get("n_classes")
    if not n_clusters:
        raise ConfigError(f"{config.data_dir}/dataset.json gives no number of classes: set n_clusters=K")
    if n_clusters > n:
        raise ConfigError(f"n_clusters={n_clusters} is more than the {n} samples of {config.data_dir}")
    if config.model.use_gcn:
        check_graph_k(config, n)
    micro_batch = micro_batch_size(config, accelerator.num_processes, n)

    # the run folder: locked for this run, or refused before anything is written to it
    lock = _take_run_folder(run, config, accelerator)
    try:
        return _train(config, accelerator, run, manifest, n_clusters, micro_batch, started)
    finally:
        if lock is not None:
            lock.release()


def _train(config: Config, accelerator: Accelerator, run: RunFolder, manifest: dict, n_clusters: int,
           micro_batch: int, started: float) -> dict:
    rank, world, n = accelerator.process_index, accelerator.num_processes, manifest["count"]

    # 2. the joint sampler and the graph it needs -------------------------------------------------
    with accelerator.main_process_first():  # rank 0 builds missing artifacts, the others then read them
        sampler = build_joint_sampler(config, manifest, accelerator)
    log(f"{manifest['name']}: {n} samples {tuple(manifest['image_shape'])}, {n_clusters} clusters, "
        f"{world} process(es) on {accelerator.device}, joint sampler {config.train.joint_sampler}")
    share = sampler.node_share()
    labels = inference.gather_labels(share, n, accelerator)

    # 3. model, and one optimiser with two named groups (DeepSpeed takes one per model) --------------
    model = SDDECC(tuple(manifest["image_shape"]), n_clusters, config.model)
    groups = model.parameter_groups()
    # fused: one kernel for all parameters (a small model's step on CPU spent 3 of its 23 ms in
    # the per-tensor Adam ops); the same update, on the devices that have it
    optimizer = torch.optim.Adam([{"name": "ddecn", "params": groups["ddecn"], "lr": config.train.pretrain_lr},
                                  {"name": "head", "params": groups["head"], "lr": 0.0}],
                                 fused=accelerator.device.type in ("cpu", "cuda"))
    set_deepspeed_micro_batch(accelerator, micro_batch)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)
    checkpointer = Checkpointer(run, accelerator, config.train.keep_checkpoints)

    state = TrainerState()
    if config.train.init_from:
        _, pretrained = read_model_file(config.train.init_from)
        core.load_trained(pretrained["model"])
        sync_master_weights(optimizer)
        state.position = Position("joint", 0, 0)
        log(f"pretrained model from {config.train.init_from}: pretraining skipped")
    if config.train.resume:
        restored = checkpointer.restore()
        if restored is not None:
            state = restored
        else:
            log(f"[yellow]no checkpoint in {run.checkpoints}: starting from scratch")
    if state.sampler and state.sampler != sampler.state_dict():
        raise ConfigError(f"the checkpoint in {run.checkpoints} was written with the joint sampler {state.sampler}, "
                          f"this run has {sampler.state_dict()}: resume with the same settings")
    state.sampler = sampler.state_dict()
    if config.train.resume and accelerator.is_main_process:  # the checkpoint was accepted
        run.write_config(config)
        dropped = run.keep_metrics_log(partial(logged_before, state.position))
        if dropped:
            log(f"{run.metrics_log_path}: {dropped} line(s) logged after the checkpoint dropped; they are logged anew")

    with StopSignal() as stop, progress_bars() as progress:
        in_memory = None
        if config.train.pretrain_source == "memory":  # the full-graph sampler holds them already
            in_memory = sampler.images_in_memory
            in_memory = load_all(config.data_dir, manifest)[0] if in_memory is None else in_memory
        pretrain = PretrainBatches(config, manifest, micro_batch, rank, world, accelerator.device, in_memory)
        t = Training(config, accelerator, run, checkpointer, state, model, core, optimizer, sampler, share, labels,
                     n, n_clusters, pretrain, progress, stop)
        t.stage_seconds["setup"] = round(time.time() - started, 2)  # data, graph, model (imports not counted)
        # 4. pretraining
        if state.position.phase == "pretrain":
            with t.stage("pretrain"):
                _pretrain(t)
        elif config.train.init_from and accelerator.is_main_process:  # keep the stage's artifact in this run
            shutil.copyfile(config.train.init_from, run.model_file("pretrain"))
        # 5. the start: centres (and q(y)) from the initial partition of the pretrained codes, once
        if state.position == Position("joint", 0, 0) and not state.start_ready:
            with t.stage("start"):
                _start(t)
        if (state.position == Position("joint", 0, 0) and config.train.self_label_epochs
                and not state.start_self_labelled):
            with t.stage("self_label"):
                _self_label(t)
        # 6. joint training (its warm-up included)
        joint_epochs = config.train.joint_epochs if config.loss.cluster_kl else 0
        with t.stage("joint"):
            pending_line = _joint(t, joint_epochs)

    # Training's high-water mark, before the full-graph inference (which holds one layer's
    # activations for all N): with the cluster sampler it should not grow with N beyond O(N·k).
    training_peak = peak_memory_mib()
    return _finish(t, joint_epochs, pending_line, started, training_peak, manifest)


def _pretrain(t: Training) -> None:
    """DDECN on minibatches: Eq. 12 + 13 (reconstruction, λ1 · MI, λ2 · prior KL)."""
    cfg, at, batches = t.config.train, t.state.position, t.pretrain
    task = t.progress.add_task("pretrain", total=batches.epochs, completed=at.epoch, status="")
    for epoch in range(at.epoch, batches.epochs):
        epoch_start, sums, seen = time.time(), {}, 0
        for step, _, x, target in batches.epoch(epoch, at.step if epoch == at.epoch else 0):
            # From the position alone, so that a resumed run continues the warm-up.
            done = (epoch * batches.steps_per_epoch + step) // cfg.gradient_accumulation_steps
            lr = warmed_up_lr(cfg.pretrain_lr, done, cfg.pretrain_lr_warmup_steps)
            _set_learning_rates(t.optimizer, ddecn=lr, head=0.0)
            _minibatch_step(t, sums, "pretrain", x, target=target)
            seen += len(x)
            rate = seen * t.accelerator.num_processes / (time.time() - epoch_start)
            t.progress.update(task, status=f"step {step + 1} {rate:.0f} samples/s")
            t.after_step(Position("pretrain", epoch, step), batches.steps_per_epoch)
        means = {k: v / max(seen, 1) for k, v in sums.items()}
        t.progress.update(task, advance=1)
        seconds = time.time() - epoch_start
        rate = seen * t.accelerator.num_processes / seconds
        log(f"pretrain epoch {epoch + 1}/{batches.epochs} {_format(means)} ({rate:.0f} samples/s)")
        # seconds and steps: the epoch's wall time as the trainer spent it (scripts/bench.py
        # sets it beside a bare loop's); a resumed epoch counts only the steps it ran
        steps_run = batches.steps_per_epoch - (at.step if epoch == at.epoch else 0)
        t.log_metrics({"phase": "pretrain", "epoch": epoch + 1, **means, "seconds": round(seconds, 4),
                       "steps": steps_run, "peak_memory_mib": round(peak_memory_mib(), 1)})
        if (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < batches.epochs:
            t.checkpoint(Position("pretrain", epoch + 1, 0))
    if t.accelerator.is_main_process:
        t.run.write_model_file("pretrain", t.core, t.config, "pretrain", batches.epochs)
    t.state.position = Position("joint", 0, 0)


def _minibatch_step(t: Training, sums: dict[str, float], phase: str, x: torch.Tensor, **kwargs) -> None:
    """One (micro-)batch of a minibatch phase through the wrapped forward, so that DDP and
    DeepSpeed synchronise the gradients; its loss terms, weighted by its size, join `sums`."""
    with t.accelerator.accumulate(t.model):
        terms = t.model(phase, x, loss_config=t.config.loss, **kwargs)
        t.accelerator.backward(terms.total)
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
    for k, v in terms.parts.items():
        sums[k] = sums.get(k, 0.0) + v * len(x)


def _start(t: Training) -> None:
    """The initial partition of the pretrained codes: its cluster means become the centres μ_y,
    its sizes q(y) with loss.cluster_prior=init; saved with a checkpoint right away."""
    cfg, device = t.config.train, t.accelerator.device
    labels, centres = inference.start_partition(t.core, t.share, t.sampler.adjacency, t.sampler.adjacency_sp, t.n,
                                                t.config, t.n_clusters, t.accelerator)
    with torch.no_grad():
        t.core.centers.copy_(broadcast(torch.from_numpy(centres).float().to(device)))
        if t.config.loss.cluster_prior == "init":  # q(y): the partition's proportions
            proportions = np.bincount(labels, minlength=t.n_clusters) / len(labels)
            t.core.cluster_prior.copy_(torch.from_numpy(proportions).float().to(device))
    if t.accelerator.is_main_process:
        t.run.write_initial_assignments(labels)
    sync_master_weights(t.optimizer)
    reset_optimizer_moments(t.optimizer)  # the pretraining moments would mis-scale the joint phase's first steps
    t.state.start_ready, t.state.start_scores = True, t.score(labels)
    smoothing = cfg.center_init_smoothing if t.sampler.adjacency is not None else 0
    health = t.health(labels, None)
    how = f", the consensus of {cfg.start_candidates} fits" if cfg.center_init == "umap_gmm" and \
        cfg.start_candidates > 1 else ""
    if cfg.center_init == "umap_gmm" and cfg.start_min_share > 0:
        how += f", clusters under {cfg.start_min_share} of N/K split away"
    log(f"{cfg.center_init} on pretrained codes (graph-smoothed {smoothing}x{how}): "
        f"{_format(t.state.start_scores)} "
        f"{_format(health)}")
    t.log_metrics({"phase": "kmeans", "epoch": t.pretrain.epochs, **t.state.start_scores, **health,
                   "peak_memory_mib": round(peak_memory_mib(), 1)})
    t.checkpoint(Position("joint", 0, 0))


def _self_label(t: Training) -> None:
    """The encoder and the self-labelling classifier learn the start's clusters from augmented
    batches (with the pretraining objective beside, so the codes stay decodable); the classifier's
    partition then replaces the start: centres μ_y (its clusters' mean codes), q(y), and the
    joint phase's start term. A network that must name a sample's cluster from a shifted,
    rotated copy of it corrects many of the start's mistakes (docs/method.md).

    No checkpoint of its own: it is minutes long, and a run stopped in it resumes from the
    start's checkpoint and repeats it."""
    cfg, device, batches = t.config.train, t.accelerator.device, t.pretrain
    t.accelerator.wait_for_everyone()  # the main process wrote the start
    start = torch.from_numpy(t.run.read_initial_assignments()).to(device)
    epochs = batches.epochs_for(cfg.self_label_epochs, cfg.self_label_steps)
    _set_learning_rates(t.optimizer, ddecn=cfg.self_label_lr, head=0.0)
    task = t.progress.add_task("self-label", total=epochs, status="")
    for epoch in range(epochs):
        epoch_start, sums, seen = time.time(), {}, 0
        # epochs numbered after pretraining's: other batch orders than its epochs had
        for step, ids, x, target in batches.epoch(batches.epochs + epoch):
            _minibatch_step(t, sums, "self_label", x, labels=start[ids.to(device)], target=target)
            seen += len(x)
            t.progress.update(task, status=f"step {step + 1}/{batches.steps_per_epoch}")
            signum = t.stop.agreed(t.accelerator)
            if signum:
                log(f"[yellow]signal {signum} in the self-labelling stage: stopping with exit status "
                    f"{128 + signum}; a resumed run repeats the stage from the start's checkpoint")
                raise stopped_on_signal(signum, t.accelerator)
        t.progress.update(task, advance=1)
        means = {k: v / max(seen, 1) for k, v in sums.items()}
        rate = seen * t.accelerator.num_processes / (time.time() - epoch_start)
        log(f"self-label epoch {epoch + 1}/{epochs} {_format(means)} ({rate:.0f} samples/s)")

    labels, codes, _ = inference.self_label_assignments(t.core, t.share, t.n, t.accelerator)
    labels = keep_start_clusters(labels, start.cpu().numpy())
    counts = np.bincount(labels, minlength=t.n_clusters)
    with torch.no_grad():
        for cluster in np.flatnonzero(counts):  # a cluster the start left empty too keeps its centre
            t.core.centers[cluster] = torch.from_numpy(codes[labels == cluster].mean(0)).to(device)
        if t.config.loss.cluster_prior == "init":  # q(y): the new partition's proportions, none zero
            proportions = np.maximum(counts, 1) / np.maximum(counts, 1).sum()
            t.core.cluster_prior.copy_(torch.from_numpy(proportions).float().to(device))
    if t.accelerator.is_main_process:
        t.run.write_self_label_assignments(labels)
    sync_master_weights(t.optimizer)
    reset_optimizer_moments(t.optimizer)
    t.state.start_self_labelled = True
    scores, health = t.score(labels), t.health(labels, start.cpu().numpy())
    log(f"self-labelled start ({epochs} epochs): {_format(scores)} {_format(health)}")
    t.log_metrics({"phase": "self_label", "epoch": epochs, **scores, **health,
                   "peak_memory_mib": round(peak_memory_mib(), 1)})
    t.checkpoint(Position("joint", 0, 0))


def _joint_start(t: Training) -> np.ndarray:
    """The partition the joint phase refines: the self-labelled one when that stage ran, else
    the start's (each read back from its file, so that a resumed run has it)."""
    t.accelerator.wait_for_everyone()  # the main process wrote it
    if t.state.start_self_labelled:
        return t.run.read_self_label_assignments()
    return t.run.read_initial_assignments()


def _joint(t: Training, joint_epochs: int) -> dict | None:
    """Eq. 19 on the sampler's batches; the first head_warmup_epochs train only the GCN. Returns
    the last epoch's loss terms when its metric line waits for the final inference."""
    cfg, loss_config, device = t.config.train, t.config.loss, t.accelerator.device
    at = t.state.position
    start = _joint_start(t) if joint_epochs > 0 else None
    start_labels = torch.from_numpy(start).to(device) if start is not None else None
    if start is not None and cfg.joint_graph == "within_start" and t.sampler.sym_adjacency is not None:
        # from the start's file, so a resumed run cuts the same graph
        kept = t.sampler.keep_edges_within(start)
        log(f"joint graph: the kNN edges inside the start's clusters, {kept:.1%} of them")
    # The data's cluster marginal, estimated over the steps (see losses.marginal_balance_kl):
    # starts uniform, saved with the checkpoints so that a resumed run continues it.
    marginal = torch.tensor(t.state.cluster_marginal or [1.0 / t.n_clusters] * t.n_clusters, device=device)
    steps_in_epoch = t.sampler.steps_per_epoch
    # The whole graph's encoder output while the encoder is frozen (the warm-up, full-graph
    # batches): one forward for the warm-up instead of one per step. Same values, as the
    # encoder's weights do not change and it has no dropout or batch statistics.
    frozen_encoding = None
    # With joint_encoder_nodes on the whole graph: the other nodes' no-grad codes, encoded again
    # every joint_encoding_refresh steps (and after a resume), read in between.
    background, background_age = None, 0
    task = t.progress.add_task("joint", total=joint_epochs, completed=at.epoch, status="")
    pending_line = None
    since, since_epoch = time.time(), at.epoch  # the wall time of the epochs between two metric lines
    for epoch in range(at.epoch, joint_epochs):
        ended = t.state.head_warmup_ended
        if ended is not None and ended <= epoch < cfg.head_warmup_epochs:  # the warm-up ended early
            t.progress.update(task, advance=1)
            since_epoch += 1  # not counted in the next line's epoch_seconds
            continue
        epoch_start = time.time()
        warm_up = epoch < cfg.head_warmup_epochs
        learns_start = warm_up and cfg.head_warmup_target == "start"
        agreed = torch.zeros(2, device=device)  # the warm-up's nodes whose Y agrees with the start, of all scored
        _set_learning_rates(t.optimizer, ddecn=0.0 if warm_up else cfg.joint_lr, head=cfg.head_lr)
        for step, batch in t.sampler.epoch(epoch, at.step if epoch == at.epoch else 0):
            # Reconstruction and MI on a random subset of the scored nodes (an unbiased estimate).
            pool = batch.scored if batch.scored is not None else torch.arange(len(batch.ids), device=device)
            aux_index = pool[torch.randperm(len(pool))[:cfg.joint_aux_batch_size].to(pool.device)]
            kwargs = {"adjacency": batch.adjacency, "loss_config": loss_config, "loss_index": batch.scored,
                      "running_marginal": (marginal, batch.share)}
            if not warm_up:
                kwargs["aux_index"] = aux_index
                if 0 < cfg.joint_encoder_nodes < len(batch.ids):
                    # The encoder's gradient from a random subset of the nodes (model.spliced_encoding);
                    # reconstruction and MI on the first of them (positions in the subset).
                    kwargs["encoder_index"] = torch.randperm(len(batch.ids))[:cfg.joint_encoder_nodes].to(device)
                    kwargs["aux_index"] = torch.arange(min(cfg.joint_aux_batch_size, cfg.joint_encoder_nodes),
                                                       device=device)
                    if cfg.joint_encoding_refresh > 1 and len(batch.ids) == t.n:  # the same nodes every step
                        if background is None and frozen_encoding is not None:
                            # the warm-up's pass is current: the encoder has not moved since
                            background, background_age = frozen_encoding, 0
                        if background is None or background_age >= cfg.joint_encoding_refresh:
                            background, background_age = t.core.graph_encoding(batch.images), 0
                        kwargs["background"], background_age = background, background_age + 1
            # The scored nodes' clusters in the start: the warm-up's target (head_warmup_target=start),
            # the joint phase's start term.
            if not warm_up or cfg.head_warmup_target == "start":
                kwargs["start_labels"] = start_labels[batch.scored_ids.to(device)]
            if warm_up and len(batch.ids) == t.n:
                if frozen_encoding is None:  # what the GCN reads of it (pooled maps: 1/50 of the memory)
                    frozen_encoding = t.core.graph_encoding(batch.images)
                kwargs["encoded"] = frozen_encoding
            else:
                frozen_encoding = None  # the encoder trains from here on: let the memory go
            terms, y = t.model("head" if warm_up else "joint", batch.images, **kwargs)
            t.accelerator.backward(terms.total)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            marginal = _update_marginal(marginal, y if batch.scored is None else y[batch.scored], t)
            if learns_start:
                scored_y = y if batch.scored is None else y[batch.scored]
                agreed[0] += (scored_y.argmax(1) == kwargs["start_labels"]).sum()
                agreed[1] += len(scored_y)
            t.state.cluster_marginal = marginal.tolist()
            t.progress.update(task, status=f"step {step + 1}/{steps_in_epoch} {_format(terms.parts)}")
            t.after_step(Position("joint", epoch, step), steps_in_epoch)
        t.progress.update(task, advance=1)
        last_parts = {**terms.parts, "peak_memory_mib": round(peak_memory_mib(), 1)}
        due = (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == joint_epochs
        may_end = cfg.head_warmup_agreement > 0 and epoch + 1 < cfg.head_warmup_epochs
        if learns_start and (due or may_end):
            # the share of the epoch's nodes whose Y named their start cluster: every rank gets
            # the same sums, so all of them end the warm-up together
            counts = sum_over_ranks(t.accelerator, agreed)
            last_parts["start_match"] = round(counts[0].item() / max(counts[1].item(), 1), 6)
            if may_end and counts[0].item() >= cfg.head_warmup_agreement * counts[1].item():
                t.state.head_warmup_ended = epoch + 1
                log(f"warm-up ended after {epoch + 1} of {cfg.head_warmup_epochs} epochs: the GCN names the "
                    f"start's cluster of {last_parts['start_match']:.2%} of the nodes "
                    f"(train.head_warmup_agreement={cfg.head_warmup_agreement:g}); the joint epochs follow")
        # A batch of every node: its Y (computed before this step's update) is epoch `epoch`'s
        # assignment. Otherwise scoring needs a full-graph inference; the last epoch's is the
        # final one (so that training's memory peak is measured without it).
        whole_graph = len(batch.ids) == t.n
        if due and (whole_graph or epoch + 1 < joint_epochs):
            if whole_graph:
                assignments = np.empty(t.n, dtype=np.int64)
                assignments[batch.ids.numpy()] = y.argmax(1).cpu().numpy()
            else:
                assignments = inference.assignments(t.core, t.share, t.sampler.adjacency_sp, t.n, t.accelerator)
            scores, health = t.score(assignments), t.health(assignments, start)
            log(f"joint epoch {epoch + 1}/{joint_epochs} {_format(terms.parts)} {_format(scores)} "
                f"{_format(health)} ({t.n / (time.time() - epoch_start):.0f} samples/s)")
            # epoch_seconds: the mean wall time of the epochs since the last line, this scoring included
            epoch_seconds = round((time.time() - since) / (epoch + 1 - since_epoch), 4)
            since, since_epoch = time.time(), epoch + 1
            t.log_metrics({"phase": "joint", "epoch": epoch + 1, **last_parts, **scores, **health,
                           "epoch_seconds": epoch_seconds})
        pending_line = last_parts if due and not whole_graph and epoch + 1 == joint_epochs else None
        if (epoch + 1) % cfg.checkpoint_every == 0 and epoch + 1 < joint_epochs:
            t.checkpoint(Position("joint", epoch + 1, 0))
    return pending_line


def _finish(t: Training, joint_epochs: int, pending_line: dict | None, started: float, training_peak: float,
            manifest: dict) -> dict:
    """The final assignments (the last epoch's model, no label-based selection), metrics, the
    final checkpoint and model file."""
    finishing = time.time()
    confidence = None
    if joint_epochs > 0:
        # through files in the run folder, not memory: bounded per rank whatever N (inference.py);
        # each GCN layer's input rows also go to predict/, for `sddecc predict`
        assignments, confidence = inference.final_assignments(
            t.core, t.share, t.sampler.adjacency_sp, t.n, t.accelerator, spool=t.run.inference_spool,
            chunk_size=t.config.train.inference_batch_size, layer_input_files=t.run.predict_layer_inputs_path)
    elif t.state.start_self_labelled:  # no joint phase after the stage: its partition is the result
        assignments = t.run.read_self_label_assignments()
        # the confidence: the stage's classifier's probability of each sample's cluster (the
        # partition is its argmax, but for clusters it emptied, which got their start members back)
        probabilities = inference.self_label_assignments(t.core, t.share, t.n, t.accelerator)[2]
        confidence = probabilities[np.arange(t.n), assignments]
    else:  # ConvAE + k-means: the start's partition is the result, and there is no posterior
        # (a k-means or Ward start): assignments.csv's confidence column stays empty. Read back
        # from the run folder rather than fitted again (a second UMAP + GMM: seconds to minutes).
        t.accelerator.wait_for_everyone()  # the main process wrote it
        assignments = t.run.read_initial_assignments()
    scores = t.score(assignments)
    start = _joint_start(t) if joint_epochs > 0 else None
    health = t.health(assignments, start)
    warnings = degenerate_warnings(health, t.n_clusters)
    if pending_line is not None:
        log(f"joint epoch {joint_epochs}/{joint_epochs} {_format(pending_line)} {_format(scores)} {_format(health)}")
        t.log_metrics({"phase": "joint", "epoch": joint_epochs, **pending_line, **scores, **health})
    # DDP / DeepSpeed keep replicas identical; recorded per rank so that tests and users can see it.
    flat = torch.cat([p.detach().float().flatten().cpu() for p in t.core.parameters()])
    peak = round(peak_memory_mib(), 1)
    digests = gather_object([hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]])
    result = {
        **scores,
        "dataset": manifest["name"],
        "method": method_name(t.config),
        "seed": t.config.seed,
        "n_samples": t.n,
        "n_clusters": int(t.n_clusters),
        "n_used_clusters": int(len(np.unique(assignments))),
        "health": health,
        "warnings": warnings,
        "epoch": joint_epochs,
        "selection": "final epoch (no label-based selection)",
        "world_size": t.accelerator.num_processes,
        "parameter_sha256_per_rank": digests,
        "seconds": round(time.time() - started, 2),
        "peak_memory_mib": peak,
        "peak_rss_mib": peak,  # issue 18's name for the same figure; peak_memory_mib kept for older readers
        "training_peak_memory_mib": round(training_peak, 1),
        "stage_seconds": t.stage_seconds,  # "finish" (inference, result files) added below
        "assignments": RunFolder.ASSIGNMENTS,
    }
    if t.accelerator.device.type == "cuda":  # the GPU's own peak, beside the host's RSS
        result["gpu_peak_memory_mib"] = round(torch.cuda.max_memory_allocated(t.accelerator.device) / 2**20, 1)
    t.state.done = True
    t.checkpoint(Position("joint", joint_epochs, 0))
    if t.accelerator.is_main_process:
        t.run.write_model_file("final", t.core, t.config, "joint", joint_epochs)
        t.run.write_assignments(assignments)
        t.run.write_assignments_csv(sample_keys(t.config.data_dir, manifest), assignments, confidence)
        if joint_epochs > 0 and t.core.use_gcn:  # what `sddecc predict` needs: a joint phase with the GCN
            cut_along = start if t.config.train.joint_graph == "within_start" else None
            save_predict_state(t.run, t.config, manifest, t.core.gcn.n_layers, t.sampler.adjacency_sp, cut_along,
                               assignments, confidence, images=t.sampler.images_in_memory)
        t.stage_seconds["finish"] = round(time.time() - finishing, 2)
        t.run.write_metrics(result)
    log(f"final (epoch {joint_epochs}): {_format(scores) or 'no labels: assignments only'} {_format(health)} "
        f"in {result['seconds']:.0f}s, peak {result['peak_memory_mib']:.0f} MiB -> {t.run.path}")
    for warning in warnings:
        log(f"[bold yellow]warning: degenerate result: {warning} ({RunFolder.METRICS} 'warnings'); do not trust "
            f"these clusters without a look")
    t.accelerator.end_training()
    return result


# ---- small helpers -----------------------------------------------------------------------------

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


def micro_batch_size(config: Config, world: int, n: int) -> int:
    """Samples per micro-batch of each process in the minibatch phases (scripts/bench.py uses it too)."""
    train = config.train
    split = world * train.gradient_accumulation_steps
    batch = train.pretrain_batch_size
    if batch == "auto":  # N/16 within [32, 256], a multiple of the split
        batch = max(2 * split, min(256, max(32, n // 16)) // split * split)
    micro_batch, rest = divmod(batch, split)
    if rest or micro_batch < 2:
        raise ConfigError(
            f"train.pretrain_batch_size={batch} is the global batch: it must be "
            f"a multiple of processes ({world}) x gradient_accumulation_steps "
            f"({train.gradient_accumulation_steps}) with at least 2 samples per micro-batch"
        )
    return micro_batch


def _take_run_folder(run: RunFolder, config: Config, accelerator: Accelerator) -> RunLock | None:
    """Lock the run folder for this run and write a new run's config, or refuse on every rank
    before anything is written there. A folder that holds a run is continued (train.resume), moved
    whole into previous/TIME/ (train.new_version), or refused: no run replaces another's files.
    Returns the lock on the main process (None on the others)."""
    lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            lock, took_over = RunLock.acquire(run)
            if took_over:
                log(f"[yellow]{run.path}: {took_over}")
            # any checkpoint folder: the checkpointer decides what it holds (an older format is refused there)
            resumable = bool(run.checkpoint_dirs())
            if run.holds_run() and not (config.train.resume and resumable):
                if not (config.train.new_version or config.train.resume):
                    held = ", ".join(p.name for p in run.run_entries())
                    raise RunFolderError(
                        f"{run.path} holds a run ({held}): continue it with --resume (train.resume=true), move it "
                        f"into {run.previous}/TIME/ and start anew with --new-version (train.new_version=true), "
                        f"or choose another output_dir")
                moved = run.move_to_previous()
                why = "no checkpoint to resume" if config.train.resume else "train.new_version"
                log(f"[yellow]{run.path}: its earlier run moved to {moved} ({why}); starting anew")
            run.checkpoints.mkdir(exist_ok=True)
            if not (config.train.resume and resumable):  # a resumed run's, once its checkpoint is accepted
                run.write_config(config)
        except (RunFolderError, OSError) as error:
            refusal = str(error) if isinstance(error, RunFolderError) else f"{run.path} cannot be written: {error}"
            if lock is not None:
                lock.release()
                lock = None
    refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise RunFolderError(refusal)
    return lock


def warmed_up_lr(lr: float, optimiser_step: int, warmup_steps: int) -> float:
    """The learning rate of optimiser step `optimiser_step` (0-based) under a linear warm-up
    over `warmup_steps` steps: lr/W, 2 lr/W, ..., then lr."""
    return lr * min(1.0, (optimiser_step + 1) / warmup_steps) if warmup_steps else lr


def _set_learning_rates(optimizer, **rates: float) -> None:
    """The learning rate of each named parameter group in the current phase."""
    for group in optimizer.param_groups:
        group["lr"] = rates[group["name"]]


def _update_marginal(marginal: torch.Tensor, y_scored: torch.Tensor, t: Training) -> torch.Tensor:
    """Move the running estimate of the cluster marginal by this step's nodes, over all ranks,
    each node weighing 1/N."""
    used = sum_over_ranks(t.accelerator, torch.cat([y_scored.sum(0), y_scored.new_tensor([len(y_scored)])]))
    share = float(used[-1]) / t.n
    return (1 - share) * marginal + share * used[:-1] / used[-1]


def _format(parts: dict) -> str:
    return " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in parts.items())

