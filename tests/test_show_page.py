"""`sddecc show`: a run's page loaded in real headless Chromium (every image decodes, the console
logs no error, a screenshot is kept), a browser check that does catch a broken page, and the
page's parts against closed forms."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headless_chromium import find_browser, load_page
from sddecc_dist.cli import main
from sddecc_dist.eval.page import (
    SHEET_COLUMNS,
    _matched_order,
    _shown_members,
    contact_sheet,
    read_assignments_with_confidence,
    write_page,
)
from sddecc_dist.run_folder import RunFolder, RunFolderError


@pytest.fixture(scope="module")
def browser() -> str:
    path = find_browser()
    assert path, "the page test needs headless Chromium: apt-get install chromium (the README's test command does)"
    return path


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


def test_the_browser_check_catches_a_broken_image_and_a_console_error(browser, tmp_path):
    Image.new("L", (3, 2), 128).save(tmp_path / "fine.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "index.html").write_text(
        "<!DOCTYPE html><html><body><img src='fine.png'><img src='broken.png'><img src='missing.png'>"
        "<script>console.error('something went wrong')</script></body></html>")
    load = load_page((tmp_path / "index.html").as_uri(), browser)
    widths = {image["src"]: image["naturalWidth"] for image in load.images}
    assert widths == {"fine.png": 3, "broken.png": 0, "missing.png": 0}
    assert any("something went wrong" in error for error in load.errors)


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


def test_contact_sheet_layout_against_its_closed_form():
    rng = np.random.default_rng(0)
    top = [torch.from_numpy(rng.random((1, 8, 8), dtype=np.float32)) for _ in range(10)]
    bottom = [torch.from_numpy(rng.random((1, 8, 8), dtype=np.float32)) for _ in range(3)]
    sheet = contact_sheet(top, bottom)
    scale, pad = 6, 2  # ceil(48 / 8); 2-pixel gaps
    tile = 8 * scale
    rows = 2 + 1  # ten images in rows of eight, then three
    assert SHEET_COLUMNS == 8
    assert sheet.size == (8 * (tile + pad) + pad, rows * (tile + pad) + pad + 4 * pad)
    pixels = np.asarray(sheet)
    expected = np.kron((top[0][0].numpy() * 255).round().astype(np.uint8), np.ones((scale, scale), np.uint8))
    assert np.array_equal(pixels[pad:pad + tile, pad:pad + tile], expected)
    second_row_y = pad + (tile + pad)  # top[8] opens the second row
    expected = np.kron((top[8][0].numpy() * 255).round().astype(np.uint8), np.ones((scale, scale), np.uint8))
    assert np.array_equal(pixels[second_row_y:second_row_y + tile, pad:pad + tile], expected)
    bottom_y = pad + 2 * (tile + pad) + 4 * pad
    expected = np.kron((bottom[0][0].numpy() * 255).round().astype(np.uint8), np.ones((scale, scale), np.uint8))
    assert np.array_equal(pixels[bottom_y:bottom_y + tile, pad:pad + tile], expected)
    rgb = contact_sheet([torch.rand(3, 30, 20)], [])
    assert rgb.mode == "RGB" and rgb.size == (8 * (40 + pad) + pad, 60 + 2 * pad)  # 30 high, 20 wide: scale 2
    assert contact_sheet([], []) is None


def test_shown_members_are_each_clusters_extremes():
    rng = np.random.default_rng(1)
    clusters = rng.integers(0, 3, size=300)
    clusters[:3] = 3  # cluster 3: three members; cluster 4: none
    confidence = rng.random(300)
    shown = _shown_members(clusters, confidence, 5, per_cluster=5, seed=0)
    for c in (0, 1, 2):
        members = np.flatnonzero(clusters == c)
        order = members[np.argsort(-confidence[members])]
        assert list(shown[c][0]) == list(order[:5])  # most confident first
        assert list(shown[c][1]) == list(order[::-1][:5])  # least confident first
    assert sorted(shown[3][0]) == [0, 1, 2] and len(shown[3][1]) == 0  # three members: each shown once
    assert len(shown[4][0]) == 0 and len(shown[4][1]) == 0
    sampled = _shown_members(clusters, None, 5, per_cluster=5, seed=0)
    assert all(np.all(clusters[sampled[c][0]] == c) and len(sampled[c][1]) == 0 for c in range(5))
    assert len(sampled[0][0]) == 5


def test_confusion_columns_follow_the_matched_classes():
    permutation = np.array([2, 0, 3, 1])
    contingency = np.zeros((4, 5), dtype=np.int64)
    contingency[np.arange(4), permutation] = 50  # class i lives in cluster permutation[i]
    contingency[0, 4] = 3  # cluster 4 matches no class: last
    assert list(_matched_order(contingency)) == [2, 0, 3, 1, 4]


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
