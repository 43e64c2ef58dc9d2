"""Tests for the data layer: raw readers, checksummed downloads and webdataset shards."""

from __future__ import annotations

import functools
import gzip
import http.server
import io
import json
import shutil
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sddecc_dist.data import (
    DataError,
    RawDataset,
    load_all,
    load_source,
    read_manifest,
    sample_keys,
    shard_urls,
    stream_batches,
    verify_shards,
    write_shards,
)
from sddecc_dist.data import sources
from sddecc_dist.data.sources import parse_idx

DATASETS = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"
USPS_COUNTS = [1553, 1269, 929, 824, 852, 716, 834, 792, 708, 821]


@pytest.fixture(scope="module")
def digits() -> RawDataset:
    return load_source("digits")


@pytest.fixture()
def digit_shards(digits: RawDataset, tmp_path: Path) -> Path:
    out = tmp_path / "shards"
    write_shards(digits, out, samples_per_shard=500)
    return out


# ----------------------------------------------------------------------------- shards

def test_digits_shard_round_trip(digits: RawDataset, digit_shards: Path) -> None:
    manifest = read_manifest(digit_shards)
    assert manifest["format_version"] == 1
    assert manifest["name"] == "digits"
    assert manifest["count"] == 1797
    assert manifest["image_shape"] == [1, 8, 8]
    assert manifest["dtype"] == "uint8"
    assert manifest["value_range"] == [0.0, 16.0]
    assert manifest["n_classes"] == 10 and manifest["has_labels"]
    assert manifest["class_names"] == [str(d) for d in range(10)]
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s["count"] for s in manifest["shards"]] == [500, 500, 500, 297]
    assert [s["first_index"] for s in manifest["shards"]] == [0, 500, 1000, 1500]
    assert sorted(p.name for p in digit_shards.iterdir()) == ["dataset.json"] + [f"shard-{i:06d}.tar" for i in range(4)]

    # keys are zero-padded global indices; x.npy keeps the original dtype exactly
    with tarfile.open(digit_shards / "shard-000001.tar") as tar:
        names = tar.getnames()
        assert names[:2] == ["000000500.cls", "000000500.x.npy"]
        stored = np.load(io.BytesIO(tar.extractfile("000000503.x.npy").read()))
        assert tar.extractfile("000000503.cls").read() == str(digits.labels[503]).encode()
    assert stored.dtype == np.uint8 and np.array_equal(stored, digits.images[503])

    images, labels = load_all(digit_shards)
    expected = torch.from_numpy(digits.images.astype(np.float32) / 16.0)
    assert images.dtype == torch.float32 and images.shape == (1797, 1, 8, 8)
    assert torch.equal(images, expected)
    assert labels is not None and labels.dtype == torch.int64
    assert np.array_equal(labels.numpy(), digits.labels)
    verify_shards(digit_shards)
    assert shard_urls(digit_shards)[0] == str(digit_shards.resolve() / "shard-000000.tar")


def test_stream_batches_shuffled_covers_every_index_once(digits: RawDataset, digit_shards: Path) -> None:
    batches = list(stream_batches(digit_shards, batch_size=256, shuffle_buffer=400, seed=3))
    assert [len(b[0]) for b in batches] == [256] * 7 + [5]
    index = torch.cat([b[0] for b in batches])
    images = torch.cat([b[1] for b in batches])
    labels = torch.cat([b[2] for b in batches])
    assert index.dtype == torch.int64 and labels.dtype == torch.int64 and images.dtype == torch.float32
    assert sorted(index.tolist()) == list(range(1797))
    assert not torch.equal(index, torch.arange(1797))
    assert torch.equal(images, torch.from_numpy(digits.images[index.numpy()].astype(np.float32) / 16.0))
    assert torch.equal(labels, torch.from_numpy(digits.labels[index.numpy()]))

    again = torch.cat([b[0] for b in stream_batches(digit_shards, 256, shuffle_buffer=400, seed=3)])
    other = torch.cat([b[0] for b in stream_batches(digit_shards, 256, shuffle_buffer=400, seed=4)])
    assert torch.equal(index, again)
    assert not torch.equal(index, other)
    in_order = torch.cat([b[0] for b in stream_batches(digit_shards, 1000)])
    assert torch.equal(in_order, torch.arange(1797))


