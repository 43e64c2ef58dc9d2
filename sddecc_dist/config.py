"""Typed run configuration: dataclasses loaded from YAML, with `key=value` overrides.

Every parameter is defined once, here, with its type, default, allowed values (a `Literal`
type, or `min`/`max`) and help text; the YAML loader, the checks and the command-line flags
(`add_arguments`) all read that one definition. Every key a YAML file or an override names
must exist in these dataclasses; a typo is an error that names the key and the file, never a
silently ignored setting.

Fields that depart from the paper's method when not at the paper's value carry `paper` and
`departure` (how the results report names the departure): the report reads them from here.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config file, override or parameter value that cannot be applied."""


_NO_DEFAULT = object()


def param(default: Any = _NO_DEFAULT, *, help: str, factory=None, min: float | None = None,
          max: float | None = None, paper: Any = _NO_DEFAULT, departure: str | None = None,
          joint_only: bool = True):
    """A config field with its help text and checks.

    `min`/`max`: inclusive bounds, checked by `check_fields`. `paper`: the paper's value, with
    `departure` the report's name for any other value ("{}" is replaced by the value);
    `joint_only`: the departure only matters when the run has a joint phase."""
    metadata = {"help": help, "min": min, "max": max}
    if departure is not None:
        metadata.update(paper=paper, departure=departure, joint_only=joint_only)
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ---- the sections ----------------------------------------------------------------------------

@dataclass
class DataConfig:
    source: str | None = param(None, help="what to prepare into data_dir when it holds no shards: dataset "
                                          "name, .npz file or image folder (None: data_dir must exist)")
    from_dir: str | None = param(None, help="read the raw files from this folder instead of downloading")
    split: Literal["all", "train", "test"] = param("all", help="the paper clusters train and test together")
    size: int | None = param(None, min=1, help="resize folder images to SIZE x SIZE")
    samples_per_shard: int = param(10000, min=1, help="samples per webdataset shard")
    shuffle_buffer: int = param(10000, min=0, help="webdataset shuffle buffer for minibatch pretraining")


@dataclass
class IndexParams:
    """How the FAISS kNN index is chosen and tuned: the graph functions take it, a config's
    `graph:` section (GraphConfig) extends it, and `sddecc graph` derives its flags from it."""

    index: Literal["auto", "flat", "pca", "ivf", "pca_ivf", "ivfpq"] = param(
        "auto", help="auto: exact search (flat) up to exact_max_n samples, then IVF-Flat up to ivf_max_n (on "
                     "pca_dim PCA dimensions, pca_ivf, when the features have more than 2 pca_dim), IVF-PQ "
                     "(8-bit codes) above; pca: exact search on pca_dim PCA dimensions. Approximate "
                     "indexes return refine_factor times the candidates, re-ranked by exact distance")
    exact_max_n: int = param(100_000, min=0, help="largest N searched exactly by auto (MNIST-size sets stay exact)")
    ivf_max_n: int = param(10_000_000, min=0, help="largest N searched with IVF-Flat by auto")
    nlist: int = param(0, min=0, help="IVF lists; 0: round(4 sqrt(n)), n the vectors in one index (a rank's share)")
    nprobe: int = param(16, min=1, help="IVF lists searched per query: recall against speed")
    pca_dim: int = param(64, min=1, help="dimensions PCA keeps for the pca and pca_ivf indexes (fewer than the "
                                         "features')")
    refine_factor: int = param(8, min=1, help="candidates per neighbour that pca, pca_ivf and ivfpq re-rank "
                                              "by exact distance")
    pq_m: int = param(0, min=0, help="IVF-PQ bytes per vector, a divisor of the dimension; 0: the largest "
                                    "<= min(64, d/4)")
    train_sample: int = param(0, min=0, help="vectors for IVF/PQ training; 0: min(n, max(64 nlist, 16384))")
    recall_queries: int = param(1000, min=0, help="random queries on which recall@k against exact search "
                                                 "is measured for approximate indexes (0: skip)")
    seed: int = param(0, min=0, help="seeds the training sample and the recall queries")

    def check(self) -> None:
        check_fields(self, "")


