"""End to end on scikit-learn's digits: samplers, resume, bf16, the starts, bad input (the README's
quickstart run and what reads it: tests/test_quickstart.py)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sddecc_dist.config import ConfigError, load_config
from sddecc_dist.run_folder import RunFolder
from sddecc_dist.train.loop import train

ROOT = Path(__file__).resolve().parent.parent


def test_k_not_smaller_than_the_sample_count_is_a_clear_error(tmp_path):
    np.savez(tmp_path / "tiny.npz", x=np.random.default_rng(0).random((4, 8, 8)).astype(np.float32))
    config = load_config(ROOT / "configs/digits.yaml", [
        f"data.source={tmp_path / 'tiny.npz'}", f"data_dir={tmp_path / 'data'}",
        f"output_dir={tmp_path / 'run'}", "graph.k=4", "n_clusters=2"])
    with pytest.raises(ValueError, match=r"k=4 must be smaller than the number of samples"):
        train(config)


def test_unlabelled_data_needs_n_clusters(tmp_path):
    np.savez(tmp_path / "tiny.npz", x=np.random.default_rng(0).random((20, 8, 8)).astype(np.float32))
    config = load_config(ROOT / "configs/digits.yaml", [
        f"data.source={tmp_path / 'tiny.npz'}", f"data_dir={tmp_path / 'data'}",
        f"output_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match="set n_clusters"):
        train(config)


def test_cli_reports_an_unknown_dataset_by_name(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "sddecc_dist.cli", "prepare", "imagenet-42", "--out", str(tmp_path)],
        capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "imagenet-42" in out.stderr


def test_launch_script_rejects_unknown_override(tmp_path):
    out = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/digits.yaml", "train.epochz=1"],
        capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert "unknown key 'train.epochz'" in out.stderr


def _short_config(tmp_path, data_dir, run_name, *overrides):
    return load_config(ROOT / "configs/digits.yaml", [
        f"data_dir={data_dir}", f"output_dir={tmp_path / run_name}",
        "train.pretrain_epochs=2", "train.head_warmup_epochs=3", "train.joint_epochs=10",
        "train.checkpoint_every=5", "train.kmeans_n_init=2", *overrides])


def test_same_seed_gives_the_same_run_and_resume_continues_it_exactly(tmp_path):
    data_dir = tmp_path / "data"
    first = train(_short_config(tmp_path, data_dir, "a"))
    second = train(_short_config(tmp_path, data_dir, "b"))
    assert first["acc"] == second["acc"] and first["nmi"] == second["nmi"]
    a = (tmp_path / "a" / "assignments.txt").read_text()
    assert a == (tmp_path / "b" / "assignments.txt").read_text()
    # A shorter run (6 joint epochs) continued to the full 10 from its last checkpoint.
    train(_short_config(tmp_path, data_dir, "c", "train.joint_epochs=6"))
    resumed = train(_short_config(tmp_path, data_dir, "c", "train.resume=true"))
    assert (tmp_path / "c" / "assignments.txt").read_text() == a
    assert resumed["acc"] == first["acc"]

    # metrics.jsonl: the 6-epoch run's final line (joint epoch 6) was logged before the checkpoint
    # the longer run resumed from, so it stays, once; every other line is the uninterrupted run's.
    def logged(name):
        return [(r["phase"], r["epoch"], r.get("acc"), r.get("recon")) for r in RunFolder(tmp_path / name).read_metrics_log()]
    assert ("joint", 6) not in [line[:2] for line in logged("a")]
    assert [line[:2] for line in logged("c")].count(("joint", 6)) == 1
    assert [line for line in logged("c") if line[:2] != ("joint", 6)] == logged("a")


@pytest.mark.parametrize("refresh, expected_passes", [(1, 1 + 7), (3, 1 + 2)])
def test_joint_encoder_subset_encodes_the_other_nodes_every_refresh_steps(tmp_path, monkeypatch, refresh,
                                                                          expected_passes):
    """train.joint_encoder_nodes below N: the other nodes' no-grad codes come from
    graph_encoding, once for the warm-up and then every joint_encoding_refresh joint steps."""
    from sddecc_dist.model.sddecc import SDDECC

    passes = []
    original = SDDECC.graph_encoding

    def counted(self, x, *args, **kwargs):
        passes.append(len(x))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(SDDECC, "graph_encoding", counted)
    result = train(_short_config(tmp_path, tmp_path / "data", "run", "train.joint_encoder_nodes=500",
                                 f"train.joint_encoding_refresh={refresh}", "train.head_warmup_epochs=3"))
    # 3 warm-up epochs (one pass of all 1797), 7 joint steps: the 1297 others each step, or all
    # 1797 every third step, the first three reading the warm-up's pass (the encoder was frozen)
    assert passes == [1797] + ([1297] * 7 if refresh == 1 else [1797] * 2)
    assert len(passes) == expected_passes and result["n_samples"] == 1797


def test_bf16_autocast_and_gradient_accumulation_run_end_to_end(tmp_path):
    # bf16 autocast (on CPU here, on GPUs the same code path) must get through the sparse
    # propagation (kept in float32) and train; accumulation splits each batch of 128 in two.
    # Its own process: Accelerate's state (mixed precision included) is one per process.
    run = tmp_path / "bf16"
    out = subprocess.run(
        [sys.executable, "launch/train.py", "--config", "configs/digits.yaml", f"data_dir={tmp_path / 'data'}",
         f"output_dir={run}", "train.pretrain_epochs=5", "train.head_warmup_epochs=3", "train.joint_epochs=10",
         "train.kmeans_n_init=2", "train.mixed_precision=bf16", "train.gradient_accumulation_steps=2"],
        capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    recon = [line["recon"] for line in lines if line["phase"] == "pretrain"]
    assert all(np.isfinite(recon)) and recon[-1] < 0.8 * recon[0]  # pretraining learned
    result = json.loads((run / "metrics.json").read_text())
    assert np.isfinite(result["nmi"]) and result["n_used_clusters"] >= 2


def test_global_batch_must_split_over_processes_and_accumulation(tmp_path):
    config = _short_config(tmp_path, tmp_path / "data", "odd", "train.pretrain_batch_size=63",
                           "train.gradient_accumulation_steps=2")
    with pytest.raises(ConfigError, match=r"pretrain_batch_size=63 is the global batch"):
        train(config)


def test_ward_start_gives_the_centres_and_q_y_of_its_partition(tmp_path):
    """train.center_init=ward with loss.cluster_prior=init and no joint epoch: the result is
    the initial partition, which must be Ward's along the kNN graph on the smoothed pretrained
    codes (recomputed here from pretrain.pt), with μ_y its cluster means and q(y) its sizes."""
    import torch
    from sklearn.cluster import AgglomerativeClustering
    from sklearn.metrics import adjusted_rand_score

    from sddecc_dist.data import load_all, read_manifest
    from sddecc_dist.graph import load_graph, to_scipy_csr
    from sddecc_dist.model.gcn import smooth
    from sddecc_dist.model.sddecc import SDDECC
    from sddecc_dist.pipeline import graph_path

    data_dir, run = tmp_path / "data", tmp_path / "ward"
    config = _short_config(tmp_path, data_dir, "ward", "train.center_init=ward", "loss.cluster_prior=init",
                           "train.center_init_smoothing=4", "train.head_warmup_epochs=0", "train.joint_epochs=0")
    result = train(config)
    initial = np.loadtxt(run / "initial_assignments.txt", dtype=int)
    assert (initial == np.loadtxt(run / "assignments.txt", dtype=int)).all()
    # assignments.csv too, its confidence empty: a Ward start has no posterior
    rows = (run / "assignments.csv").read_text().splitlines()
    assert rows[0] == "key,cluster,confidence" and len(rows) == 1 + len(initial)
    assert [row.split(",") for row in rows[1:3]] == [["000000000", str(initial[0]), ""], ["000000001", str(initial[1]), ""]]
    assert len(np.unique(initial)) == 10 and result["n_used_clusters"] == 10

    manifest = read_manifest(data_dir)
    images, _ = load_all(data_dir, manifest)
    model = SDDECC(tuple(manifest["image_shape"]), 10, config.model)
    model.load_state_dict(torch.load(run / "checkpoints" / "pretrain.pt", weights_only=False)["model"])
    adjacency, _ = load_graph(graph_path(data_dir, config.graph.k))
    codes = smooth(adjacency, model.mean_codes(images, "cpu"), 4).numpy()
    reference = AgglomerativeClustering(10, linkage="ward", connectivity=to_scipy_csr(adjacency)).fit(codes).labels_
    assert adjusted_rand_score(reference, initial) == pytest.approx(1.0)

    final = torch.load(run / "checkpoints" / "final.pt", weights_only=False)["model"]
    means = np.stack([codes[initial == c].mean(0) for c in range(10)])
    np.testing.assert_allclose(final["centers"].numpy(), means, atol=1e-4)
    np.testing.assert_allclose(final["cluster_prior"].numpy(), np.bincount(initial, minlength=10) / len(initial),
                               atol=1e-7)

    # The joint stage rerun alone from that pretraining (train.init_from), given a model file
    # written before q(y) was saved with the model: the same Ward start, deterministically.
    old_style = torch.load(run / "checkpoints" / "pretrain.pt", weights_only=False)
    del old_style["model"]["cluster_prior"]
    torch.save(old_style, tmp_path / "old-pretrain.pt")
    train(_short_config(tmp_path, data_dir, "ward-again", "train.center_init=ward", "loss.cluster_prior=init",
                        "train.center_init_smoothing=4", "train.head_warmup_epochs=0", "train.joint_epochs=0",
                        f"train.init_from={tmp_path / 'old-pretrain.pt'}"))
    assert (np.loadtxt(tmp_path / "ward-again" / "initial_assignments.txt", dtype=int) == initial).all()


def test_self_labelling_replaces_the_start_and_a_stopped_stage_repeats_exactly(tmp_path, monkeypatch):
    """train.self_label_epochs: the classifier's partition of the trained model (recomputed here
    from final.pt) replaces the start, with μ_y its clusters' mean codes and q(y) its sizes; a
    run stopped inside the stage repeats it from the start's checkpoint and ends the same."""
    import torch

    from sddecc_dist.data import load_all, read_manifest
    from sddecc_dist.model.initial_partition import keep_start_clusters
    from sddecc_dist.model.sddecc import SDDECC
    from sddecc_dist.train.distributed import Preempted, StopSignal

    data_dir = tmp_path / "data"
    keys = ("model.self_label_head=true", "train.self_label_epochs=8", "train.joint_epochs=0",
            "train.head_warmup_epochs=0", "train.pretrain_epochs=12", "train.center_init=kmeans",
            "loss.recon_weight=1")
    config = _short_config(tmp_path, data_dir, "a", *keys)
    result = train(config)
    run = tmp_path / "a"
    start = np.loadtxt(run / "initial_assignments.txt", dtype=int)
    labels = np.loadtxt(run / "self_label_assignments.txt", dtype=int)
    assert (labels == np.loadtxt(run / "assignments.txt", dtype=int)).all() and result["n_used_clusters"] == 10
    # it learnt the start (most samples keep their cluster) without copying it
    assert 0.6 < (labels == start).mean() < 1.0
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [line["phase"] for line in lines].count("self_label") == 1

    manifest = read_manifest(data_dir)
    images, _ = load_all(data_dir, manifest)
    model = SDDECC(tuple(manifest["image_shape"]), 10, config.model)
    model.load_trained(torch.load(run / "checkpoints" / "final.pt", weights_only=False)["model"])
    model.eval()
    with torch.no_grad():
        encoded = model.encode(images)
    # the classifier's partition, with any cluster it emptied given back its start members
    assert (keep_start_clusters(encoded.logits.argmax(1).numpy(), start) == labels).all()
    # and assignments.csv's confidence: the classifier's probability of each sample's cluster
    table = np.genfromtxt(run / "assignments.csv", delimiter=",", skip_header=1)
    probabilities = torch.softmax(encoded.logits, dim=1).numpy()
    assert (table[:, 1] == labels).all()
    np.testing.assert_allclose(table[:, 2], probabilities[np.arange(len(labels)), labels], atol=2e-6)
    codes = encoded.mean.numpy()
    means = np.stack([codes[labels == c].mean(0) for c in range(10)])
    np.testing.assert_allclose(model.centers.detach().numpy(), means, atol=1e-4)
    np.testing.assert_allclose(model.cluster_prior.numpy(), np.bincount(labels, minlength=10) / len(labels),
                               atol=1e-7)

    # SIGTERM at the stage's 7th step: the run stops without finishing, the resumed one repeats
    # the stage from the start's checkpoint and ends exactly as the uninterrupted run
    calls = {"n": 0}

    def signal_once(self, accelerator):
        calls["n"] += 1
        return 15 if calls["n"] == 12 * 14 + 7 else 0  # after pretraining's 12 epochs of 14 steps

    monkeypatch.setattr(StopSignal, "agreed", signal_once)
    with pytest.raises(Preempted):
        train(_short_config(tmp_path, data_dir, "b", *keys))
    assert not (tmp_path / "b" / "self_label_assignments.txt").exists()
    train(_short_config(tmp_path, data_dir, "b", *keys, "train.resume=true"))
    assert (tmp_path / "b" / "assignments.txt").read_text() == (run / "assignments.txt").read_text()