def test_unlabelled_float_shards_use_value_range(tmp_path: Path) -> None:
    x = np.linspace(-1, 1, 5 * 3 * 4 * 4, dtype=np.float32).reshape(5, 3, 4, 4)
    manifest = write_shards(RawDataset("toy", x, None, (-1.0, 1.0), None), tmp_path, samples_per_shard=2)
    assert manifest["has_labels"] is False and manifest["dtype"] == "float32" and len(manifest["shards"]) == 3
    images, labels = load_all(tmp_path)
    assert labels is None
    assert torch.allclose(images, torch.from_numpy((x + 1) / 2))
    (batch,) = list(stream_batches(tmp_path, 8))
    assert batch[2].tolist() == [-1] * 5


def test_manifest_errors(digit_shards: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="missing manifest"):
        read_manifest(tmp_path / "nowhere")
    (digit_shards / "dataset.json").write_text("{not json")
    with pytest.raises(DataError, match="invalid JSON"):
        read_manifest(digit_shards)
    (digit_shards / "dataset.json").write_text(json.dumps({"format_version": 1, "name": "x"}))
    with pytest.raises(DataError, match="lacks keys: count"):
        read_manifest(digit_shards)


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _overwrite_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 700] = b"\xff" * 700
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_cut_in_half, _overwrite_middle])
def test_damaged_shard_is_named(digit_shards: Path, damage) -> None:
    damage(digit_shards / "shard-000002.tar")
    name = "shard-000002.tar"
    with pytest.raises(DataError, match=name):
        verify_shards(digit_shards)
    with pytest.raises(DataError, match=name):
        load_all(digit_shards)
    with pytest.raises(DataError, match=name):  # the webdataset read path names it too
        load_all(digit_shards, verify=False)
    with pytest.raises(DataError, match=name):
        list(stream_batches(digit_shards, 100, shuffle_buffer=200))


def test_tar_read_error_names_shard(digit_shards: Path) -> None:
    """A cut inside a member's data makes tarfile raise; the webdataset handler must name the shard."""
    path = digit_shards / "shard-000001.tar"
    with tarfile.open(path) as tar:
        member = tar.getmember("000000700.x.npy")
    path.write_bytes(path.read_bytes()[: member.offset_data + 50])
    with pytest.raises(DataError, match=r"shard-000001\.tar: ReadError: unexpected end of data"):
        load_all(digit_shards, verify=False)


def test_cut_at_sample_boundary_is_caught_by_count(digit_shards: Path) -> None:
    """tarfile ends quietly when a tar is cut between members; the index check must notice."""
    path = digit_shards / "shard-000001.tar"
    with tarfile.open(path) as tar:
        member = tar.getmember("000000799.x.npy")
    path.write_bytes(path.read_bytes()[: member.offset_data + 512])
    with pytest.raises(DataError, match=r"200 samples missing, first 800 expected in .*shard-000001\.tar"):
        load_all(digit_shards, verify=False)
    with pytest.raises(DataError, match="shard-000001.tar"):
        list(stream_batches(digit_shards, 100))


def test_missing_shard_is_named(digit_shards: Path) -> None:
    (digit_shards / "shard-000003.tar").unlink()
    with pytest.raises(DataError, match="missing shard .*shard-000003.tar"):
        verify_shards(digit_shards)
    with pytest.raises(DataError, match="shard-000003.tar"):
        load_all(digit_shards, verify=False)


# ----------------------------------------------------------------------------- built-in sets

