"""Figures 6 and 7: a t-SNE PNG from a real (tiny) run, the λ grid's averaging and its heatmaps;
the same run read back by `RunFolder.load_model` (the one model-file reader)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from sddecc_dist.data import DataError, RawDataset, load_all, write_shards
from sddecc_dist.eval.plots import (
    DPI,
    HEATMAP_FIGSIZE,
    TSNE_FIGSIZE,
    embedding_tsne,
    lambda_grid,
    lambda_heatmaps,
    sample_indices,
)
from sddecc_dist.pipeline import ensure_graph
from sddecc_dist.run_folder import RunFolder, RunFolderError

from conftest import short_digits_run


def _png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def _distinct_colours(pixels: np.ndarray) -> int:
    return len(np.unique(pixels.reshape(-1, 3), axis=0))


# ---- Figure 6 ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run on digits with a very short schedule (seconds): the trainer's own folder."""
    return short_digits_run(tmp_path_factory.mktemp("tiny"), pretrain=1, warmup=1, joint=2)


def test_tsne_png_of_a_real_run(tiny_run, tmp_path):
    out = embedding_tsne(tiny_run / "run", tmp_path / "figs" / "fig6.png", n_samples=400, seed=0)
    assert out == tmp_path / "figs" / "fig6.png" and out.is_file()
    pixels = _png(out)
    assert pixels.shape == (round(TSNE_FIGSIZE[1] * DPI), round(TSNE_FIGSIZE[0] * DPI), 3)
    # ten tab10 class colours plus text and antialiasing, not a blank canvas
    assert _distinct_colours(pixels) > 20
    assert not list(out.parent.glob(".*tmp*")), "temporary files left behind"


def test_tsne_of_the_pretrained_model(tiny_run, tmp_path):
    out = embedding_tsne(tiny_run / "run", tmp_path / "pre.png", n_samples=100, seed=1, model_file="pretrain")
    assert _distinct_colours(_png(out)) > 20


def test_trained_model_read_back_predicts_the_runs_assignments(tiny_run):
    run = RunFolder(tiny_run / "run")
    trained = run.load_model("final")
    config, manifest, model = trained.config, trained.manifest, trained.model
    assert config.output_dir == str(tiny_run / "run") and manifest["count"] == 1797
    assert (trained.phase, trained.epoch) == ("joint", config.train.joint_epochs)
    images, _ = load_all(config.data_dir, manifest)
    adjacency = ensure_graph(config.data_dir, config.graph.k, images)
    model.eval()
    with torch.no_grad():
        y = model.cluster_probabilities(images, model.encode(images), adjacency)
    saved = run.read_assignments()
    assert y.shape == (1797, model.n_clusters) and np.array_equal(y.argmax(1).numpy(), saved)


def test_sample_indices_are_seeded_and_capped():
    first, again = sample_indices(1797, 500, seed=3), sample_indices(1797, 500, seed=3)
    assert np.array_equal(first, again) and len(np.unique(first)) == 500
    assert np.all(np.diff(first) > 0) and first.max() < 1797
    assert not np.array_equal(first, sample_indices(1797, 500, seed=4))
    assert np.array_equal(sample_indices(100, 2000, seed=0), np.arange(100))  # fewer: all of them