def test_warm_up_towards_the_ward_start_learns_it_and_resumes_exactly(tmp_path):
    """train.head_warmup_target=start: the GCN first learns the initial partition (read back
    from initial_assignments.txt when a run resumes inside the warm-up, and the graph cut along
    it again: train.joint_graph=within_start)."""
    data_dir = tmp_path / "data"
    keys = ("train.center_init=ward", "loss.cluster_prior=init", "train.head_warmup_target=start",
            "train.head_warmup_epochs=8", "train.eval_every=1", "train.joint_graph=within_start")
    train(_short_config(tmp_path, data_dir, "a", *keys))
    lines = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    start_ce = [line["start_ce"] for line in lines if "start_ce" in line]
    # from about log 10 (a random head) to well below it: the head fits the start's labels
    assert len(start_ce) == 8 and start_ce[-1] < 0.7 * np.log(10) < start_ce[0]
    # interrupted after joint epoch 6 (checkpoint at 5, inside the warm-up), then resumed
    train(_short_config(tmp_path, data_dir, "c", *keys, "train.joint_epochs=6"))
    train(_short_config(tmp_path, data_dir, "c", *keys, "train.resume=true"))
    assert (tmp_path / "c" / "assignments.txt").read_text() == (tmp_path / "a" / "assignments.txt").read_text()