@dataclass
class GraphConfig(IndexParams):
    k: int = param(3, min=1, help="neighbours per sample (the paper's k)")
    use_gpu: bool | None = param(None, help="faiss-gpu when true; None: when a GPU is visible, else faiss-cpu")


def resolve_input_view(view: str, channels: int) -> str:
    """`raw` or `sobel`: a model.input_view with `auto` decided by the images' channel count."""
    if view == "auto":
        return "sobel" if channels == 3 else "raw"
    return view


@dataclass
class ModelConfig:
    channels: list[int] = param(factory=lambda: [16, 32], min=1, help="encoder channels per layer (paper Table 2)")
    kernel_sizes: list[int] = param(factory=lambda: [3, 3], min=1, help="encoder kernel size per layer (Table 2)")
    strides: list[int] | Literal["auto"] = param(
        factory=lambda: [2, 2], min=1, help="encoder stride per layer (the paper leaves it open); auto: 2 while the "
                                            "feature map stays at least 4 wide, then 1")
    latent_dim: int | Literal["auto"] = param(
        10, min=1, help="dimension of the Gaussian code z; auto: max(10, K), the paper's 10 up to 10 clusters and "
                        "one dimension per cluster above (docs/method.md)")
    local_layer: int | None = param(None, min=1, help="encoder layer (1-based) whose feature map C_ij feeds the "
                                                      "local discriminator T2; None: the middle, ceil(L / 2)")
    global_disc_hidden: int = param(256, min=1, help="T1's hidden width (Deep InfoMax, 3 hidden layers)")
    local_disc_hidden: int = param(128, min=1, help="T2's hidden width (three 1x1 convs)")
    delta: float = param(0.5, min=0.0, max=1.0, help="transfer operator of Eq. 15")
    decoder_output: Literal["sigmoid", "linear"] = param(
        "sigmoid", paper="sigmoid", departure="{} decoder output", joint_only=False,
        help="the decoder's last activation. sigmoid: outputs in [0, 1], which saturate (and stop learning) "
             "when the code grows large; linear: DCEC's, N2D's and DEC-DA's, never saturates (docs/method.md)")
    input_view: Literal["raw", "sobel", "auto"] = param(
        "raw", paper="raw", departure="{} input view", joint_only=False,
        help="what the encoder, the decoder's target and the GCN see of an image: the pixels (raw), or the "
             "magnitude of their Sobel gradient over all channels, scaled to a maximum of 1 per image "
             "(sobel: blind to colour and contrast, as DeepCluster and IIC feed their networks); auto: "
             "sobel for 3-channel images, raw otherwise. The kNN graph is built over the same view")
    use_gcn: bool = param(True, help="False: p(y|z) from a linear head on the code (ablations without GCN)")
    gcn_features: Literal["flatten", "pooled"] = param(
        "flatten", help="what each GCN layer takes of its encoder layer (Eq. 15's Z): the flattened feature map "
                        "(SDCN's and the paper's widths), or the map averaged over its locations (one number per "
                        "channel: a GCN of the channels' widths, for large maps)")
    self_label_head: bool = param(
        False, paper=False, departure="self-labelled start", joint_only=False,
        help="a linear classifier over the encoder's flattened top map, trained by the self-labelling stage "
             "(train.self_label_epochs) on the start's clusters; its logits join the code as the GCN's last "
             "representation (Eq. 15's Z), so that Y can read what it learnt")


