"""Reproduction mode: the runs each target plans, config stacking for the ablations, and a
small real Table 4 + Figure 6 on digits (each run a subprocess, as for the paper's sets)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest

from sddecc_dist.config import ConfigError, load_config, method_name
from sddecc_dist.paper.reproduce import FIG7_LAMBDA1, FIG7_LAMBDA2, plan, reproduce, train_command

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


def test_ablation_configs_stack_on_each_paper_config():
    expected = {"convae": "ConvAE", "convae_mi": "ConvAE+MI", "convae_gcn": "ConvAE+GCN",
                "convae_mi_gcn": "ConvAE+MI+GCN", "ae_kmeans": "ConvAE+K-means"}
    for paper in ("usps", "mnist", "fashion_mnist"):
        base = load_config(CONFIGS / "paper" / f"{paper}.yaml")
        for variant, name in expected.items():
            config = load_config([CONFIGS / "paper" / f"{paper}.yaml", CONFIGS / "ablations" / f"{variant}.yaml"])
            assert method_name(config) == name
            # a stacked file changes only what it names: the dataset's schedule and encoder stay
            assert config.model.channels == base.model.channels
            assert config.train.joint_epochs == base.train.joint_epochs
            assert config.data_dir == base.data_dir


def test_later_config_file_wins_and_unknown_keys_name_their_file(tmp_path):
    override = tmp_path / "more.yaml"
    override.write_text("loss:\n  mi_weight: 0.5\n")
    config = load_config([CONFIGS / "paper" / "usps.yaml", override], ["seed=3"])
    assert config.loss.mi_weight == 0.5 and config.seed == 3 and config.model.channels == [16, 32]
    bad = tmp_path / "bad.yaml"
    bad.write_text("loss:\n  mi_wieght: 0.5\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*loss\.mi_wieght"):
        load_config([CONFIGS / "paper" / "usps.yaml", bad])


def test_plans_name_every_run_folder(tmp_path):
    runs = plan("table3", "usps", [0, 1, 2], tmp_path, CONFIGS, ["data.from_dir=X"])
    assert [r.output_dir.name for r in runs] == [
        f"{v}-s{s}" for v in ("kmeans_pixels", "ae_kmeans", "convae_mi_gcn") for s in (0, 1, 2)]
    assert all(r.output_dir.parent == tmp_path / "usps" for r in runs)
    assert runs[3].config_files == [CONFIGS / "paper/usps.yaml", CONFIGS / "ablations/ae_kmeans.yaml"]
    # Table 3's SDDECC runs are Table 4's last row: the same folders, trained once
    table4 = plan("table4", "usps", [0, 1, 2], tmp_path, CONFIGS, [])
    assert {r.output_dir for r in table4 if r.variant == "convae_mi_gcn"} == \
        {r.output_dir for r in runs if r.variant == "convae_mi_gcn"}
    grid = plan("fig7", "fashion-mnist", [0], tmp_path, CONFIGS, [])
    assert len(grid) == len(FIG7_LAMBDA1) * len(FIG7_LAMBDA2)
    lambdas = {(load_config(r.config_files, r.overrides).loss.mi_weight,
                load_config(r.config_files, r.overrides).loss.kl_weight) for r in grid}
    assert lambdas == {(a, b) for a in FIG7_LAMBDA1 for b in FIG7_LAMBDA2}
    with pytest.raises(ConfigError, match="cifar10"):
        plan("table3", "cifar10", [0], tmp_path, CONFIGS, [])
    with pytest.raises(ConfigError, match="table9"):
        plan("table9", "usps", [0], tmp_path, CONFIGS, [])


def test_a_started_run_is_resumed_not_restarted(tmp_path):
    (run,) = [r for r in plan("table4", "usps", [0], tmp_path, CONFIGS, []) if r.variant == "convae"]
    assert "train.resume=true" not in train_command(run, ["python"])
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "config.yaml").write_text("{}")
    command = train_command(run, ["python"])
    assert command[-1] == "train.resume=true" and f"output_dir={run.output_dir}" in command


def test_table4_and_fig6_on_digits(tmp_path):
    """Four real (short) runs through the reproduce command, the report beside them, the t-SNE
    figures; then a deleted result is retrained alone while the finished runs are kept."""
    data = tmp_path / "data"
    short = [f"data_dir={data}", "train.pretrain_epochs=3", "train.head_warmup_epochs=2",
             "train.joint_epochs=6", "train.kmeans_n_init=2", "train.eval_every=3", "train.num_threads=1"]
    env_before = dict(os.environ)
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        (table,) = reproduce("table4", "digits", [0], runs_dir=tmp_path / "runs", configs_dir=CONFIGS,
                             overrides=short, base_config=CONFIGS / "digits.yaml")
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    out = tmp_path / "runs" / "digits"
    methods = {}
    for variant in ("convae", "convae_mi", "convae_gcn", "convae_mi_gcn"):
        metrics = json.loads((out / f"{variant}-s0" / "metrics.json").read_text())
        assert metrics["dataset"] == "digits" and metrics["seed"] == 0 and metrics["epoch"] == 6
        methods[variant] = metrics["method"]
        # the report shows each run's own final-epoch figure
        assert f"{metrics['acc']:.4f}" in table.read_text()
    assert methods == {"convae": "ConvAE", "convae_mi": "ConvAE+MI", "convae_gcn": "ConvAE+GCN",
                       "convae_mi_gcn": "ConvAE+MI+GCN"}
    # the ablations differ where they should: no GCN, no graph features; no MI, no MI losses
    lines = {v: [json.loads(l) for l in (out / f"{v}-s0" / "metrics.jsonl").read_text().splitlines()]
             for v in methods}
    assert all("local_mi" not in l for l in lines["convae"] + lines["convae_gcn"])
    assert any("local_mi" in l for l in lines["convae_mi"])

    # Figure 6 reuses the four finished runs and only draws
    finished = {v: (out / f"{v}-s0" / "metrics.json").stat().st_mtime_ns for v in methods}
    pngs = reproduce("fig6", "digits", [0], runs_dir=tmp_path / "runs", configs_dir=CONFIGS,
                     overrides=short, base_config=CONFIGS / "digits.yaml")
    assert [p.name for p in pngs] == [f"fig6_{v}.png" for v in methods]
    assert all(p.stat().st_size > 0 for p in pngs)
    assert finished == {v: (out / f"{v}-s0" / "metrics.json").stat().st_mtime_ns for v in methods}

    # one result deleted: only that run trains again, from its checkpoints, to the same answer
    before = np.loadtxt(out / "convae_gcn-s0" / "assignments.txt", dtype=int)
    (out / "convae_gcn-s0" / "metrics.json").unlink()
    reproduce("table4", "digits", [0], runs_dir=tmp_path / "runs", configs_dir=CONFIGS,
              overrides=short, base_config=CONFIGS / "digits.yaml")
    assert np.array_equal(before, np.loadtxt(out / "convae_gcn-s0" / "assignments.txt", dtype=int))
    kept = {v: (out / f"{v}-s0" / "metrics.json").stat().st_mtime_ns for v in methods if v != "convae_gcn"}
    assert kept == {v: t for v, t in finished.items() if v != "convae_gcn"}


def test_reproduce_command_takes_overrides_after_its_options(tmp_path, capsys):
    from sddecc_dist.cli import main

    args = ["reproduce", "table3", "--dataset", "usps", "--seeds", "2", "--runs-dir", str(tmp_path),
            "--configs-dir", str(CONFIGS), "--dry-run", "data.from_dir=RAW", "train.joint_epochs=7"]
    assert main(args) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "train.joint_epochs=7" in out and "data.from_dir=RAW" in out and "convae_mi_gcn-s1" in out
    assert not (tmp_path / "usps").exists()  # a dry run trains and writes nothing
    with pytest.raises(SystemExit):
        main([*args, "--no-such-flag"])
    assert main([*args, "train.no_such_key=1"]) == 2  # checked before anything runs
    captured = capsys.readouterr()
    assert "train.no_such_key" in captured.out + captured.err


def test_reproduce_only_stops_at_the_overrides_after_it(tmp_path, capsys):
    """`--only VARIANT key=value`: argparse's nargs="+" takes both; the override must still apply."""
    from sddecc_dist.cli import main

    args = ["reproduce", "table3", "--dataset", "usps", "--seeds", "1", "--runs-dir", str(tmp_path),
            "--configs-dir", str(CONFIGS), "--dry-run", "--only", "ae_kmeans", "train.joint_epochs=7"]
    assert main(args) == 0
    out = "".join(capsys.readouterr())
    assert "train.joint_epochs=7" in out and "ae_kmeans-s0" in out
    assert "convae_mi_gcn-s0" not in out and "kmeans_pixels-s0" not in out
    with pytest.raises(SystemExit):  # overrides but no variant
        main(args[:-2] + ["train.joint_epochs=7"])