def test_usps_from_dir() -> None:
    raw = load_source("usps", from_dir=DATASETS / "usps")
    assert raw.images.shape == (9298, 1, 16, 16) and raw.images.dtype == np.float32
    assert raw.value_range == (-1.0, 1.0)
    assert raw.images.min() == -1.0 and raw.images.max() == 1.0
    assert raw.n_classes == 10
    assert np.bincount(raw.labels).tolist() == USPS_COUNTS
    assert len(load_source("usps", from_dir=DATASETS / "usps", split="train").images) == 7291
    assert len(load_source("usps", from_dir=DATASETS / "usps", split="test").images) == 2007


def test_mnist_from_dir() -> None:
    raw = load_source("mnist", from_dir=DATASETS / "mnist")
    assert raw.images.shape == (70000, 1, 28, 28) and raw.images.dtype == np.uint8
    assert raw.labels.shape == (70000,) and raw.labels.dtype == np.int64
    assert raw.value_range == (0.0, 255.0) and raw.n_classes == 10
    assert raw.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the well-known first MNIST training labels
    test = load_source("mnist", from_dir=DATASETS / "mnist", split="test")
    assert np.array_equal(test.images, raw.images[60000:])


def test_idx_files_may_be_uncompressed(tmp_path: Path) -> None:
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((DATASETS / "fashion-mnist" / f"{name}.gz").read_bytes()))
    raw = load_source("fmnist", from_dir=tmp_path, split="test")
    assert raw.name == "fashion-mnist" and raw.images.shape == (10000, 1, 28, 28)
    assert np.bincount(raw.labels).tolist() == [1000] * 10
    assert raw.class_names[0] == "T-shirt/top"


def test_from_dir_checksum_and_missing_files(tmp_path: Path) -> None:
    shutil.copy(DATASETS / "usps" / "zip.train.gz", tmp_path)
    with pytest.raises(DataError, match="missing file.*zip.test.gz"):
        load_source("usps", from_dir=tmp_path)
    data = bytearray((DATASETS / "usps" / "zip.test.gz").read_bytes())
    data[-20] ^= 0xFF
    (tmp_path / "zip.test.gz").write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum mismatch for .*zip.test.gz"):
        load_source("usps", from_dir=tmp_path)


def test_idx_validation() -> None:
    labels = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    assert parse_idx(labels, "labels", 1).tolist() == [1, 2, 3]
    with pytest.raises(DataError, match="corrupt IDX header in labels: magic number 00000901"):
        parse_idx(b"\x00\x00\x09\x01" + labels[4:], "labels", 1)
    with pytest.raises(DataError, match="header says shape"):
        parse_idx(labels[:-1], "labels", 1)
    images = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in (2, 2, 2)) + bytes(8)
    with pytest.raises(DataError, match="2 images but .* has 3 labels"):
        sources._load_idx_set("mnist", {"train-images-idx3-ubyte.gz": images, "train-labels-idx1-ubyte.gz": labels})


# ----------------------------------------------------------------------------- downloads

