"""Typed run configuration: dataclasses loaded from YAML, with `key=value` overrides.

Every key a YAML file or an override names must exist in these dataclasses; a typo is an
error that names the key and the file, never a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


@dataclass
class DataConfig:
    # What to prepare into `data_dir` when it holds no shards yet (`sddecc prepare` arguments).
    source: str | None = None  # dataset name, .npz file or image folder; None: data_dir must exist
    from_dir: str | None = None  # local raw files instead of downloading
    split: str = "all"  # the paper clusters train and test together
    size: int | None = None  # resize image folders to size x size
    samples_per_shard: int = 10000
    shuffle_buffer: int = 10000  # webdataset shuffle buffer for minibatch pretraining


@dataclass
class GraphConfig:
    k: int = 3  # neighbours per sample (the paper's k)
    use_gpu: bool | None = None  # None: faiss-gpu when a GPU is visible, else faiss-cpu
    # FAISS index (sddecc_dist.graph.IndexParams has the same fields and defaults).
    # auto: exact search (flat) up to exact_max_n samples, IVF-Flat up to ivf_max_n, IVF-PQ above.
    index: str = "auto"  # auto | flat | ivf | ivfpq
    exact_max_n: int = 100_000  # MNIST-size sets stay exact, as in the paper
    ivf_max_n: int = 10_000_000
    nlist: int = 0  # IVF lists; 0: round(4 sqrt(n)), n the vectors in one index (one rank's share)
    nprobe: int = 16  # lists searched per query: recall against speed
    pq_m: int = 0  # IVF-PQ bytes per vector, a divisor of the dimension; 0: largest <= min(64, d/4)
    train_sample: int = 0  # vectors for IVF/PQ training; 0: min(n, max(64 nlist, 16384))
    recall_queries: int = 1000  # random queries for recall@k against exact search (approximate indexes)
    seed: int = 0  # training sample and recall queries


@dataclass
class ModelConfig:
    channels: list[int] = field(default_factory=lambda: [16, 32])  # paper Table 2, per layer
    kernel_sizes: list[int] = field(default_factory=lambda: [3, 3])
    strides: list[int] = field(default_factory=lambda: [2, 2])
    latent_dim: int = 10
    # Encoder layer (1-based) whose feature map C_ij feeds the local discriminator T2;
    # None picks the middle layer, ceil(L / 2).
    local_layer: int | None = None
    global_disc_hidden: int = 256  # Deep InfoMax (Su) widths: 3 hidden layers
    local_disc_hidden: int = 128
    delta: float = 0.5  # transfer operator of Eq. 15
    use_gcn: bool = True  # False: p(y|z) from a linear head on the code (ablations without GCN)


@dataclass
class LossConfig:
    recon_weight: float = 1.0  # multiplies 1/2 ||x - x_hat||^2 (Eq. 13); see docs/method.md
    mi_weight: float = 0.01  # lambda_1 (Eq. 12); 0 switches both MI terms off
    global_mi: bool = True  # T1(x, z)
    local_mi: bool = True  # T2(C_ij, z)
    kl_weight: float = 1.0  # lambda_2: prior KL in pretraining, clustering KL (Eq. 18) jointly
    prior_kl: bool = True  # pretraining: KL(p(z|x) || N(0, I))
    cluster_kl: bool = True  # joint phase: Eq. 18; False trains no clustering head (ConvAE + k-means)
    # KL(mean cluster usage || q(y)), the balance the paper asks of q(y); 0 = Eq. 18 only.
    balance_weight: float = 0.0
    # q(y) in Eq. 18 and the balance term. uniform: the paper's. init: the cluster proportions
    # of the initial partition (train.center_init), fixed, for unequal classes (docs/method.md).
    cluster_prior: str = "uniform"
    # -log(Y_i . Y_j) over the kNN graph's edges: neighbours should share a cluster; 0 = off.
    neighbour_weight: float = 0.0
    # Eq. 18 on the codes smoothed t times over the graph (Â^t mean); 0 = each node's own code.
    cluster_code_smoothing: int = 0

    @property
    def uses_prior_kl(self) -> bool:
        """Pretraining has the prior KL term; the code is sampled exactly then (docs/method.md)."""
        return self.prior_kl and self.kl_weight > 0


@dataclass
class TrainConfig:
    pretrain_epochs: int = 30
    pretrain_batch_size: int = 256
    pretrain_lr: float = 1e-3
    joint_epochs: int = 100  # full-batch steps over the whole graph, as SDCN
    joint_lr: float = 1e-3  # DDECN and centres in the joint phase
    # The GCN (or linear head) starts from random weights and must catch up with a pretrained
    # encoder in a few hundred full-batch steps: it gets its own, larger learning rate.
    head_lr: float = 1e-2
    # Joint epochs at the start that train only the GCN (DDECN and centres frozen), so that a
    # randomly initialised GCN does not pull the codes towards arbitrary centres.
    head_warmup_epochs: int = 0
    # What the GCN learns in those epochs. posterior: Eq. 18's mixture posterior of the frozen
    # codes. start: the initial partition itself (cross-entropy), which Ward's is not the
    # posterior of (docs/method.md).
    head_warmup_target: str = "posterior"
    # In a full-batch joint step, reconstruction and MI are estimated on this many random
    # samples (unbiased); the encoder and GCN still see every node.
    joint_aux_batch_size: int = 1024
    kmeans_n_init: int = 20
    # k-means for the centres runs on the codes smoothed t times over the graph (Â^t Z); the
    # GCN's Y is graph-smoothed too, and single-seed k-means on raw codes varies a lot.
    center_init_smoothing: int = 4
    # How those smoothed codes are partitioned into the first clusters, whose means become the
    # centres μ_y. kmeans: seeded, kmeans_n_init restarts, favours clusters of equal size; any
    # N. ward: Ward's agglomerative clustering with merges only along the kNN graph's edges,
    # deterministic, sizes as the data has them (USPS: 588 to 1574); sklearn's tree over all N
    # nodes, so for the paper's datasets rather than millions (docs/method.md).
    center_init: str = "kmeans"
    eval_every: int = 5  # joint epochs between metric lines
    checkpoint_every: int = 25  # epochs (either phase) between periodic checkpoints
    keep_checkpoints: int = 2  # newest checkpoint folders kept in <output_dir>/checkpoints
    resume: bool = False  # continue from the latest valid checkpoint in the run folder
    # A pretrained model file (a run's checkpoints/pretrain.pt): skip pretraining, start at
    # the centres and joint phase (reruns the joint stage alone on a fixed pretraining).
    init_from: str | None = None
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # Joint-phase sampler. full: every step is the whole graph (the paper's and SDCN's
    # setting, small sets). cluster: Cluster-GCN, each step the union of `partitions_per_batch`
    # METIS partitions of about `partition_size` nodes, streamed from partition-ordered shards.
    joint_sampler: str = "full"
    partition_size: int = 1000
    partitions_per_batch: int = 4
    partition_method: str = "metis"  # metis | random
    partitions_per_shard: int = 8
    inference_batch_size: int = 4096  # nodes per chunk in layer-wise full-graph inference
    # None: whatever `accelerate launch` / its config says (no, fp16, bf16).
    mixed_precision: str | None = None
    gradient_accumulation_steps: int = 1  # pretraining micro-batches per optimiser step


@dataclass
class Config:
    name: str = "run"
    data_dir: str = "data/digits"
    output_dir: str = "runs/digits"
    seed: int = 0
    n_clusters: int | None = None  # None: the manifest's number of classes
    data: DataConfig = field(default_factory=DataConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def _check_type(value: Any, annotation: Any, key: str, origin: str) -> Any:
    """Return `value` as the annotated type, or raise naming the key and where it came from."""
    hint_origin = typing.get_origin(annotation)
    if hint_origin in (typing.Union, types.UnionType):
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
    if hint_origin is list:
        (item_type,) = typing.get_args(annotation)
        if not isinstance(value, list):
            raise ConfigError(f"{origin}: '{key}' must be a list, got {value!r}")
        return [_check_type(v, item_type, f"{key}[{i}]", origin) for i, v in enumerate(value)]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is bool and not isinstance(value, bool):
        raise ConfigError(f"{origin}: '{key}' must be true or false, got {value!r}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"{origin}: '{key}' must be an integer, got {value!r}")
    if not isinstance(value, annotation):
        raise ConfigError(
            f"{origin}: '{key}' must be of type {annotation.__name__}, got {value!r}"
        )
    return value


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
    return key.split("."), yaml.safe_load(raw) if raw else None


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


def method_name(config: Config) -> str:
    """The paper's name for what a config trains (Table 4's rows): ConvAE, ConvAE+MI,
    ConvAE+GCN or ConvAE+MI+GCN (= SDDECC); with no clustering head trained, k-means on the
    codes: ConvAE+K-means (Table 3's "AE+K-means") or ConvAE+MI+K-means."""
    loss = config.loss
    name = "ConvAE"
    if loss.mi_weight > 0 and (loss.global_mi or loss.local_mi):
        name += "+MI"
    if not loss.cluster_kl or config.train.joint_epochs == 0:
        return name + "+K-means"
    return name + "+GCN" if config.model.use_gcn else name


def validate(config: Config) -> None:
    """Cross-field checks that types alone cannot express."""
    model = config.model
    n_layers = len(model.channels)
    if n_layers == 0:
        raise ConfigError("model.channels must name at least one encoder layer")
    if not (len(model.kernel_sizes) == len(model.strides) == n_layers):
        raise ConfigError(
            f"model.channels, model.kernel_sizes and model.strides must have the same length, "
            f"got {n_layers}, {len(model.kernel_sizes)}, {len(model.strides)}"
        )
    if model.local_layer is not None and not 1 <= model.local_layer <= n_layers:
        raise ConfigError(f"model.local_layer={model.local_layer} must be in 1..{n_layers}")
    if not 0.0 <= model.delta <= 1.0:
        raise ConfigError(f"model.delta={model.delta} must be in [0, 1]")
    graph = config.graph
    if graph.k < 1:
        raise ConfigError(f"graph.k={graph.k} must be at least 1")
    if graph.index not in ("auto", "flat", "ivf", "ivfpq"):
        raise ConfigError(f"graph.index={graph.index!r} must be one of auto, flat, ivf, ivfpq")
    for key in ("exact_max_n", "ivf_max_n", "nlist", "pq_m", "train_sample", "recall_queries", "seed"):
        if getattr(graph, key) < 0:
            raise ConfigError(f"graph.{key}={getattr(graph, key)} must be >= 0")
    if graph.nprobe < 1:
        raise ConfigError(f"graph.nprobe={graph.nprobe} must be at least 1")
    if config.n_clusters is not None and config.n_clusters < 2:
        raise ConfigError(f"n_clusters={config.n_clusters} must be at least 2")
    train = config.train
    if train.joint_sampler not in ("full", "cluster"):
        raise ConfigError(f"train.joint_sampler={train.joint_sampler!r} must be 'full' or 'cluster'")
    if train.partition_method not in ("metis", "random"):
        raise ConfigError(f"train.partition_method={train.partition_method!r} must be 'metis' or 'random'")
    if config.loss.cluster_prior not in ("uniform", "init"):
        raise ConfigError(f"loss.cluster_prior={config.loss.cluster_prior!r} must be 'uniform' or 'init'")
    if train.head_warmup_target not in ("posterior", "start"):
        raise ConfigError(f"train.head_warmup_target={train.head_warmup_target!r} must be 'posterior' or 'start'")
    if train.center_init not in ("kmeans", "ward"):
        raise ConfigError(f"train.center_init={train.center_init!r} must be 'kmeans' or 'ward'")
    if train.mixed_precision not in (None, "no", "fp16", "bf16"):
        raise ConfigError(f"train.mixed_precision={train.mixed_precision!r} must be no, fp16 or bf16")
    for key in ("partition_size", "partitions_per_batch", "partitions_per_shard", "inference_batch_size",
                "gradient_accumulation_steps", "keep_checkpoints", "checkpoint_every", "eval_every",
                "pretrain_batch_size"):
        if getattr(train, key) < 1:
            raise ConfigError(f"train.{key}={getattr(train, key)} must be at least 1")
    for key in ("recon_weight", "mi_weight", "kl_weight", "balance_weight", "neighbour_weight",
                "cluster_code_smoothing"):
        if getattr(config.loss, key) < 0:
            raise ConfigError(f"loss.{key}={getattr(config.loss, key)} must be >= 0")
    graph_terms = [k for k in ("neighbour_weight", "cluster_code_smoothing") if getattr(config.loss, k)]
    if graph_terms and not model.use_gcn:
        raise ConfigError(f"{', '.join('loss.' + k for k in graph_terms)} use(s) the kNN graph, which only the "
                          f"GCN model has (model.use_gcn=false): set to 0")
    if train.center_init == "ward" and not model.use_gcn:
        raise ConfigError("train.center_init=ward merges along the kNN graph, which only the GCN model has "
                          "(model.use_gcn=false): use kmeans")


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)
