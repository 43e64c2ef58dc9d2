"""`sddecc show`: a browser check that does catch a broken page, and the page's parts against
closed forms. The page of a real run, loaded in headless Chromium (every image decodes, the
console logs no error, a screenshot is kept), is tested on the README's quickstart run in
tests/test_quickstart.py."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from headless_chromium import load_page
from sddecc_dist.eval.page import SHEET_COLUMNS, _matched_order, _shown_members, contact_sheet


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