@dataclass
class LossConfig:
    """Each weight multiplies one loss term (sddecc_dist.model.losses names which)."""

    recon_weight: float = param(1.0, min=0.0, help="multiplies 1/2 ||x - x_hat||^2 (Eq. 13); see docs/method.md")
    mi_weight: float = param(0.01, min=0.0, help="lambda_1 (Eq. 12); 0 switches both MI terms off")
    global_mi: bool = param(True, help="T1(x, z)")
    local_mi: bool = param(True, help="T2(C_ij, z)")
    view_weight: float = param(0.0, min=0.0, paper=0.0, departure="view contrast {}",
                               help="pretraining and self-labelling: InfoNCE between the codes of each clean "
                                    "image and of its augmented view, the batch's other images as negatives "
                                    "(needs train.pretrain_augment)")
    view_temperature: float = param(0.5, min=1e-6, help="temperature of the view contrast (SimCLR's 0.5)")
    kl_weight: float = param(1.0, min=0.0, help="lambda_2: prior KL in pretraining, clustering KL (Eq. 18) jointly")
    prior_kl: bool = param(True, help="pretraining: KL(p(z|x) || N(0, I))")
    cluster_kl: bool = param(True, help="joint phase: Eq. 18; false trains no clustering head (ConvAE + k-means)")
    eq18_weight: float | None = param(None, min=0.0, paper=None, departure="Eq. 18 weight {}",
                                      help="Eq. 18's weight in the joint phase when not λ2 (kl_weight, which "
                                           "then weighs the pretraining's prior KL only); 0 leaves the joint "
                                           "phase to the other clustering terms")
    eq18_fixed_y: bool = param(False, paper=False, departure="Eq. 18 with Y held fixed",
                               help="Eq. 18 takes Y as a fixed target (no gradient into the GCN): it moves the "
                                    "codes and centres towards Y's clusters and leaves Y to the graph and the "
                                    "other terms. Without it Y is pulled to the codes' own Gaussian-mixture "
                                    "posterior (docs/method.md)")
    balance_weight: float = param(0.0, min=0.0, paper=0.0, departure="balance {}",
                                  help="KL(mean cluster usage || q(y)), the balance the paper asks of q(y)")
    cluster_prior: Literal["uniform", "init"] = param(
        "uniform", paper="uniform", departure="q(y) from the start",
        help="q(y) in Eq. 18 and the balance term. uniform: the paper's. init: the cluster proportions of "
             "the initial partition (train.center_init), fixed, for unequal classes (docs/method.md)")
    neighbour_weight: float = param(0.0, min=0.0, paper=0.0, departure="neighbour {}",
                                    help="-log(Y_i . Y_j) over the kNN graph's edges: neighbours share a cluster")
    cluster_code_smoothing: int = param(0, min=0, paper=0, departure="Eq. 18 on Â^{} codes",
                                        help="Eq. 18 on the codes smoothed t times over the graph (Â^t mean); "
                                             "0: each node's own code")
    start_weight: float = param(0.0, min=0.0, paper=0.0, departure="anchored to the start {}",
                                help="cross-entropy of Y to the start's clusters through the joint phase: the "
                                     "joint phase refines the start rather than leaving it")
    self_training_weight: float = param(0.0, min=0.0, paper=0.0, departure="self-training {}",
                                        help="KL(P || Y) towards DEC's sharpened target P ∝ Y² / cluster "
                                             "frequency (Xie et al. 2016), P held fixed in each step")

    @property
    def cluster_kl_weight(self) -> float:
        """The weight of Eq. 18 in the joint phase: eq18_weight, by default λ2; 0 when it is off."""
        if not self.cluster_kl:
            return 0.0
        return self.kl_weight if self.eq18_weight is None else self.eq18_weight

    @property
    def uses_prior_kl(self) -> bool:
        """Pretraining has the prior KL term; the code is sampled exactly then (docs/method.md)."""
        return self.prior_kl and self.kl_weight > 0


