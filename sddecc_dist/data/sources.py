"""Raw dataset readers: built-in image sets (checksummed), .npz files and image folders.

Every reader returns a :class:`RawDataset` holding images as (N, C, H, W) in their original
dtype and range, so that shards can store them exactly and scaling happens only once, on read.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError


class DataError(ValueError):
    """Invalid, missing or corrupt input data; the message names the file, sample or key."""


@dataclass
class RawDataset:
    """Images (N, C, H, W) in their original dtype and range, with optional integer labels."""

    name: str
    images: np.ndarray
    labels: np.ndarray | None
    value_range: tuple[float, float]
    n_classes: int | None
    class_names: list[str] | None = None
    keys: list[str] | None = None  # a name per image (an image folder's: its path inside it); else the index


# name -> [(filename, url, md5, md5_kind)]; md5_kind "content" hashes the gunzipped bytes
# (the MNIST/Fashion-MNIST .gz wrappers vary between mirrors), "file" hashes the file as is.
_MNIST_URL = "https://ossci-datasets.s3.amazonaws.com/mnist/"
_FMNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_USPS_URL = "https://hastie.su.domains/ElemStatLearn/datasets/"
DATASET_FILES: dict[str, list[tuple[str, str, str, str]]] = {
    "mnist": [
        ("train-images-idx3-ubyte.gz", _MNIST_URL + "train-images-idx3-ubyte.gz", "6bbc9ace898e44ae57da46a324031adb", "content"),
        ("train-labels-idx1-ubyte.gz", _MNIST_URL + "train-labels-idx1-ubyte.gz", "a25bea736e30d166cdddb491f175f624", "content"),
        ("t10k-images-idx3-ubyte.gz", _MNIST_URL + "t10k-images-idx3-ubyte.gz", "2646ac647ad5339dbf082846283269ea", "content"),
        ("t10k-labels-idx1-ubyte.gz", _MNIST_URL + "t10k-labels-idx1-ubyte.gz", "27ae3e4e09519cfbb04c329615203637", "content"),
    ],
    "fashion-mnist": [
        ("train-images-idx3-ubyte.gz", _FMNIST_URL + "train-images-idx3-ubyte.gz", "f4a8712d7a061bf5bd6d2ca38dc4d50a", "content"),
        ("train-labels-idx1-ubyte.gz", _FMNIST_URL + "train-labels-idx1-ubyte.gz", "9018921c3c673c538a1fc5bad174d6f9", "content"),
        ("t10k-images-idx3-ubyte.gz", _FMNIST_URL + "t10k-images-idx3-ubyte.gz", "8181f5470baa50b63fa0f6fddb340f0a", "content"),
        ("t10k-labels-idx1-ubyte.gz", _FMNIST_URL + "t10k-labels-idx1-ubyte.gz", "15d484375f8d13e6eb1aabb0c3f46965", "content"),
    ],
    "usps": [
        ("zip.train.gz", _USPS_URL + "zip.train.gz", "206835541ea704bcfb4b6eea872678bf", "file"),
        ("zip.test.gz", _USPS_URL + "zip.test.gz", "f9350e940232b89f1dc8f8eacac88625", "file"),
    ],
}
MIRROR_ENV = "SDDECC_DATA_MIRROR"
KNOWN_NAMES = ("digits", "usps", "mnist", "fashion-mnist")
_ALIASES = {"fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist"}
_SPLITS = ("all", "train", "test")
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_DIGIT_NAMES = [str(d) for d in range(10)]
_FMNIST_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                 "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def load_source(source: str | Path, from_dir: str | Path | None = None, split: str = "all",
                size: int | None = None, cache_dir: str | Path | None = None) -> RawDataset:
    """Load a dataset by name (digits, usps, mnist, fashion-mnist), .npz path or image folder.

    `split="all"` concatenates train then test, as the paper clusters both. `from_dir` reads
    the raw files of a named set from a folder instead of downloading them into `cache_dir`.
    `size` resizes the images of a folder to size x size (other sources keep their size).
    """
    if size is not None and size < 1:
        raise DataError(f"size must be a positive number of pixels, got {size}")
    if split not in _SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(_SPLITS)}")
    source = str(source)
    name = _ALIASES.get(source.lower(), source.lower())
    if name in KNOWN_NAMES:
        if size is not None:
            raise DataError(f"size={size} only applies to image folders, not to the {name} dataset")
        if name == "digits":
            _require_all_split(name, split)
            return _load_digits()
        files = _locate_files(name, split, from_dir, cache_dir)
        return _load_usps(files) if name == "usps" else _load_idx_set(name, files)
    path = Path(source).expanduser()
    if path.is_dir():
        _require_all_split(str(path), split)
        return _load_folder(path, size)
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise DataError(f"npz file not found: {path}")
        if size is not None:
            raise DataError(f"size={size} only applies to image folders, not to {path}")
        _require_all_split(str(path), split)
        return _load_npz(path)
    if path.exists():
        raise DataError(f"unsupported data source {path}: expected a .npz file or a folder of images")
    raise DataError(
        f"unknown dataset {source!r}: known names are {', '.join(KNOWN_NAMES)} "
        f"(aliases {', '.join(_ALIASES)}); otherwise give the path of an existing .npz file or image folder"
    )


def _require_all_split(what: str, split: str) -> None:
    if split != "all":
        raise DataError(f"split={split!r} is only available for usps, mnist and fashion-mnist, not {what}")


# ----------------------------------------------------------------------------- built-in sets

def _load_digits() -> RawDataset:
    """scikit-learn's bundled 8x8 digits: a dataset that needs no download (values 0..16)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.uint8)[:, None]  # integer-valued 0..16, exact in uint8
    return RawDataset("digits", images, bunch.target.astype(np.int64), (0.0, 16.0), 10, list(_DIGIT_NAMES))