@pytest.fixture()
def serve() -> Iterator:
    """Start loopback HTTP servers on demand; yield a function folder -> base URL."""
    servers: list[http.server.ThreadingHTTPServer] = []

    class QuietHandler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

    def start(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_download_verifies_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, serve) -> None:
    good = tmp_path / "good"
    good.mkdir()
    for name in ("zip.train.gz", "zip.test.gz"):
        shutil.copy(DATASETS / "usps" / name, good)
    cache = tmp_path / "cache"
    monkeypatch.setenv("SDDECC_DATA_MIRROR", serve(good))
    raw = load_source("usps", cache_dir=cache)
    assert np.bincount(raw.labels).tolist() == USPS_COUNTS
    assert sorted(p.name for p in cache.iterdir()) == ["zip.test.gz", "zip.train.gz"]

    # a cached copy with the right checksum is reused (the mirror is now unreachable) ...
    monkeypatch.setenv("SDDECC_DATA_MIRROR", "http://127.0.0.1:9/")
    assert len(load_source("usps", cache_dir=cache, split="test").images) == 2007
    # ... and a damaged one is downloaded again
    (cache / "zip.test.gz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="could not download http://127.0.0.1:9/zip.test.gz"):
        load_source("usps", cache_dir=cache, split="test")
    monkeypatch.setenv("SDDECC_DATA_MIRROR", serve(good))
    assert len(load_source("usps", cache_dir=cache, split="test").images) == 2007
    assert (cache / "zip.test.gz").read_bytes() == (good / "zip.test.gz").read_bytes()

    bad = tmp_path / "bad"
    bad.mkdir()
    data = bytearray((good / "zip.train.gz").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bad / "zip.train.gz").write_bytes(bytes(data))
    monkeypatch.setenv("SDDECC_DATA_MIRROR", serve(bad))
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError, match="checksum mismatch for zip.train.gz downloaded from http://127.0.0.1"):
        load_source("usps", cache_dir=fresh, split="train")
    assert list(fresh.iterdir()) == []  # no partial or unverified file is left behind


def test_download_table_names_every_file() -> None:
    for name, rows in sources.DATASET_FILES.items():
        for filename, url, md5, kind in rows:
            assert url.endswith("/" + filename) and len(md5) == 32 and kind in ("content", "file"), name


# ----------------------------------------------------------------------------- npz and folders

def test_npz_with_and_without_labels(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 256, size=(6, 5, 5, 3), dtype=np.uint8)  # channels last
    np.savez(tmp_path / "rgb.npz", x=x, y=np.array([3, 7, 3, 7, 9, 9]))
    raw = load_source(str(tmp_path / "rgb.npz"))
    assert raw.name == "rgb" and raw.images.shape == (6, 3, 5, 5)
    assert np.array_equal(raw.images, x.transpose(0, 3, 1, 2))
    assert raw.labels.tolist() == [0, 1, 0, 1, 2, 2] and raw.n_classes == 3
    assert raw.class_names == ["3", "7", "9"] and raw.value_range == (0.0, 255.0)

    np.savez(tmp_path / "gray.npz", x=np.full((4, 6, 6), 0.5))
    raw = load_source(str(tmp_path / "gray.npz"))
    assert raw.images.shape == (4, 1, 6, 6) and raw.images.dtype == np.float32
    assert raw.labels is None and raw.n_classes is None and raw.value_range == (0.0, 1.0)

    np.savez(tmp_path / "wide.npz", x=np.linspace(-2, 3, 4 * 1 * 2 * 2).reshape(4, 1, 2, 2))
    assert load_source(str(tmp_path / "wide.npz")).value_range == (-2.0, 3.0)


def test_npz_errors(tmp_path: Path) -> None:
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 4, 4)))
    with pytest.raises(DataError, match="missing key 'x'.*images"):
        load_source(str(tmp_path / "nox.npz"))
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 5, 4, 4)))
    with pytest.raises(DataError, match=r"shape \(2, 5, 4, 4\)"):
        load_source(str(tmp_path / "shape.npz"))
    x = np.zeros((5, 4, 4), dtype=np.float32)
    x[3, 1, 2] = np.nan
    np.savez(tmp_path / "nan.npz", x=x)
    with pytest.raises(DataError, match="sample 3 has NaN"):
        load_source(str(tmp_path / "nan.npz"))
    np.savez(tmp_path / "count.npz", x=np.zeros((5, 4, 4)), y=np.zeros(4, dtype=int))
    with pytest.raises(DataError, match="'y' has shape"):
        load_source(str(tmp_path / "count.npz"))
    (tmp_path / "junk.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DataError, match="cannot read npz file .*junk.npz"):
        load_source(tmp_path / "junk.npz")
    with pytest.raises(DataError, match="npz file not found"):
        load_source(str(tmp_path / "absent.npz"))


def _png(path: Path, size: tuple[int, int], mode: str = "L", value: int = 100) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value if mode == "L" else (value, 20, 200)).save(path)