@dataclass
class TrainConfig:
    pretrain_epochs: int = param(30, min=0, help="minibatch epochs of DDECN pretraining")
    pretrain_steps: int = param(0, min=0, help="at least this many pretraining optimiser steps: the epochs are "
                                               "raised to reach them, so that small sets train as long as large")
    pretrain_batch_size: int | Literal["auto"] = param(
        256, min=1, help="global batch, split over processes and accumulation; auto: N/16 within [32, 256], "
                         "rounded down to a multiple of processes x accumulation")
    pretrain_lr: float = param(1e-3, min=0.0, help="Adam learning rate of pretraining")
    pretrain_lr_warmup_steps: int = param(
        0, min=0, help="the pretraining learning rate rises linearly over this many optimiser steps (0: none)")
    pretrain_source: Literal["shards", "memory"] = param(
        "shards", help="where pretraining batches come from: streamed from the shards (webdataset; any N), or "
                       "cut from the images in memory (a copy of every image per process: for sets that fit)")
    pretrain_augment: Literal["none", "affine"] = param(
        "none", paper="none", departure="augmented pretraining", joint_only=False,
        help="affine: each pretraining batch is warped by random affine maps (kornia) before the encoder, "
             "as DEC-DA and DynAE pretrain")
    augment_degrees: float = param(10.0, min=0.0, help="affine augmentation: rotation in ± degrees")
    augment_translate: float = param(0.1, min=0.0, max=0.5, help="affine augmentation: shift in ± this fraction "
                                                                 "of the image size")
    augment_scale: float = param(0.1, min=0.0, max=0.9, help="affine augmentation: scale in [1 - s, 1 + s]")
    augment_target: Literal["clean", "augmented"] = param(
        "clean", help="what the decoder reconstructs from an augmented input: the clean image (denoising) or "
                      "the augmented one")
    self_label_epochs: int = param(
        0, min=0, help="after the start: epochs that train the encoder (the pretraining objective on augmented "
                       "batches) and model.self_label_head to predict the start's clusters; its predictions "
                       "then replace the start (centres, q(y), the joint phase's start term). 0: no such stage")
    self_label_steps: int = param(0, min=0, help="at least this many self-labelling steps: the epochs are raised "
                                                 "to reach them, as pretrain_steps does")
    self_label_lr: float = param(1e-3, min=0.0, help="Adam learning rate of the self-labelling stage")
    joint_epochs: int = param(100, min=0, help="joint epochs (full sampler: one step over the whole graph each)")
    joint_lr: float = param(1e-3, min=0.0, help="DDECN and centres in the joint phase")
    head_lr: float = param(1e-2, min=0.0, help="the GCN (or linear head): it starts from random weights and must "
                                               "catch up with a pretrained encoder, so it gets a larger rate")
    head_warmup_epochs: int = param(0, min=0, help="joint epochs at the start that train only the GCN (DDECN and "
                                                   "centres frozen)")
    head_warmup_agreement: float = param(
        0.0, min=0.0, max=1.0,
        help="end the warm-up early, after the first warm-up epoch in which the GCN's cluster agrees with the "
             "start's on at least this share of the scored nodes (label-free; with head_warmup_target=start). The "
             "joint epochs then follow at once, numbered as before. 0: all head_warmup_epochs")
    head_warmup_target: Literal["posterior", "start"] = param(
        "posterior", paper="posterior", departure="head warm-up on the start",
        help="what the GCN learns in the warm-up. posterior: Eq. 18's mixture posterior of the frozen codes. "
             "start: the initial partition itself (cross-entropy)")
    joint_aux_batch_size: int = param(1024, min=2, help="reconstruction and MI of a joint step are estimated on "
                                                        "this many random nodes of the batch (unbiased)")
    joint_encoder_nodes: int = param(
        0, min=0, help="a joint step's encoder gradient comes from this many random nodes of the batch, the other "
                       "nodes' codes from a no-grad pass (0: every node, the exact gradient). Bounds the joint "
                       "phase's memory and time for large full-graph batches: an unbiased estimate of the "
                       "encoder's gradient, the loss's value unchanged")
    joint_encoding_refresh: int = param(
        1, min=1, help="with joint_encoder_nodes on the whole graph: the other nodes' no-grad codes are encoded "
                       "again every this many steps and reused in between (1: every step, exact values). "
                       "The joint rate is small, so codes a few steps old differ little, and the no-grad "
                       "pass is most of a step's time at 70 000 images")
    kmeans_n_init: int = param(20, min=1, help="k-means restarts of the k-means start")
    center_init_smoothing: int = param(4, min=0, help="the start partitions the codes smoothed t times over the "
                                                      "graph (Â^t Z)")
    center_init: Literal["kmeans", "ward", "umap_gmm"] = param(
        "kmeans", paper="kmeans", departure="{} start", joint_only=False,
        help="how the smoothed codes are first partitioned (their means are the centres μ_y). kmeans: "
             "seeded, favours equal sizes, any N. ward: Ward's merges along the kNN graph, deterministic, "
             "sizes as the data has them; for the paper's datasets rather than millions. umap_gmm: N2D's "
             "start, a full-covariance GMM on a 10-d UMAP embedding of the codes")
    start_fit_sample: int = param(100_000, min=2, help="umap_gmm: UMAP is fitted on at most this many codes "
                                                        "(seeded sample), the rest placed by its transform")
    start_candidates: int = param(1, min=1, help="umap_gmm: UMAP + GMM fitted this many times (seeds seed, "
                                                 "seed+1, ...) and the consensus kept: the candidate with the "
                                                 "highest mean NMI to the others (docs/method.md)")
    start_min_share: float = param(0.0, min=0.0, max=1.0,
                                   help="umap_gmm: a component of fewer than this times N/K samples is split away: "
                                        "the largest other cluster is halved by 2-means and the small one's samples "
                                        "join the nearest cluster (0: off; 0.2 suits sets whose largest class holds "
                                        "at most 5 times the smallest: docs/method.md)")
    eval_every: int = param(5, min=1, help="joint epochs between metric lines")
    checkpoint_every: int = param(25, min=1, help="epochs (either phase) between periodic checkpoints")
    keep_checkpoints: int = param(2, min=1, help="newest checkpoint folders kept in RUN/checkpoints")
    resume: bool = param(False, help="continue from the latest valid checkpoint in the run folder")
    new_version: bool = param(False, help="output_dir holds an earlier run: move it whole into "
                                          "output_dir/previous/TIME/ and start a new one (without this or "
                                          "resume, a fresh run into a folder that holds a run refuses)")
    init_from: str | None = param(None, help="a pretrained model file (a run's checkpoints/pretrain.pt): skip "
                                             "pretraining, rerun the start and joint phase alone")
    num_threads: int | None = param(None, min=1, help="torch intra-op threads; None leaves torch's default")
    joint_sampler: Literal["full", "cluster"] = param(
        "full", help="full: every joint step is the whole graph (the paper's and SDCN's setting, small sets). "
                     "cluster: Cluster-GCN, each step partitions_per_batch METIS partitions of about "
                     "partition_size nodes, streamed from partition-ordered shards")
    joint_graph: Literal["knn", "within_start"] = param(
        "knn", paper="knn", departure="graph cut along the start's clusters",
        help="the joint phase's graph. knn: the kNN graph (the paper's). within_start: only its edges whose two "
             "ends share a cluster of the start the joint phase refines, so that the GCN never averages a "
             "sample with another start cluster's (docs/method.md)")
    partition_size: int = param(1000, min=1, help="nodes per partition of the cluster sampler")
    partitions_per_batch: int = param(4, min=1, help="partitions per cluster-sampler step")
    partition_method: Literal["metis", "random"] = param("metis", help="how the graph is partitioned")
    partitions_per_shard: int = param(8, min=1, help="partitions per partition-ordered shard")
    inference_batch_size: int = param(4096, min=1, help="nodes per chunk in layer-wise full-graph inference")
    mixed_precision: Literal["no", "fp16", "bf16"] | None = param(
        None, help="None: whatever `accelerate launch` or its config says")
    gradient_accumulation_steps: int = param(1, min=1, help="pretraining micro-batches per optimiser step")