def _split_files(name: str, split: str) -> list[tuple[str, str, str, str]]:
    """The table rows of `name` needed for `split`, train before test."""
    rows = DATASET_FILES[name]
    if split == "all":
        return rows
    marker = "train" if split == "train" else "t10k" if name != "usps" else "test"
    return [row for row in rows if marker in row[0]]


def _locate_files(name: str, split: str, from_dir: str | Path | None,
                  cache_dir: str | Path | None) -> dict[str, bytes]:
    """Checksum-verified, gunzipped file contents keyed by table file name."""
    rows = _split_files(name, split)
    if from_dir is not None:
        return {row[0]: _read_local(Path(from_dir), row) for row in rows}
    cache = Path(cache_dir) if cache_dir is not None else Path.home() / ".cache" / "sddecc" / name
    cache.mkdir(parents=True, exist_ok=True)
    return {row[0]: _fetch(cache, row) for row in rows}


def _read_local(folder: Path, row: tuple[str, str, str, str]) -> bytes:
    """Read one raw file from a folder; IDX files may be gzipped or not."""
    filename, kind = row[0], row[3]
    candidates = [folder / filename]
    if kind == "content":
        candidates.append(folder / filename.removesuffix(".gz"))
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise DataError(f"missing file: none of {', '.join(str(p) for p in candidates)} exists")
    return _verified_content(path.read_bytes(), row, str(path))


