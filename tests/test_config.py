"""Typed configs: YAML + overrides, clear errors for unknown keys and wrong types."""

from pathlib import Path

import pytest

from sddecc_dist.config import ConfigError, load_config

# Training configs; configs/accelerate/ holds `accelerate launch` configs (tests/test_slurm.py).
CONFIGS = sorted(p for p in Path("configs").rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", CONFIGS, ids=str)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    assert config.graph.k == 3 and config.model.delta == 0.5


def test_paper_configs_follow_the_paper():
    for name in ("usps", "mnist", "fashion_mnist"):
        config = load_config(f"configs/paper/{name}.yaml")
        assert 0.001 <= config.loss.mi_weight <= 0.1, name  # λ1 range of Fig. 7
        assert 1.0 <= config.loss.kl_weight <= 2.0, name  # λ2 range of Fig. 7
        assert set(config.model.kernel_sizes) == {3}
    assert load_config("configs/paper/usps.yaml").model.channels == [16, 32]
    assert load_config("configs/paper/mnist.yaml").model.channels == [16, 16, 32, 32]
    assert load_config("configs/paper/fashion_mnist.yaml").model.channels == [16, 16, 32, 32]


def test_overrides_set_nested_and_top_level_keys():
    config = load_config("configs/digits.yaml", [
        "seed=7", "data_dir=/tmp/d", "output_dir=/tmp/o", "n_clusters=12",
        "train.joint_epochs=3", "loss.mi_weight=0", "model.channels=[8,8]",
        "model.kernel_sizes=[3,3]", "graph.use_gpu=false",
    ])
    assert (config.seed, config.data_dir, config.output_dir, config.n_clusters) == (7, "/tmp/d", "/tmp/o", 12)
    assert config.train.joint_epochs == 3
    assert config.loss.mi_weight == 0.0 and isinstance(config.loss.mi_weight, float)
    assert config.model.channels == [8, 8] and config.graph.use_gpu is False


def test_unknown_keys_are_rejected_with_their_name(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'train.epochs'"):
        load_config("configs/digits.yaml", ["train.epochs=3"])
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  chanels: [1]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'model.chanels'"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "'seed' must be of type int"),
    ("loss.global_mi=3", "'loss.global_mi' must be true or false"),
    ("model.channels=16", "'model.channels' must be a list"),
    ("model.delta=1.5", "model.delta=1.5 must be in"),
    ("model.kernel_sizes=[3]", "same length"),
    ("graph.k=0", "graph.k=0 must be >= 1"),
    ("seed", "must look like key=value"),
    ("loss.cluster_code_smoothing=-1", "loss.cluster_code_smoothing=-1 must be >= 0"),
    ("train.center_init=spectral", "train.center_init='spectral' must be one of kmeans, ward"),
    ("loss.cluster_prior=learnt", "loss.cluster_prior='learnt' must be one of uniform, init"),
    ("train.head_warmup_target=labels", "train.head_warmup_target='labels' must be one of posterior, start"),
    ("train.joint_sampler=graphsaint", "train.joint_sampler='graphsaint' must be one of full, cluster"),
    ("train.mixed_precision=fp8", "train.mixed_precision='fp8' must be one of no, fp16, bf16"),
    ("train.mixed_precision=no", r"must be one of no, fp16, bf16 \(YAML reads a bare no as false: quote it, "
     r"train.mixed_precision='no'\)"),
    ("model.channels=[16,0]", r"model.channels=\[16, 0\] must be >= 1"),
    ("train.eval_every=0", "train.eval_every=0 must be >= 1"),
    ("seed=[", "the value is not valid YAML"),
])
def test_bad_values_are_rejected_clearly(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("configs/digits.yaml", [override])


def test_a_config_file_that_is_not_text_is_named(tmp_path):
    (tmp_path / "binary.yaml").write_bytes(b"\xff\xfe\x00\x81 not text")
    with pytest.raises(ConfigError, match=r"config file .*binary.yaml is not text \(UTF-8\)"):
        load_config(tmp_path / "binary.yaml")


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml does not exist"):
        load_config("configs/nope.yaml")


def test_ward_start_without_the_gcn_is_rejected():
    with pytest.raises(ConfigError, match=r"train.center_init=ward merges along the kNN graph.*use kmeans"):
        load_config("configs/digits.yaml", ["model.use_gcn=false", "train.center_init=ward"])


def test_graph_terms_without_the_gcn_are_rejected():
    with pytest.raises(ConfigError, match=r"loss.neighbour_weight use\(s\) the kNN graph.*model.use_gcn=false"):
        load_config("configs/digits.yaml", ["model.use_gcn=false", "loss.neighbour_weight=1"])
    with pytest.raises(ConfigError, match=r"loss.neighbour_weight, loss.cluster_code_smoothing use\(s\) the kNN graph"):
        load_config("configs/paper/usps.yaml", ["model.use_gcn=false"])
    # the no-GCN ablations switch them off explicitly, so they stack on any paper config
    for variant in ("convae", "convae_mi", "ae_kmeans"):
        config = load_config(["configs/paper/usps.yaml", f"configs/ablations/{variant}.yaml"], [])
        assert config.loss.neighbour_weight == 0 and config.loss.cluster_code_smoothing == 0
        assert config.train.center_init == "kmeans"
    for variant in ("convae", "convae_mi"):  # rows of the paper's Table 4: its uniform q(y)
        config = load_config(["configs/paper/usps.yaml", f"configs/ablations/{variant}.yaml"], [])
        assert config.loss.cluster_prior == "uniform" and config.train.head_warmup_target == "posterior"


def test_warm_up_agreement_needs_the_start_as_the_warm_up_target():
    with pytest.raises(ConfigError, match=r"train.head_warmup_agreement ends the warm-up when the GCN agrees with "
                                          r"the start: it needs train.head_warmup_target=start"):
        load_config("configs/default.yaml", ["train.head_warmup_target=posterior"])
    config = load_config("configs/default.yaml", ["train.head_warmup_target=posterior", "train.head_warmup_agreement=0"])
    assert config.train.head_warmup_target == "posterior"


def test_view_contrast_without_a_clean_augmented_pair_is_rejected():
    for override in ("train.pretrain_augment=none", "train.augment_target=augmented"):
        with pytest.raises(ConfigError, match=r"loss.view_weight contrasts each clean image with its augmented view"):
            load_config("configs/digits.yaml", ["loss.view_weight=1", "train.pretrain_augment=affine", override])
    assert load_config("configs/digits.yaml", ["loss.view_weight=1", "train.pretrain_augment=affine"]).loss.view_weight == 1