@dataclass
class Config:
    name: str = param("run", help="a name for the run")
    data_dir: str = param("data/digits", help="prepared data folder (shards, graph, partitions)")
    output_dir: str = param("runs/digits", help="run folder")
    seed: int = param(0, min=0, help="seeds weights, data order, k-means")
    n_clusters: int | None = param(None, min=2, help="K; None: the manifest's number of classes")
    data: DataConfig = field(default_factory=DataConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ---- checks --------------------------------------------------------------------------------

def choices(cls: type, name: str) -> tuple:
    """The allowed values of a Literal-typed field, e.g. choices(TrainConfig, 'joint_sampler')."""
    annotation = typing.get_type_hints(cls)[name]
    for option in (typing.get_args(annotation) if _is_union(annotation) else (annotation,)):
        if typing.get_origin(option) is Literal:
            return typing.get_args(option)
    raise TypeError(f"{cls.__name__}.{name} is not a Literal field")


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _check_type(value: Any, annotation: Any, key: str, origin: str) -> Any:
    """Return `value` as the annotated type, or raise naming the key and where it came from."""
    where = f"{origin}: " if origin else ""
    if _is_union(annotation):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key, origin)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if typing.get_origin(annotation) is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed or isinstance(value, bool):
            # YAML 1.1 reads a bare no (also off, yes, on) as a boolean: mixed_precision=no arrives as False
            hint = (f" (YAML reads a bare no as false: quote it, {key}='no')"
                    if value is False and "no" in allowed else "")
            raise ConfigError(f"{where}{key}={value!r} must be one of {', '.join(map(str, allowed))}{hint}")
        return value
    if typing.get_origin(annotation) is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{where}'{key}' must be a list, got {value!r}")
        return [_check_type(v, item_type, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{where}'{key}' must be true or false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{where}'{key}' must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(f"{where}'{key}' must be of type {annotation.__name__}, got {value!r}")
    return value


def check_fields(section: Any, prefix: str) -> None:
    """Each field of a config dataclass (recursively) against its type, choices and bounds."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, key = getattr(section, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_fields(value, f"{key}.")
            continue
        value = _check_type(value, hints[f.name], key, "")
        low, high = f.metadata.get("min"), f.metadata.get("max")
        numbers = value if isinstance(value, list) else [value]
        for number in numbers:
            if number is None or isinstance(number, str):
                continue
            if low is not None and high is not None and not low <= number <= high:
                raise ConfigError(f"{key}={value!r} must be in [{low:g}, {high:g}]")
            if low is not None and number < low:
                raise ConfigError(f"{key}={value!r} must be >= {low:g}")


def validate(config: Config) -> None:
    """Every field's own checks, then the cross-field checks that types alone cannot express."""
    check_fields(config, "")
    model = config.model
    n_layers = len(model.channels)
    if n_layers == 0:
        raise ConfigError("model.channels must name at least one encoder layer")
    strides = n_layers if model.strides == "auto" else len(model.strides)
    if not (len(model.kernel_sizes) == strides == n_layers):
        raise ConfigError(
            f"model.channels, model.kernel_sizes and model.strides must have the same length, "
            f"got {n_layers}, {len(model.kernel_sizes)}, {strides}"
        )
    if model.local_layer is not None and model.local_layer > n_layers:
        raise ConfigError(f"model.local_layer={model.local_layer} must be in 1..{n_layers}")
    graph_terms = [k for k in ("neighbour_weight", "cluster_code_smoothing") if getattr(config.loss, k)]
    if graph_terms and not model.use_gcn:
        raise ConfigError(f"{', '.join('loss.' + k for k in graph_terms)} use(s) the kNN graph, which only the "
                          f"GCN model has (model.use_gcn=false): set to 0")
    if config.loss.view_weight > 0 and (config.train.pretrain_augment == "none"
                                        or config.train.augment_target != "clean"):
        raise ConfigError("loss.view_weight contrasts each clean image with its augmented view: it needs "
                          "train.pretrain_augment=affine and train.augment_target=clean (or loss.view_weight=0)")
    if config.train.self_label_epochs and not model.self_label_head:
        raise ConfigError("train.self_label_epochs trains model.self_label_head: set model.self_label_head=true "
                          "(or train.self_label_epochs=0)")
    if config.train.resume and config.train.new_version:
        raise ConfigError("train.resume continues the run in output_dir and train.new_version moves it aside to "
                          "start anew: choose one")
    if config.train.head_warmup_agreement > 0 and config.train.head_warmup_target != "start":
        raise ConfigError("train.head_warmup_agreement ends the warm-up when the GCN agrees with the start: it needs "
                          "train.head_warmup_target=start (or train.head_warmup_agreement=0)")
    if config.train.center_init == "ward" and not model.use_gcn:
        raise ConfigError("train.center_init=ward merges along the kNN graph, which only the GCN model has "
                          "(model.use_gcn=false): use kmeans")


# ---- loading -------------------------------------------------------------------------------

def _apply(target: Any, values: dict, prefix: str, origin: str) -> None:
    """Set fields of a dataclass instance from a nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(type(target))
    known = {f.name for f in dataclasses.fields(target)}
    for key, value in values.items():
        full_key = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(
                f"{origin}: unknown key '{full_key}'; known keys here: {', '.join(sorted(known))}"
            )
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{origin}: '{full_key}' must be a mapping, got {value!r}")
            _apply(current, value, f"{full_key}.", origin)
        else:
            setattr(target, key, _check_type(value, hints[key], full_key, origin))


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.joint_epochs=50` -> (['train', 'joint_epochs'], 50); values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value (e.g. seed=1)")
    key, raw = text.split("=", 1)
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({error})") from error
    return key.split("."), value


def config_from_dict(values: dict, origin: str = "dict") -> Config:
    """A Config from a nested dict (e.g. the one saved in a checkpoint), validated."""
    config = Config()
    _apply(config, values, "", origin)
    validate(config)
    return config


def load_config(
    paths: str | Path | list[str | Path] | None = None, overrides: list[str] | None = None
) -> Config:
    """Build a Config from defaults, then YAML files in order (a later file overrides the keys
    it names: `configs/paper/usps.yaml` then `configs/ablations/convae.yaml`), then `key=value`
    overrides."""
    config = Config()
    if paths is None:
        paths = []
    elif isinstance(paths, (str, Path)):
        paths = [paths]
    for path in map(Path, paths):
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {error}") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"config file {path} is not text (UTF-8): {error}") from error
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        _apply(config, values, "", str(path))
    for text in overrides or []:
        keys, value = parse_override(text)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        _apply(config, nested, "", f"override '{text}'")
    validate(config)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


# ---- what a config trains, and where it departs from the paper ------------------------------

def method_name(config: Config) -> str:
    """The paper's name for what a config trains (Table 4's rows): ConvAE, ConvAE+MI,
    ConvAE+GCN or ConvAE+MI+GCN (= SDDECC); with no clustering head trained, k-means on the
    codes: ConvAE+K-means (Table 3's "AE+K-means") or ConvAE+MI+K-means."""
    loss = config.loss
    name = "ConvAE"
    if loss.mi_weight > 0 and (loss.global_mi or loss.local_mi):
        name += "+MI"
    if not has_joint_phase(config):
        return name + "+K-means"
    return name + "+GCN" if config.model.use_gcn else name


def has_joint_phase(config: Config) -> bool:
    return config.loss.cluster_kl and config.train.joint_epochs > 0


def departures(config: Config) -> list[str]:
    """What a config changes in the paper's method, in field order: every field whose
    `departure` metadata is set and whose value is not the paper's (docs/method.md)."""
    found = []
    joint = has_joint_phase(config)
    for section_name in ("data", "graph", "model", "loss", "train"):
        section = getattr(config, section_name)
        for f in dataclasses.fields(section):
            meta = f.metadata
            value = getattr(section, f.name)
            if "departure" in meta and value != meta["paper"] and (joint or not meta["joint_only"]):
                found.append(meta["departure"].format(f"{value:g}" if isinstance(value, float) else value))
    return found


# ---- command-line flags from the same definitions --------------------------------------------

def add_arguments(parser: argparse.ArgumentParser, cls: type, names: list[str] | None = None,
                  flags: dict[str, str] | None = None) -> None:
    """Add `--field-name` flags for fields of config dataclass `cls` (all, or `names`), with the
    field's default, type, choices and help; `flags` renames some (field -> flag). Read the
    values back with `from_arguments`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if names is not None and f.name not in names:
            continue
        annotation = hints[f.name]
        optional = _is_union(annotation) and type(None) in typing.get_args(annotation)
        base = next(a for a in typing.get_args(annotation) if a is not type(None)) if optional else annotation
        flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs: dict[str, Any] = {"dest": f.name, "default": default, "help": f.metadata.get("help", "")}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(base) is Literal:
            kwargs["choices"] = typing.get_args(base)
        else:
            kwargs["type"] = base
        parser.add_argument(flag, **kwargs)


def from_arguments(cls: type, args: argparse.Namespace, **extra: Any):
    """An instance of config dataclass `cls` from the flags `add_arguments` added (fields
    without a flag keep their defaults), checked."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {name: getattr(args, name) for name in names if hasattr(args, name)}
    instance = cls(**values, **extra)
    check_fields(instance, "")
    return instance
