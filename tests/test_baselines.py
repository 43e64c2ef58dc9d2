"""k-means on raw pixels (Table 3's K-means row): same result as scikit-learn on the same
pixels, scores recomputable from the assignments, a run folder like the trainer's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml
from sklearn.cluster import KMeans
from sklearn.datasets import load_digits

from sddecc_dist.eval.baselines import kmeans_on_pixels
from sddecc_dist.data import DataError, load_all
from sddecc_dist.eval.metrics import cluster_acc, clustering_scores
from sddecc_dist.pipeline import prepare_dataset


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits-data")
    prepare_dataset("digits", out)
    return out


@pytest.fixture(scope="module")
def digits_baseline(digits_dir, tmp_path_factory):
    run = tmp_path_factory.mktemp("kmeans-run")
    return kmeans_on_pixels(digits_dir, run, seed=0, n_init=10), run


def test_shards_hold_the_digits_pixels_scaled_to_unit_range(digits_dir):
    images, labels = load_all(digits_dir)
    digits = load_digits()
    assert np.array_equal(images.flatten(1).numpy(), digits.data.astype(np.float32) / 16)
    assert np.array_equal(labels.numpy(), digits.target)


def test_assignments_equal_scikit_learn_kmeans_on_the_same_pixels(digits_baseline):
    result, run = digits_baseline
    pixels = load_digits().data.astype(np.float32) / 16  # sources.py: values 0..16, range (0, 16)
    expected = KMeans(10, n_init=10, random_state=0).fit_predict(pixels)
    assignments = np.loadtxt(run / "assignments.txt", dtype=np.int64)
    assert np.array_equal(assignments, expected)


def test_scores_are_those_of_the_written_assignments(digits_baseline):
    result, run = digits_baseline
    assignments = np.loadtxt(run / "assignments.txt", dtype=np.int64)
    target = load_digits().target
    assert result["acc"] == pytest.approx(cluster_acc(target, assignments))
    assert {k: result[k] for k in ("acc", "nmi", "ari")} == pytest.approx(clustering_scores(target, assignments))


def test_raw_pixel_kmeans_reaches_its_known_quality_on_digits(digits_baseline):
    # Measured with n_init=10, seeds 0..3: ACC 0.790..0.796, NMI 0.739..0.743.
    result, _ = digits_baseline
    assert result["acc"] >= 0.75, result
    assert result["nmi"] >= 0.70, result


def test_run_folder_matches_the_trainer_layout(digits_baseline, digits_dir):
    result, run = digits_baseline
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics == result
    assert metrics["method"] == "K-means" and metrics["dataset"] == "digits" and metrics["seed"] == 0
    assert metrics["epoch"] == 0 and metrics["selection"] == "k-means on raw pixels (no training)"
    assert metrics["n_samples"] == 1797 and metrics["n_clusters"] == 10
    assert metrics["assignments"] == "assignments.txt"
    assert metrics["seconds"] >= 0 and metrics["peak_memory_mib"] > 0
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["baseline"] == "kmeans-pixels" and config["n_init"] == 10 and config["seed"] == 0
    assert config["data_dir"] == str(digits_dir) and config["name"] == "digits"
    assert not list(run.glob(".*tmp*")), "temporary files left behind"


def test_n_clusters_overrides_the_manifest(digits_dir, tmp_path):
    result = kmeans_on_pixels(digits_dir, tmp_path / "k5", seed=1, n_init=1, n_clusters=5)
    assignments = np.loadtxt(tmp_path / "k5" / "assignments.txt", dtype=np.int64)
    assert result["n_clusters"] == 5 and set(assignments.tolist()) == set(range(5))


def test_folder_without_manifest_is_named(tmp_path):
    empty = tmp_path / "not-prepared"
    empty.mkdir()
    with pytest.raises(DataError, match="not-prepared.*dataset.json"):
        kmeans_on_pixels(empty, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_fewer_than_two_clusters_is_refused(digits_dir, tmp_path):
    with pytest.raises(ValueError, match="n_clusters=1 must be at least 2"):
        kmeans_on_pixels(digits_dir, tmp_path / "run", n_clusters=1)


def test_a_baseline_into_a_folder_holding_a_run_is_refused(digits_dir, digits_baseline):
    from sddecc_dist.run_folder import RunFolderError

    _, run = digits_baseline
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    with pytest.raises(RunFolderError, match="holds a run already"):
        kmeans_on_pixels(digits_dir, run, seed=1)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
