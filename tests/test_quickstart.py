"""The README's quickstart (the default recipe on scikit-learn's digits), run once for this
module, and every test that reads its run: its result against raw k-means, the run folder's
artifacts, `sddecc evaluate`, and `sddecc show`'s page of it in headless Chromium (the page's
parts against closed forms are in tests/test_show_page.py). One module, so that one pytest-xdist
worker makes the run and reads it: no other worker waits for it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headless_chromium import load_page
from sddecc_dist.cli import main
from sddecc_dist.config import load_config
from sddecc_dist.eval.page import read_assignments_with_confidence, write_page
from sddecc_dist.run_folder import RunFolder, RunFolderError
from sddecc_dist.train.loop import train

ROOT = Path(__file__).resolve().parent.parent
# The README's quickstart: the default recipe, unchanged, on scikit-learn's digits.
QUICKSTART = ["configs/default.yaml", "data.source=digits"]


@pytest.fixture(scope="module")
def quickstart_run(tmp_path_factory):
    """The README's quickstart in a temporary folder (about two minutes): its result (the run's
    metrics.json), and the folder holding data/ and run/. A test may add files to the run, such
    as the page, but copies the run before it changes any of the run's own."""
    tmp = tmp_path_factory.mktemp("quickstart")
    train(load_config(ROOT / QUICKSTART[0], [*QUICKSTART[1:], f"data_dir={tmp / 'data'}", f"output_dir={tmp / 'run'}"]))
    return json.loads((tmp / "run" / "metrics.json").read_text()), tmp


def test_quickstart_uses_every_cluster_and_beats_raw_kmeans(quickstart_run, tmp_path):
    """The generality suite's digits row (tests/test_generality.py has the other two fast sets):
    no collapse, and ACC above raw-pixel k-means by the suite's margin of 0.03. With the start's
    size floor (`train.start_min_share: 0.2`) seeds 0 to 2 give 0.899, 0.952 and 0.899 against
    raw k-means' 0.792 (without it 0.880, 0.885 and 0.821: docs/generality.md)."""
    from sddecc_dist.eval.baselines import kmeans_on_pixels

    result, tmp = quickstart_run
    assert result["n_samples"] == 1797 and result["n_clusters"] == 10
    assert result["n_used_clusters"] == 10 and result["warnings"] == [], result
    assert result["health"]["size_max"] <= 3.0 / 10, result["health"]
    kmeans = kmeans_on_pixels(tmp / "data", tmp_path / "kmeans")
    assert result["acc"] >= kmeans["acc"] + 0.03, (result["acc"], kmeans["acc"])
    assert result["nmi"] >= 0.80, result


def test_run_folder_holds_every_artifact(quickstart_run):
    result, tmp = quickstart_run
    run = tmp / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"acc", "nmi", "ari", "n_samples", "n_clusters", "seconds", "epoch"} <= metrics.keys()
    assert metrics["epoch"] == load_config(ROOT / QUICKSTART[0]).train.joint_epochs
    assignments = np.loadtxt(run / "assignments.txt", dtype=int)
    assert assignments.shape == (1797,) and assignments.min() >= 0 and assignments.max() < 10
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {line["phase"] for line in lines} == {"pretrain", "kmeans", "self_label", "joint"}
    for name in ("initial_assignments.txt", "self_label_assignments.txt"):  # the start, the self-labelled start
        assert np.loadtxt(run / name, dtype=int).shape == (1797,)
    # label-free health on every scored line and at the end (eval/health.py)
    for line in lines:
        if line["phase"] != "pretrain":
            assert {"clusters_used", "size_min", "size_max", "size_entropy", "silhouette"} <= line.keys(), line
    assert all("start_agreement" in line for line in lines if line["phase"] in ("self_label", "joint"))
    assert metrics["health"]["clusters_used"] == metrics["n_used_clusters"] == 10
    assert metrics["warnings"] == [] and metrics["peak_rss_mib"] > 0
    # the final metrics are the last epoch's assignments, scored again from the file
    from sddecc_dist.eval.metrics import clustering_scores
    from sklearn.datasets import load_digits
    assert clustering_scores(load_digits().target, assignments)["acc"] == pytest.approx(metrics["acc"])
    for name in ("pretrain.pt", "final.pt"):
        assert (run / "checkpoints" / name).stat().st_size > 0
    assert load_config(run / "config.yaml").output_dir == str(run)
    assert (tmp / "data" / "dataset.json").exists() and (tmp / "data" / "graph-k3.pt").exists()


