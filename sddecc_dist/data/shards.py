"""WebDataset shards: a checksummed, streamable on-disk form of a RawDataset.

Each sample stores its image in the original dtype and range (`x.npy`, exact round trip), its
label (`cls`) and its global index as the key; scaling to [0,1] happens on read, from the
manifest's value range, so every consumer sees the same pixels.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import random
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from sddecc_dist.utils import atomic_write_bytes, atomic_write_text, remove_stale_temporaries

from .sources import DataError, RawDataset

MANIFEST_NAME = "dataset.json"
KEYS_NAME = "keys.txt"  # images prepared from a folder: each file's path inside it, line i for sample i
FORMAT_VERSION = 1
_MANIFEST_KEYS = ("format_version", "name", "count", "image_shape", "dtype", "value_range",
                  "n_classes", "class_names", "has_labels", "shards")
_SHARD_KEYS = ("file", "count", "first_index", "sha256")

Sample = tuple[int, torch.Tensor, int]
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def write_shards(raw: RawDataset, out_dir: str | Path, samples_per_shard: int = 10000) -> dict:
    """Write `raw` as tar shards plus a `dataset.json` manifest, each atomically; return the manifest."""
    images, labels = raw.images, raw.labels
    if images.ndim != 4 or images.shape[1] not in (1, 3) or len(images) == 0:
        raise DataError(f"{raw.name}: images must be a non-empty (N, C, H, W) array with C in {{1,3}}, got {images.shape}")
    if labels is not None and labels.shape != (len(images),):
        raise DataError(f"{raw.name}: {len(images)} images but labels of shape {labels.shape}")
    if samples_per_shard < 1:
        raise DataError(f"samples_per_shard must be positive, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)  # of an earlier prepare killed mid-write
    shards = []
    for number, first in enumerate(range(0, len(images), samples_per_shard)):
        stop = min(first + samples_per_shard, len(images))
        filename = f"shard-{number:06d}.tar"
        samples = ({"__key__": sample_key(index), "x.npy": np.ascontiguousarray(images[index]),
                    **({"cls": int(labels[index])} if labels is not None else {})} for index in range(first, stop))
        digest = write_tar(out / filename, samples)
        shards.append({"file": filename, "count": stop - first, "first_index": first, "sha256": digest})
    _write_keys(raw, out)
    manifest = {
        "format_version": FORMAT_VERSION,
        "name": raw.name,
        "count": len(images),
        "image_shape": list(images.shape[1:]),
        "dtype": str(images.dtype),
        "value_range": [float(raw.value_range[0]), float(raw.value_range[1])],
        "n_classes": raw.n_classes,
        "class_names": raw.class_names,
        "has_labels": labels is not None,
        "shards": shards,
    }
    # Last, once every shard is complete on disk: a folder without its manifest is no dataset.
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1))
    return manifest


def sample_key(index: int) -> str:
    """A sample's webdataset key in the shards: its global index, zero-padded."""
    return f"{index:09d}"


def sample_keys(data_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Every sample's key, item i for sample i, as a person knows it: for images prepared from
    a folder, each file's path inside it (KEYS_NAME, written by `write_shards`); else the
    shards' own keys (`sample_key`)."""
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    path = Path(data_dir) / KEYS_NAME
    if not path.is_file():
        return [sample_key(i) for i in range(manifest["count"])]
    try:
        keys = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path} cannot be read as UTF-8 text ({e}): prepare the folder again") from e
    if keys[-1] != "" or len(keys) - 1 != manifest["count"]:
        raise DataError(f"{path} holds {len(keys) - 1} lines but {Path(data_dir) / MANIFEST_NAME} counts "
                        f"{manifest['count']} samples (cut short, or from other images): prepare the folder again")
    return keys[:-1]