def test_missing_model_file_is_named(tmp_path):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunFolderError, match=r"checkpoints[/\\]final\.pt does not exist"):
        embedding_tsne(tmp_path / "run", tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_dataset_without_labels_is_refused(tiny_run, tmp_path):
    images = np.zeros((20, 1, 8, 8), dtype=np.uint8)
    write_shards(RawDataset("unlabelled", images, None, (0.0, 16.0), None), tmp_path / "data")
    # the same model file, pointed at the unlabelled data
    state = torch.load(RunFolder(tiny_run / "run").model_file("final"), weights_only=False)
    state["config"]["data_dir"] = str(tmp_path / "data")
    copy = RunFolder(tmp_path / "run")
    copy.checkpoints.mkdir(parents=True)
    torch.save(state, copy.model_file("final"))
    with pytest.raises(DataError, match=r"dataset\.json.*no labels"):
        embedding_tsne(tmp_path / "run", tmp_path / "x.png")


# ---- Figure 7 ---------------------------------------------------------------------------------

def _fake_run(folder: Path, mi_weight: float, kl_weight: float, seed: int, acc: float, nmi: float,
              dataset: str = "usps") -> Path:
    folder.mkdir(parents=True)
    config = {"name": dataset, "data_dir": f"data/{dataset}", "seed": seed,
              "loss": {"recon_weight": 100.0, "mi_weight": mi_weight, "kl_weight": kl_weight}}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    metrics = {"acc": acc, "nmi": nmi, "ari": 0.5, "dataset": dataset, "method": "ConvAE+MI+GCN", "seed": seed,
               "n_samples": 9298, "epoch": 200, "selection": "final epoch", "seconds": 1.0}
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


@pytest.fixture
def grid_runs(tmp_path) -> list[Path]:
    """λ1 in {0.01, 0.1} x λ2 in {1, 1.5, 2}; (0.1, 2) has no run; (0.01, 1) has two seeds."""
    cells = [(0.1, 1.5, 0, 0.70, 0.71), (0.01, 1.0, 0, 0.60, 0.62), (0.01, 1.0, 1, 0.80, 0.70),
             (0.01, 1.5, 0, 0.65, 0.66), (0.01, 2.0, 0, 0.75, 0.76), (0.1, 1.0, 0, 0.55, 0.57)]
    return [_fake_run(tmp_path / f"l{l1}-k{l2}-s{s}", l1, l2, s, acc, nmi) for l1, l2, s, acc, nmi in cells]


def test_lambda_grid_averages_seeds_per_cell(grid_runs):
    lambda1, lambda2, acc, nmi = lambda_grid(grid_runs)
    assert lambda1.tolist() == [0.01, 0.1] and lambda2.tolist() == [1.0, 1.5, 2.0]
    expected_acc = np.array([[np.mean([0.60, 0.80]), 0.65, 0.75], [0.55, 0.70, np.nan]])
    expected_nmi = np.array([[np.mean([0.62, 0.70]), 0.66, 0.76], [0.57, 0.71, np.nan]])
    np.testing.assert_allclose(acc, expected_acc, equal_nan=True)
    np.testing.assert_allclose(nmi, expected_nmi, equal_nan=True)
    assert math.isnan(acc[1, 2]) and math.isnan(nmi[1, 2])


def test_lambda_heatmaps_write_two_pngs(grid_runs, tmp_path):
    acc_png, nmi_png = lambda_heatmaps(grid_runs, tmp_path / "fig7")
    assert acc_png == tmp_path / "fig7" / "fig7_acc.png" and nmi_png == tmp_path / "fig7" / "fig7_nmi.png"
    for path in (acc_png, nmi_png):
        pixels = _png(path)
        assert pixels.shape == (round(HEATMAP_FIGSIZE[1] * DPI), round(HEATMAP_FIGSIZE[0] * DPI), 3)
        assert _distinct_colours(pixels) > 20
    assert not list((tmp_path / "fig7").glob(".*tmp*"))


def test_run_without_metrics_is_named(grid_runs):
    (grid_runs[2] / "metrics.json").unlink()
    with pytest.raises(RunFolderError, match=f"{grid_runs[2].name}.*not finished \\(no metrics.json\\)"):
        lambda_grid(grid_runs)


def test_mixed_datasets_are_refused(grid_runs, tmp_path):
    other = _fake_run(tmp_path / "mnist-run", 0.01, 1.0, 5, 0.9, 0.9, dataset="mnist")
    with pytest.raises(ValueError, match="different datasets.*mnist.*usps"):
        lambda_grid([*grid_runs, other])


def test_the_same_run_twice_is_refused(grid_runs):
    with pytest.raises(ValueError, match="seed 0: give each run once"):
        lambda_grid([*grid_runs, grid_runs[0]])


def test_no_runs_is_refused():
    with pytest.raises(ValueError, match="no run folders"):
        lambda_grid([])