def test_evaluate_command_rescores_the_assignments(quickstart_run, capsys):
    from sddecc_dist.cli import main

    result, tmp = quickstart_run
    assert main(["evaluate", str(tmp / "run"), "--data-dir", str(tmp / "data")]) == 0
    assert f"acc {result['acc']:.4f}" in capsys.readouterr().out


def _figures(run: Path, labelled: bool = True) -> list[str]:
    clusters = np.unique(RunFolder(run).read_assignments())
    return sorted(["sizes.png", "curves.png", "map.png"] + (["confusion.png"] if labelled else [])
                  + [f"cluster-{c:03d}.png" for c in clusters])


def test_the_page_of_a_real_run_loads_in_headless_chromium(quickstart_run, browser, tmp_path):
    run = quickstart_run[1] / "run"  # the README's quickstart: digits, the default recipe
    page = write_page(run, per_cluster=8, map_samples=1000)
    assert page == run / "report" / "index.html"

    load = load_page(page.as_uri(), browser)
    shot = tmp_path / "show-page.png"
    shot.write_bytes(load.screenshot)
    print(f"screenshot: {shot}")  # pytest -s; tmp_path is kept for the last three sessions
    assert sorted(image["src"] for image in load.images) == _figures(run)
    assert len(load.images) == 4 + 10  # every cluster used: ten contact sheets
    undecoded = [image for image in load.images if not (image["complete"] and image["naturalWidth"] > 0)]
    assert undecoded == []
    assert load.errors == []
    with Image.open(shot) as image:  # the whole page, not the first screen only
        assert image.format == "PNG" and image.width >= 1000 and image.height > 2000
        assert len(np.unique(np.asarray(image.convert("RGB")).reshape(-1, 3), axis=0)) > 200
    text = page.read_text()
    metrics = RunFolder(run).read_metrics()
    assert f"{metrics['acc']:.4f} / {metrics['nmi']:.4f} / {metrics['ari']:.4f}" in text
    assert "http://" not in text and "https://" not in text  # nothing fetched from a network
    assert not list((run / "report").glob(".*tmp*")), "temporary files left behind"


def test_a_run_without_confidences_shows_a_sample_of_each_cluster(quickstart_run, browser, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run[1] / "run", run)
    lines = (run / "assignments.csv").read_text().splitlines()  # a Ward or k-means start: no posterior
    (run / "assignments.csv").write_text("\n".join([lines[0]] + [line.rsplit(",", 1)[0] + "," for line in lines[1:]])
                                         + "\n")
    load = load_page(write_page(run, data_dir=quickstart_run[1] / "data", per_cluster=4, map_samples=300).as_uri(),
                     browser)
    assert sorted(image["src"] for image in load.images) == _figures(run)
    assert all(image["naturalWidth"] > 0 for image in load.images) and load.errors == []
    assert "a random sample of each cluster's members" in (run / "report" / "index.html").read_text()
    # some rows with a confidence and some without: named, not guessed
    lines = (run / "assignments.csv").read_text().splitlines()
    lines[1] += "0.5"
    (run / "assignments.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFolderError, match="line 3 has no confidence but others have one"):
        read_assignments_with_confidence(RunFolder(run))


def test_show_prints_the_file_url_and_refuses_an_unfinished_run(quickstart_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run[1] / "run", run)
    assert main(["show", str(run), "--open", "--per-cluster", "2", "--map-samples", "200"]) == 0
    assert capsys.readouterr().out.strip() == (run / "report" / "index.html").resolve().as_uri()
    (run / "metrics.json").unlink()
    with pytest.raises(RunFolderError, match="finished run"):
        write_page(run)


def test_a_malformed_assignments_table_names_its_line(quickstart_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(quickstart_run[1] / "run", run)
    clusters, confidence = read_assignments_with_confidence(RunFolder(run))
    assert np.array_equal(clusters, RunFolder(run).read_assignments()) and confidence.min() > 0
    lines = (run / "assignments.csv").read_text().splitlines()
    lines[5] = lines[5].split(",")[0] + ",seven,0.5"
    (run / "assignments.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(RunFolderError, match="line 6"):
        read_assignments_with_confidence(RunFolder(run))