def test_image_folder_with_classes(tmp_path: Path) -> None:
    _png(tmp_path / "zebra" / "b.png", (6, 4), "L", 10)
    _png(tmp_path / "zebra" / "a.png", (6, 4), "L", 30)
    _png(tmp_path / "ant" / "c.png", (6, 4), "RGB", 50)
    raw = load_source(str(tmp_path))
    assert raw.class_names == ["ant", "zebra"] and raw.n_classes == 2
    assert raw.labels.tolist() == [0, 1, 1]  # sorted paths: ant/c, zebra/a, zebra/b
    assert raw.images.shape == (3, 3, 4, 6) and raw.images.dtype == np.uint8  # grayscale promoted to RGB
    assert raw.images[0, :, 0, 0].tolist() == [50, 20, 200]
    assert raw.images[1, :, 0, 0].tolist() == [30, 30, 30]


def test_image_folder_resize_and_unlabelled(tmp_path: Path) -> None:
    _png(tmp_path / "a.png", (8, 8))
    _png(tmp_path / "b.jpg", (12, 10))
    (tmp_path / "notes.txt").write_text("ignored")
    raw = load_source(str(tmp_path), size=5)
    assert raw.images.shape == (2, 1, 5, 5) and raw.labels is None and raw.n_classes is None

    with pytest.raises(DataError, match=r"a\.png is \(1, 8, 8\), .*b\.jpg is \(1, 10, 12\)"):
        load_source(str(tmp_path))


def test_folder_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match=f"empty folder {empty}"):
        load_source(str(empty))
    broken = tmp_path / "broken"
    _png(broken / "good.png", (4, 4))
    (broken / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="unreadable image file .*bad.png"):
        load_source(str(broken))


def test_unknown_names_and_splits() -> None:
    with pytest.raises(DataError, match="unknown dataset 'cifar'.*digits, usps, mnist, fashion-mnist.*existing"):
        load_source("cifar")
    with pytest.raises(DataError, match="split='train' is only available"):
        load_source("digits", split="train")
    with pytest.raises(DataError, match="unknown split"):
        load_source("usps", split="valid")


def test_an_image_folder_keeps_its_file_paths_as_keys(tmp_path: Path) -> None:
    _png(tmp_path / "pictures" / "zebra" / "b.png", (6, 4), "L", 10)
    _png(tmp_path / "pictures" / "ant" / "c d.png", (6, 4), "L", 50)
    _png(tmp_path / "pictures" / "zebra" / "a.png", (6, 4), "L", 30)
    out = tmp_path / "prepared"
    manifest = write_shards(load_source(str(tmp_path / "pictures")), out, samples_per_shard=2)
    keys = sample_keys(out)
    assert keys == ["ant/c d.png", "zebra/a.png", "zebra/b.png"]  # sample i's file, in index order
    images, _ = load_all(out)
    assert images[0, 0, 0, 0].item() == pytest.approx(50 / 255) and images[1, 0, 0, 0].item() == pytest.approx(30 / 255)
    # a keys file cut short is named, not read wrong
    (out / "keys.txt").write_text("ant/c d.png\nzebra/a.png\n")
    with pytest.raises(DataError, match=r"keys\.txt holds 2 lines but .*dataset\.json counts 3 samples"):
        sample_keys(out, manifest)
    # the same folder prepared again from a set without keys: the shards' own keys, no stale file
    write_shards(RawDataset("plain", np.zeros((2, 1, 4, 6), np.uint8), None, (0.0, 255.0), None), out)
    assert not (out / "keys.txt").exists() and sample_keys(out) == ["000000000", "000000001"]
    broken = RawDataset("broken", np.zeros((1, 1, 2, 2), np.uint8), None, (0.0, 255.0), None, keys=["a\nb.png"])
    with pytest.raises(DataError, match="line break"):
        write_shards(broken, tmp_path / "broken")