def test_warm_up_ends_at_the_first_epoch_the_gcn_agrees_with_the_start(tmp_path):
    """train.head_warmup_agreement: the warm-up's remaining epochs are skipped after the first
    epoch whose Y names the start's cluster of the required share of nodes (each warm-up line's
    start_match); up to that epoch the run is the full warm-up's, and a run resumed after the
    skip continues it exactly."""
    data_dir = tmp_path / "data"
    keys = ("train.center_init=ward", "loss.cluster_prior=init", "train.head_warmup_target=start",
            "train.head_warmup_epochs=12", "train.joint_epochs=14", "train.eval_every=1",
            "train.joint_graph=within_start", "train.checkpoint_every=100")

    def lines(name):  # without the wall time and memory, which vary from run to run
        return {r["epoch"]: {k: v for k, v in r.items() if k not in ("epoch_seconds", "peak_memory_mib")}
                for r in RunFolder(tmp_path / name).read_metrics_log() if r["phase"] == "joint"}

    full = train(_short_config(tmp_path, data_dir, "full", *keys))
    match = [lines("full")[e]["start_match"] for e in range(1, 13)]
    assert "start_match" not in lines("full")[13]  # a warm-up figure
    # a share first reached at some epoch before the last of the warm-up: the run must end there
    target = max(match[:8])
    ended = 1 + next(e for e, share in enumerate(match) if share >= target)
    assert ended < 12 and target > match[0], f"the head did not learn the start: {match}"
    # between the reached count of nodes and one fewer
    early_end = (f"train.head_warmup_agreement={target - 0.5 / full['n_samples']}",)

    early = train(_short_config(tmp_path, data_dir, "early", *keys, *early_end))
    logged = lines("early")
    assert sorted(logged) == list(range(1, ended + 1)) + [13, 14]
    assert all(logged[e] == lines("full")[e] for e in range(1, ended + 1))  # the same run until then
    state = json.loads(sorted((tmp_path / "early" / "checkpoints").glob("*/trainer_state.json"))[-1].read_text())
    assert state["head_warmup_ended"] == ended and early["epoch"] == full["epoch"] == 14
    # metrics.json's wall time of each stage: they make up the run (whose seconds stop before the
    # finish writes its last files)
    stages = early["stage_seconds"]
    assert list(stages) == ["setup", "pretrain", "start", "joint", "finish"] and min(stages.values()) >= 0
    assert sum(stages.values()) - stages["finish"] <= early["seconds"] <= sum(stages.values()) + 1.0

    # stopped one joint epoch after the skip, then resumed: the uninterrupted run's result
    train(_short_config(tmp_path, data_dir, "resumed", *keys, *early_end, "train.joint_epochs=13"))
    train(_short_config(tmp_path, data_dir, "resumed", *keys, *early_end, "train.resume=true"))
    assert (tmp_path / "resumed" / "assignments.txt").read_text() == (tmp_path / "early" / "assignments.txt").read_text()