def _write_keys(raw: RawDataset, out: Path) -> None:
    """KEYS_NAME: the raw set's keys (an image folder's file paths), one a line; removed when
    the set has none, so that a folder prepared again from other images holds no stale keys."""
    path = out / KEYS_NAME
    if raw.keys is None:
        path.unlink(missing_ok=True)
        return
    if len(raw.keys) != len(raw.images):
        raise DataError(f"{raw.name}: {len(raw.images)} images but {len(raw.keys)} keys")
    broken = next((key for key in raw.keys if "\n" in key or "\r" in key), None)
    if broken is not None:
        raise DataError(f"{raw.name}: the file name {broken!r} holds a line break, which {KEYS_NAME} cannot hold: "
                        f"rename the file")
    atomic_write_text(path, "".join(f"{key}\n" for key in raw.keys))


def write_tar(path: Path, samples: Iterable[dict]) -> str:
    """Write webdataset samples as one tar shard, atomically (utils.atomic_write_bytes: temp
    file, fsync, rename); return its sha256."""
    def write(stream):
        with wds.TarWriter(stream, mtime=0) as sink:  # int mtime: reproducible, no PAX headers
            for sample in samples:
                sink.write(sample)
    atomic_write_bytes(path, write)
    return _sha256(path)


def read_manifest(data_dir: str | Path) -> dict:
    """Load and sanity-check `dataset.json`, so that later errors can trust its fields."""
    path = Path(data_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"missing manifest {path}: write shards first (write_shards)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exn:
        raise DataError(f"invalid JSON in manifest {path}: {exn}") from exn
    if not isinstance(manifest, dict):
        raise DataError(f"manifest {path} must hold a JSON object")
    missing = [k for k in _MANIFEST_KEYS if k not in manifest]
    if missing:
        raise DataError(f"manifest {path} lacks keys: {', '.join(missing)}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise DataError(f"manifest {path} has format_version {manifest['format_version']}, expected {FORMAT_VERSION}")
    _check_manifest_fields(manifest, path)
    if sum(s["count"] for s in manifest["shards"]) != manifest["count"]:
        raise DataError(f"manifest {path}: shard counts do not add up to count={manifest['count']}")
    return manifest


def _is_real_dtype(name) -> bool:
    if not isinstance(name, str):
        return False
    try:
        # numpy parses any string as a dtype spec and fails in its own ways: "0:" raises
        # ValueError, "01" SyntaxError (found by tests/test_faults.py's fuzzing)
        return np.dtype(name).kind in "uifb"
    except Exception:
        return False


def _check_manifest_fields(manifest: dict, path: Path) -> None:
    """The type and range of every field a reader relies on, each named when wrong."""
    def is_int(value, least: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= least

    def is_number(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    def wrong(field: str, expected: str, value) -> DataError:
        return DataError(f"manifest {path}: {field} must be {expected}, got {value!r:.80}")

    shape, value_range = manifest["image_shape"], manifest["value_range"]
    checks = [
        ("name", isinstance(manifest["name"], str), "a string"),
        ("count", is_int(manifest["count"], 1), "a positive integer"),
        ("image_shape", isinstance(shape, list) and len(shape) == 3 and all(is_int(v, 1) for v in shape)
         and shape[0] in (1, 3), "[C, H, W] with C 1 or 3"),
        ("dtype", _is_real_dtype(manifest["dtype"]), "the name of a numpy integer, float or bool dtype"),
        ("value_range", isinstance(value_range, list) and len(value_range) == 2
         and all(is_number(v) for v in value_range) and value_range[0] < value_range[1], "[low, high], low < high"),
        ("n_classes", manifest["n_classes"] is None or is_int(manifest["n_classes"], 1), "null or a positive integer"),
        ("class_names", manifest["class_names"] is None or isinstance(manifest["class_names"], list)
         and all(isinstance(c, str) for c in manifest["class_names"]), "null or a list of strings"),
        ("has_labels", isinstance(manifest["has_labels"], bool), "true or false"),
        ("shards", isinstance(manifest["shards"], list) and len(manifest["shards"]) > 0, "a non-empty list"),
    ]
    for field, ok, expected in checks:
        if not ok:
            raise wrong(field, expected, manifest[field])
    for i, shard in enumerate(manifest["shards"]):
        lacking = [k for k in _SHARD_KEYS if not isinstance(shard, dict) or k not in shard]
        if lacking:
            raise DataError(f"manifest {path}: shard entry {i} lacks keys: {', '.join(lacking)}")
        name = shard["file"]
        shard_checks = [
            ("file", isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name,
             "a file name inside the folder"),
            ("count", is_int(shard["count"], 1), "a positive integer"),
            ("first_index", is_int(shard["first_index"], 0), "an integer >= 0"),
            ("sha256", isinstance(shard["sha256"], str) and len(shard["sha256"]) == 64
             and all(c in "0123456789abcdef" for c in shard["sha256"]), "64 hex digits"),
        ]
        for field, ok, expected in shard_checks:
            if not ok:
                raise wrong(f"shard entry {i}'s {field}", expected, shard[field])


def manifest_fingerprint(manifest: dict) -> str:
    """Identifies the exact shards of a manifest (count and shard checksums): artifacts made
    from the shards (graph, partitions, partition-ordered shards) record it, so that one made
    from other shards is refused rather than reused."""
    text = json.dumps([manifest["count"], [s["sha256"] for s in manifest["shards"]]])
    return hashlib.sha256(text.encode()).hexdigest()


def verify_shards(data_dir: str | Path, manifest: dict | None = None) -> None:
    """Recompute each shard's sha256 against the manifest (catches corruption that still parses)."""
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    for shard in manifest["shards"]:
        path = Path(data_dir) / shard["file"]
        if not path.is_file():
            raise DataError(f"missing shard {path}")
        digest = _sha256(path)
        if digest != shard["sha256"]:
            raise DataError(f"corrupt shard {path}: sha256 {digest}, manifest says {shard['sha256']}")


def shard_urls(data_dir: str | Path, manifest: dict | None = None) -> list[str]:
    """Absolute shard paths in index order, as webdataset urls."""
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    return [str(Path(data_dir).resolve() / shard["file"]) for shard in manifest["shards"]]


def rank_shards(manifest: dict, rank: int, world_size: int) -> list[int]:
    """Positions in `manifest['shards']` that `rank` reads: rank, rank + R, ... (the one rule,
    for plain and partition-ordered shards alike). A rank left without a shard is an error."""
    n_shards = len(manifest["shards"])
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must lie in [0, world_size), got rank {rank} of world_size {world_size}")
    if rank >= n_shards:
        raise DataError(f"rank {rank} has no shard: the data ({manifest.get('name')}, {manifest.get('count')} "
                        f"samples) has {n_shards} shard(s) for world_size {world_size}; start at most {n_shards} "
                        f"ranks, or prepare it again into a new folder in {world_size} or more shards: `sddecc "
                        f"prepare SOURCE --out NEW_DIR --samples-per-shard "
                        f"{max(1, -(-int(manifest.get('count', 1)) // world_size))}` (SOURCE as before: a "
                        f"dataset name, .npz or image folder; partitions_per_shard for partition-ordered data)")
    return list(range(rank, n_shards, world_size))


def shard_indices(shards: list[dict]) -> np.ndarray:
    """Global sample indices of the given (plain, not partition-ordered) shard entries, in the
    order streaming them yields: shard by shard, each in index order."""
    return np.concatenate([np.arange(s["first_index"], s["first_index"] + s["count"]) for s in shards])


def sample_pipeline(urls: list[str], value_range: tuple[float, float] | list[float],
                    shuffle_buffer: int = 0, seed: int = 0) -> wds.WebDataset:
    """WebDataset yielding (index, image float32 (C,H,W) in [0,1], label or -1) per sample.

    Shards and samples are shuffled only when `shuffle_buffer > 0`, from `seed`, so a given
    seed always gives the same order. Every rank reads every shard (no node splitting).
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    dataset = wds.WebDataset(urls, handler=_shard_error_handler(urls), nodesplitter=None,
                             shardshuffle=len(urls) if shuffle_buffer > 0 else False, seed=seed)
    if shuffle_buffer > 0:
        dataset = dataset.shuffle(shuffle_buffer, initial=shuffle_buffer, rng=random.Random(seed))
    return dataset.map(partial(_decode_sample, lo=lo, hi=hi))


def stream_batches(data_dir: str | Path, batch_size: int, shuffle_buffer: int = 0, seed: int = 0,
                   manifest: dict | None = None, rank: int = 0, world_size: int = 1,
                   steps: int | None = None) -> Iterator[Batch]:
    """Batches (index LongTensor, images FloatTensor (B,C,H,W) in [0,1], labels LongTensor, -1 if none).

    One process (`steps` None): every sample once (the last batch may be partial) and, at the
    end, a check that each index was seen, so a truncated shard cannot silently shorten an epoch.

    Several processes: rank r streams only shards r, r + R, ... and yields exactly `steps` full
    batches, reading its shards again from the start if it runs out (when shards are uneven),
    so that every rank takes the same number of optimiser steps and none waits in a collective.
    """
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    if steps is None:
        if world_size != 1:
            raise ValueError("stream_batches on several ranks needs `steps` (equal on every rank)")
        pipeline = sample_pipeline(shard_urls(data_dir, manifest), manifest["value_range"], shuffle_buffer, seed)
        seen = np.zeros(manifest["count"], dtype=bool)
        for batch in pipeline.batched(batch_size, collation_fn=_collate, partial=True):
            _mark_seen(seen, batch[0].tolist(), manifest, data_dir)
            yield batch
        _check_complete(seen, manifest, data_dir)
        return
    urls = shard_urls(data_dir, manifest)
    own = [urls[i] for i in rank_shards(manifest, rank, world_size)]
    produced, round_ = 0, 0
    while produced < steps:
        # Each pass over the rank's shards gets its own seed, so a repeated pass reshuffles.
        pipeline = sample_pipeline(own, manifest["value_range"], shuffle_buffer, seed * 1009 + round_)
        before = produced
        for batch in pipeline.batched(batch_size, collation_fn=_collate, partial=False):
            yield batch
            produced += 1
            if produced == steps:
                return
        if produced == before:
            raise DataError(f"rank {rank} of {world_size} cannot form one batch of {batch_size} from its "
                            f"shards of {data_dir}; use a smaller batch or fewer processes")
        round_ += 1


def stream_share(data_dir: str | Path, batch_size: int, rank: int = 0, world_size: int = 1,
                 manifest: dict | None = None) -> Iterator[Batch]:
    """Rank r's share of the samples (shards r, r + R, ...), in stored order, in batches (the
    last may be partial): for passes over every node, such as inference, without shuffling."""
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    urls = shard_urls(data_dir, manifest)
    pipeline = sample_pipeline([urls[i] for i in rank_shards(manifest, rank, world_size)], manifest["value_range"])
    yield from pipeline.batched(batch_size, collation_fn=_collate, partial=True)


def load_all(data_dir: str | Path, manifest: dict | None = None,
             verify: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Every sample, ordered by global index: images (N,C,H,W) float32 in [0,1], labels (N,) or None.

    `verify` checks shard checksums first (cheap next to decoding), since a flipped pixel byte
    would otherwise go unnoticed.
    """
    manifest = manifest if manifest is not None else read_manifest(data_dir)
    if verify:
        verify_shards(data_dir, manifest)
    shape = tuple(manifest["image_shape"])
    images = torch.empty((manifest["count"], *shape), dtype=torch.float32)
    labels = torch.full((manifest["count"],), -1, dtype=torch.int64)
    seen = np.zeros(manifest["count"], dtype=bool)
    images_np, labels_np = images.numpy(), labels.numpy()  # the same memory; numpy's item assignment is cheaper
    for index, image, label in sample_pipeline(shard_urls(data_dir, manifest), manifest["value_range"]):
        if tuple(image.shape) != shape:
            raise DataError(f"sample {index} in {_shard_of(index, manifest, data_dir)} has shape "
                            f"{tuple(image.shape)}, manifest says {shape}")
        _mark_seen(seen, [index], manifest, data_dir)
        images_np[index] = image.numpy()
        labels_np[index] = label
    _check_complete(seen, manifest, data_dir)
    return images, labels if manifest["has_labels"] else None


# ----------------------------------------------------------------------------- helpers

def _shard_error_handler(urls: list[str]) -> Callable[[Exception], bool]:
    """webdataset handler that re-raises read errors as a DataError naming the shard.

    webdataset 1.0.2 appends the url (and stream) to `exn.args` in the tar expander and the
    stream repr (with the path) to args[0] in the member iterator, so the name is found there.
    """
    names = [Path(u).name for u in urls]

    def handler(exn: Exception) -> bool:
        if isinstance(exn, DataError):  # already ours; webdataset may have appended to its args
            raise DataError(exn.args[0]) from exn.__cause__
        text = " ".join(str(a) for a in exn.args) + " " + str(exn)
        shard = next((u for u, n in zip(urls, names) if n in text), f"one of the shards of {Path(urls[0]).parent}")
        detail = exn.strerror if isinstance(exn, OSError) and exn.strerror else exn.args[0] if exn.args else ""
        detail = str(detail).split(" @ <")[0]  # drop the stream repr webdataset appends
        raise DataError(f"corrupt or unreadable shard {shard}: {type(exn).__name__}: {detail}") from exn

    return handler


def _decode_sample(sample: dict, lo: float, hi: float) -> Sample:
    """Decode one raw tar sample; errors name the shard and key."""
    if "x.npy" not in sample:
        raise DataError(f"sample {sample['__key__']!r} in shard {sample['__url__']} has no x.npy "
                        "(truncated or corrupt shard)")
    try:
        index = int(sample["__key__"])
        array = np.load(io.BytesIO(sample["x.npy"]), allow_pickle=False)
        label = int(sample["cls"]) if "cls" in sample else -1
    except (ValueError, OSError, EOFError) as exn:
        raise DataError(f"corrupt sample {sample.get('__key__')!r} in shard {sample.get('__url__')}: "
                        f"{type(exn).__name__}: {exn}") from exn
    # numpy, not torch, for the arithmetic: on a 28x28 image torch's per-call overhead is most of it
    image = torch.from_numpy((array.astype(np.float32) - np.float32(lo)) / np.float32(hi - lo))
    return index, image, label


def _collate(samples: list[Sample]) -> Batch:
    indices, images, labels = zip(*samples)
    return (torch.tensor(indices, dtype=torch.int64), torch.stack(images),
            torch.tensor(labels, dtype=torch.int64))


def _mark_seen(seen: np.ndarray, indices: Iterable[int], manifest: dict, data_dir: str | Path) -> None:
    for index in indices:
        if not 0 <= index < len(seen):
            raise DataError(f"sample index {index} out of range 0..{len(seen) - 1} in shards of {data_dir}")
        if seen[index]:
            raise DataError(f"sample {index} appears twice (expected in {_shard_of(index, manifest, data_dir)})")
        seen[index] = True


def _check_complete(seen: np.ndarray, manifest: dict, data_dir: str | Path) -> None:
    missing = np.flatnonzero(~seen)
    if len(missing):
        raise DataError(f"{len(missing)} samples missing, first {missing[0]} expected in "
                        f"{_shard_of(int(missing[0]), manifest, data_dir)} (truncated shard?)")


def _shard_of(index: int, manifest: dict, data_dir: str | Path) -> Path:
    """The shard file that the manifest assigns to a global index."""
    for shard in manifest["shards"]:
        if shard["first_index"] <= index < shard["first_index"] + shard["count"]:
            return Path(data_dir) / shard["file"]
    return Path(data_dir)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