def _fetch(cache: Path, row: tuple[str, str, str, str]) -> bytes:
    """Return a cached file if its checksum matches, else download it (temp file, then rename)."""
    filename, url = row[0], row[1]
    mirror = os.environ.get(MIRROR_ENV)
    if mirror:
        url = mirror.rstrip("/") + "/" + filename
    if (cache / filename).is_file():
        try:
            return _read_local(cache, row)
        except DataError:
            pass  # stale or partial copy: download it again
    fd, tmp_name = tempfile.mkstemp(dir=cache, prefix=filename + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
            except OSError as exn:
                raise DataError(f"could not download {url}: {exn}; pass from_dir= with the raw files") from exn
        content = _verified_content(Path(tmp_name).read_bytes(), row, f"{filename} downloaded from {url}")
        os.replace(tmp_name, cache / filename)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return content


def _verified_content(raw: bytes, row: tuple[str, str, str, str], where: str) -> bytes:
    """Check the pinned MD5 (of the gunzipped content or of the file, as the table says); return the content."""
    md5, kind = row[2], row[3]
    hashed = _gunzip(raw, where) if kind == "content" else raw
    digest = hashlib.md5(hashed).hexdigest()
    if digest != md5:
        what = "decompressed content" if kind == "content" else "file"
        raise DataError(f"checksum mismatch for {where}: md5 of the {what} is {digest}, expected {md5}")
    return hashed if kind == "content" else _gunzip(raw, where)


def _gunzip(raw: bytes, where: str) -> bytes:
    """Decompress gzip data (recognised by its magic bytes); plain data is returned as is."""
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exn:
        raise DataError(f"corrupt gzip file {where}: {exn}") from exn


def parse_idx(content: bytes, filename: str, ndim: int) -> np.ndarray:
    """Parse an IDX array of unsigned bytes (magic 0x0000 08 <ndim>), checking header and size."""
    if len(content) < 4 + 4 * ndim or content[:3] != b"\x00\x00\x08" or content[3] != ndim:
        raise DataError(f"corrupt IDX header in {filename}: magic number {content[:4].hex()}, "
                        f"expected 000008{ndim:02x} (unsigned bytes, {ndim} dimensions)")
    shape = tuple(int(d) for d in np.frombuffer(content, dtype=">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(content) != expected:
        raise DataError(f"{filename}: header says shape {shape} ({expected} bytes) but the file has {len(content)} bytes")
    return np.frombuffer(content, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _load_idx_set(name: str, files: dict[str, bytes]) -> RawDataset:
    """MNIST-style sets: pairs of images/labels IDX files, concatenated in table order."""
    images, labels = [], []
    for prefix in ("train", "t10k"):
        if f"{prefix}-images-idx3-ubyte.gz" not in files:
            continue
        x = parse_idx(files[f"{prefix}-images-idx3-ubyte.gz"], f"{prefix}-images-idx3-ubyte", 3)
        y = parse_idx(files[f"{prefix}-labels-idx1-ubyte.gz"], f"{prefix}-labels-idx1-ubyte", 1)
        if len(x) != len(y):
            raise DataError(f"{name}: {prefix}-images-idx3-ubyte has {len(x)} images "
                            f"but {prefix}-labels-idx1-ubyte has {len(y)} labels")
        images.append(x)
        labels.append(y)
    names = _FMNIST_NAMES if name == "fashion-mnist" else _DIGIT_NAMES
    return RawDataset(name, np.concatenate(images)[:, None], np.concatenate(labels).astype(np.int64),
                      (0.0, 255.0), 10, list(names))


def _load_usps(files: dict[str, bytes]) -> RawDataset:
    """USPS text files: each line is the label then 256 values in [-1, 1] (16x16, row-major)."""
    images, labels = [], []
    for filename, content in files.items():
        rows = [line.split() for line in content.decode("ascii").splitlines() if line.strip()]
        for lineno, row in enumerate(rows, 1):
            if len(row) != 257:
                raise DataError(f"{filename} line {lineno}: expected a label and 256 values, got {len(row)} fields")
        table = np.array(rows, dtype=np.float32)
        images.append(table[:, 1:].reshape(-1, 1, 16, 16))
        labels.append(table[:, 0].astype(np.int64))
    x = np.concatenate(images)
    _check_finite(x, "usps")
    return RawDataset("usps", x, np.concatenate(labels), (-1.0, 1.0), 10, list(_DIGIT_NAMES))


# ----------------------------------------------------------------------------- user data

def _load_npz(path: Path) -> RawDataset:
    """An .npz with images `x` ((N,H,W), (N,C,H,W) or (N,H,W,C)) and optional labels `y`."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            keys = list(archive.files)
            x = archive["x"] if "x" in keys else None
            y = archive["y"] if "y" in keys else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exn:
        raise DataError(f"cannot read npz file {path}: {exn}") from exn
    if x is None:
        raise DataError(f"{path}: missing key 'x' (the images); keys present: {', '.join(keys) or 'none'}")
    x = _to_nchw(x, path)
    if x.size == 0:
        raise DataError(f"{path}: key 'x' holds no pixels: shape {x.shape}")
    if x.dtype != np.uint8:
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_) or np.iscomplexobj(x):
            raise DataError(f"{path}: key 'x' has dtype {x.dtype}; expected real numbers")
        x = x.astype(np.float32)
        _check_finite(x, str(path))
    labels, n_classes, class_names = _encode_labels(y, len(x), path)
    return RawDataset(path.stem, x, labels, _value_range(x), n_classes, class_names)


def _to_nchw(x: np.ndarray, path: Path) -> np.ndarray:
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4 and x.shape[1] in (1, 3):
        return x
    if x.ndim == 4 and x.shape[3] in (1, 3):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
    raise DataError(f"{path}: key 'x' has shape {x.shape}; expected (N,H,W), (N,C,H,W) or (N,H,W,C) with C in {{1,3}}")


def _encode_labels(y: np.ndarray | None, n: int, path: Path) -> tuple[np.ndarray | None, int | None, list[str] | None]:
    """Map arbitrary label values to ids 0..K-1 in sorted order, keeping the values as class names."""
    if y is None:
        return None, None, None
    if y.shape != (n,):
        raise DataError(f"{path}: key 'y' has shape {y.shape}; expected ({n},), one label per image in 'x'")
    if np.issubdtype(y.dtype, np.floating):
        if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
            raise DataError(f"{path}: key 'y' must hold integer class labels")
        y = y.astype(np.int64)
    values, ids = np.unique(y, return_inverse=True)
    return ids.astype(np.int64), len(values), [str(v) for v in values]


def _load_folder(folder: Path, size: int | None) -> RawDataset:
    """Image files, sorted by path; first-level sub-folder names become the class labels."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"empty folder {folder}: no image files ({', '.join(_IMAGE_SUFFIXES)}) found")
    top_level = [p for p in files if p.parent == folder]
    if top_level and len(top_level) != len(files):
        raise DataError(f"{folder}: images both directly in the folder (e.g. {top_level[0].name}) and in "
                        "sub-folders; put all of them in class sub-folders or none")
    arrays = [_read_image(p, size) for p in files]
    if any(a.shape[0] == 3 for a in arrays):  # mixed grayscale/RGB: promote grayscale to RGB
        arrays = [np.repeat(a, 3, axis=0) if a.shape[0] == 1 else a for a in arrays]
    for p, a in zip(files, arrays):
        if a.shape != arrays[0].shape:
            raise DataError(f"images of different shapes in {folder}: {files[0]} is {arrays[0].shape}, {p} is "
                            f"{a.shape} (C,H,W); pass size= to resize them all")
    images = np.stack(arrays)
    keys = [p.relative_to(folder).as_posix() for p in files]
    if top_level:
        return RawDataset(folder.name, images, None, (0.0, 255.0), None, keys=keys)
    class_names = sorted({p.relative_to(folder).parts[0] for p in files})
    ids = {c: i for i, c in enumerate(class_names)}
    labels = np.array([ids[p.relative_to(folder).parts[0]] for p in files], dtype=np.int64)
    return RawDataset(folder.name, images, labels, (0.0, 255.0), len(class_names), class_names, keys=keys)


def _read_image(path: Path, size: int | None) -> np.ndarray:
    """Decode one image to uint8 (C,H,W): grayscale stays 1 channel, everything else becomes RGB."""
    try:
        with Image.open(path) as img:
            img = img.convert("L" if img.mode in ("L", "1") else "RGB")
            if size is not None:
                img = img.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(img, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exn:
        raise DataError(f"unreadable image file {path}: {exn}") from exn
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


# ----------------------------------------------------------------------------- checks

def _check_finite(x: np.ndarray, what: str) -> None:
    bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1)
    if bad.any():
        raise DataError(f"{what}: sample {int(np.argmax(bad))} has NaN or infinite pixel values "
                        f"({int(bad.sum())} bad samples in all)")


def _value_range(x: np.ndarray) -> tuple[float, float]:
    """(0,255) for uint8; (0,1) for floats already inside it; else the data's own min and max."""
    if x.dtype == np.uint8:
        return 0.0, 255.0
    lo, hi = float(x.min()), float(x.max())
    if lo >= 0.0 and hi <= 1.0:
        return 0.0, 1.0
    return lo, hi if hi > lo else lo + 1.0