@pytest.mark.parametrize("sampler", ["full", "cluster"])
def test_both_joint_samplers_keep_the_same_run_contract(tmp_path, sampler):
    """The loop knows no sampler: the whole-graph and the Cluster-GCN sampler write the same
    run folder (metrics keys, one scored joint line per eval, every sample assigned), and a
    checkpoint of one sampler is not resumed by the other."""
    from sddecc_dist.run_folder import RunFolder

    overrides = [f"train.joint_sampler={sampler}", "train.partition_size=200", "train.partitions_per_batch=3",
                 "train.pretrain_epochs=20", "train.head_warmup_epochs=10", "train.joint_epochs=20",
                 "train.eval_every=10"]
    result = train(_short_config(tmp_path, tmp_path / "data", "run", *overrides))
    run = RunFolder(tmp_path / "run")
    metrics = run.read_metrics()
    assert {"acc", "nmi", "ari", "n_samples", "n_clusters", "n_used_clusters", "epoch", "seconds",
            "world_size"} <= metrics.keys()
    assert metrics == {**result, "parameter_sha256_per_rank": result["parameter_sha256_per_rank"]}
    joint = [line for line in run.read_metrics_log() if line["phase"] == "joint"]
    assert [line["epoch"] for line in joint] == [10, 20] and all("acc" in line for line in joint)
    assert run.read_assignments().shape == (1797,) and metrics["n_used_clusters"] >= 2
    assert metrics["acc"] >= 0.2  # a short schedule, but no full collapse (one cluster scores about 0.10)
    other = "cluster" if sampler == "full" else "full"
    with pytest.raises(ConfigError, match=f"written with the joint sampler .*'{sampler}'"):
        train(_short_config(tmp_path, tmp_path / "data", "run", *overrides, f"train.joint_sampler={other}",
                            "train.resume=true"))


def test_a_checkpoint_of_the_old_format_is_refused_clearly(tmp_path):
    legacy = tmp_path / "run" / "checkpoints" / "ckpt-1-00005-0000000"
    legacy.mkdir(parents=True)
    (legacy / "position.json").write_text('{"phase": "joint", "epoch": 5, "step": 0}')
    with pytest.raises(ConfigError, match="written by an older sddecc-dist"):
        train(_short_config(tmp_path, tmp_path / "data", "run", "train.resume=true"))


def test_pretraining_batches_from_memory_cover_every_sample_once_per_epoch(tmp_path):
    """train.pretrain_source=memory: each epoch a seeded permutation of the rank's samples, the
    same images the shards hold; two ranks split the samples and take equal step counts."""
    import torch

    from sddecc_dist.data import load_all, read_manifest
    from sddecc_dist.pipeline import prepare_dataset
    from sddecc_dist.train.samplers import PretrainBatches

    prepare_dataset("digits", tmp_path / "data", samples_per_shard=600)
    manifest = read_manifest(tmp_path / "data")
    images, _ = load_all(tmp_path / "data", manifest)
    config = load_config(ROOT / "configs/digits.yaml", [f"data_dir={tmp_path / 'data'}", "train.pretrain_source=memory"])
    batches = PretrainBatches(config, manifest, 100, 0, 1, torch.device("cpu"), images)
    epoch = [x for _, _, x, _ in batches.epoch(3)]
    assert all(torch.equal(images[ids], x) for _, ids, x, _ in batches.epoch(3))  # each batch's ids name its images
    assert len(epoch) == batches.steps_per_epoch == 18 and sum(len(x) for x in epoch) == 1797
    seen = torch.cat(epoch)
    # every image exactly once: match each batch row to its image
    index = {tuple(img.flatten().tolist()): i for i, img in enumerate(images)}
    rows = [index[tuple(img.flatten().tolist())] for img in seen]
    assert len(rows) == len(set(rows)) == len(index)  # digits has no two identical images
    again = torch.cat([x for _, _, x, _ in batches.epoch(3)])
    assert torch.equal(seen, again) and not torch.equal(seen, torch.cat([x for _, _, x, _ in batches.epoch(4)]))
    resumed = [x for _, _, x, _ in batches.epoch(3, start_step=5)]
    assert torch.equal(torch.cat(resumed), torch.cat(epoch[5:]))
    # two ranks: shards 0, 2 and 1 (600 + 597 and 600 samples), the same number of full batches
    ranks = [PretrainBatches(config, manifest, 100, r, 2, torch.device("cpu"), images) for r in range(2)]
    per_rank = [[x for _, _, x, _ in b.epoch(0)] for b in ranks]
    assert [len(p) for p in per_rank] == [8, 8] and all(len(x) == 100 for p in per_rank for x in p)
    first = {index[tuple(img.flatten().tolist())] for img in torch.cat(per_rank[0])}
    second = {index[tuple(img.flatten().tolist())] for img in torch.cat(per_rank[1])}
    assert first.isdisjoint(second) and max(second) < 1200 <= max(first)


@pytest.mark.parametrize("sampler", ["full", "cluster"])
def test_a_sampler_cut_along_a_partition_propagates_only_inside_its_clusters(tmp_path, sampler):
    """train.joint_graph=within_start: after keep_edges_within, Â (for inference) and every batch's
    adjacency join only nodes of one cluster, and Â is the renormalised cut graph."""
    import scipy.sparse as sp

    from sddecc_dist.data import read_manifest
    from sddecc_dist.graph import renormalize, to_scipy_csr
    from sddecc_dist.pipeline import prepare_dataset
    from sddecc_dist.train.distributed import make_accelerator
    from sddecc_dist.train.samplers import build_joint_sampler

    prepare_dataset("digits", tmp_path / "data", samples_per_shard=600)
    config = load_config(ROOT / "configs/digits.yaml", [f"data_dir={tmp_path / 'data'}", f"train.joint_sampler={sampler}",
                                                        "train.partition_size=200", "train.partitions_per_batch=3"])
    built = build_joint_sampler(config, read_manifest(tmp_path / "data"), make_accelerator(config))
    whole = built.sym_adjacency.copy()
    partition = np.random.default_rng(0).integers(0, 4, size=1797)
    kept = built.keep_edges_within(partition)
    coo = whole.tocoo()
    inside = partition[coo.row] == partition[coo.col]
    assert kept == pytest.approx(inside.mean()) and 0.1 < kept < 0.5  # four random clusters keep about 1/4
    expected = sp.csr_matrix((coo.data[inside], (coo.row[inside], coo.col[inside])), shape=whole.shape)
    expected = to_scipy_csr(renormalize(expected + sp.identity(1797, format="csr")))
    assert abs(built.adjacency_sp - expected).max() < 1e-7
    assert (to_scipy_csr(built.adjacency.cpu()) != built.adjacency_sp).nnz == 0
    for _, batch in built.epoch(0):
        rows = batch.adjacency.to_sparse_coo().coalesce().indices()
        ids = partition[batch.ids.numpy()]
        assert (ids[rows[0].numpy()] == ids[rows[1].numpy()]).all()


def test_pretraining_learning_rate_warm_up_is_linear_then_constant():
    from sddecc_dist.train.loop import warmed_up_lr

    assert [warmed_up_lr(1e-3, s, 4) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert warmed_up_lr(1e-3, 0, 0) == 1e-3  # 0: no warm-up
