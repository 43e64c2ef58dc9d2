"""Partition-ordered shards for Cluster-GCN subgraph minibatches, and their streaming reader.

A Cluster-GCN batch is the union of a few whole graph partitions. With the original shards
(samples in index order) its samples would be scattered over every shard; after
`write_partitioned_shards` the samples of each partition are contiguous and lie wholly inside
one shard, so a rank streams its batches from its own shards, in order, with webdataset.

The folder has the same layout as a prepared data folder (`shard-*.tar` + `dataset.json`,
readable by `read_manifest`, `verify_shards`, `load_all`, `stream_batches`). Keys stay the global
sample index and `x.npy`/`cls` are byte-for-byte those of the source shards; each sample also
stores its partition id (`part.id`). The manifest adds, per shard, `partitions` (ids, in the
order stored) and `partition_sizes`, and a top-level `partitioned` section naming the source
shards and partition it was made from. A shard's `first_index` is its offset in the
partition-ordered sequence: its samples are not a contiguous range of global indices.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import shutil
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from sddecc_dist.utils import atomic_write_json, remove_stale_temporaries

from .shards import (
    _MANIFEST_KEYS,
    MANIFEST_NAME,
    _check_complete,
    _decode_sample,
    _mark_seen,
    _shard_error_handler,
    manifest_fingerprint,
    rank_shards,
    read_manifest,
    shard_urls,
    verify_shards,
    write_tar,
)
from .sources import DataError

__all__ = [
    "partition_fingerprint",
    "read_partitioned_manifest",
    "steps_per_epoch",
    "stream_subgraphs",
    "write_partitioned_shards",
]

PARTITION_FIELD = "part.id"  # the ".id" extension makes webdataset's writer store the int as text
_SECTION_KEYS = ("source_fingerprint", "partition_fingerprint", "n_parts", "partitions_per_shard", "seed")

SubgraphBatch = tuple[torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def partition_fingerprint(parts: np.ndarray) -> str:
    """sha256 of a partition assignment (int64 values): ties partitioned shards to their partition."""
    return hashlib.sha256(np.ascontiguousarray(parts, dtype=np.int64).tobytes()).hexdigest()


# ----------------------------------------------------------------------------- writing

def write_partitioned_shards(
    data_dir: str | Path,
    parts: np.ndarray,
    out_dir: str | Path,
    partitions_per_shard: int,
    *,
    seed: int = 0,
    parts_meta: dict | None = None,
    max_open_shards: int = 64,
) -> dict:
    """Rewrite the shards of `data_dir` into `out_dir` ordered by partition; return the manifest.

    `parts[i]` is the partition of global sample i (ids 0..P-1, none empty). Partitions are
    dealt to shards `partitions_per_shard` at a time after a permutation seeded by `seed`, so
    the partitions sharing a shard (and thus often a batch) are not neighbours in METIS'
    numbering; inside a shard they are stored by id, each partition's samples by index.

    Two passes, memory bounded by one output shard: pass 1 streams the source shards once
    (webdataset, in order) and appends each sample's raw bytes to a spool tar per output
    shard; pass 2 reads one spool at a time, sorts it and writes the final shard. With more
    than `max_open_shards` output shards, pass 1 is repeated per group of that many (open
    file limit). `parts_meta` (the partition artifact's meta) is recorded in the manifest.
    """
    data_dir, out = Path(data_dir), Path(out_dir)
    manifest = read_manifest(data_dir)
    parts = _check_parts(parts, manifest["count"], data_dir)
    if isinstance(partitions_per_shard, bool) or not isinstance(partitions_per_shard, int) or partitions_per_shard < 1:
        raise DataError(f"partitions_per_shard must be a positive integer, got {partitions_per_shard!r}")
    if max_open_shards < 1:
        raise DataError(f"max_open_shards must be positive, got {max_open_shards}")
    if out.resolve() == data_dir.resolve():
        raise DataError(f"out_dir {out} is the source folder: its {MANIFEST_NAME} would be overwritten")
    verify_shards(data_dir, manifest)  # the copy is byte-exact, so copy only bytes that are right

    n_parts = int(parts.max()) + 1
    if parts_meta and parts_meta.get("n_parts", n_parts) != n_parts:
        raise DataError(f"parts use ids 0..{n_parts - 1} but parts_meta says n_parts={parts_meta['n_parts']}")
    sizes = np.bincount(parts, minlength=n_parts)
    order = np.random.default_rng(seed).permutation(n_parts)
    groups = [np.sort(order[i:i + partitions_per_shard]) for i in range(0, n_parts, partitions_per_shard)]
    shard_of_part = np.empty(n_parts, dtype=np.int64)
    for number, group in enumerate(groups):
        shard_of_part[group] = number

    out.mkdir(parents=True, exist_ok=True)
    for pattern in (".*.tmp-*", ".spool-*"):  # of an earlier run killed mid-write
        remove_stale_temporaries(out, pattern)
    spool = out / f".spool-{os.getpid()}"
    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir()
    entries, offset = [], 0
    try:
        for lo in range(0, len(groups), max_open_shards):
            hi = min(lo + max_open_shards, len(groups))
            _spool_pass(data_dir, manifest, parts, shard_of_part, range(lo, hi), spool)
            for number in range(lo, hi):
                entry = _write_sorted_shard(spool / f"{number}.tar", out, number, groups[number], sizes, offset)
                offset += entry["count"]
                entries.append(entry)
    finally:
        shutil.rmtree(spool, ignore_errors=True)

    section = {
        "source_fingerprint": manifest_fingerprint(manifest),
        "partition_fingerprint": partition_fingerprint(parts),
        "n_parts": n_parts,
        "partitions_per_shard": partitions_per_shard,
        "seed": int(seed),
        "source_dir": str(data_dir.resolve()),
    }
    if parts_meta:
        section.update({key: parts_meta[key] for key in ("method", "k", "graph_fingerprint", "inside_edge_fraction")
                        if key in parts_meta})
    part_manifest = {**{key: manifest[key] for key in _MANIFEST_KEYS}, "shards": entries, "partitioned": section}
    atomic_write_json(out / MANIFEST_NAME, part_manifest)
    return part_manifest


def _check_parts(parts: np.ndarray, count: int, data_dir: Path) -> np.ndarray:
    parts = np.asarray(parts)
    if parts.shape != (count,) or not np.issubdtype(parts.dtype, np.integer):
        raise DataError(f"parts must be an integer array of shape ({count},) for the shards of {data_dir}, "
                        f"got shape {parts.shape} dtype {parts.dtype}")
    if parts.min() < 0:
        raise DataError(f"parts must be non-negative partition ids, got {parts.min()}")
    parts = parts.astype(np.int64, copy=False)
    empty = np.flatnonzero(np.bincount(parts) == 0)
    if empty.size:
        raise DataError(f"partition {empty[0]} is empty ({empty.size} of ids 0..{parts.max()} are); "
                        "partition ids must be 0..P-1, each used")
    return parts


def _spool_pass(data_dir: Path, manifest: dict, parts: np.ndarray, shard_of_part: np.ndarray,
                numbers: range, spool: Path) -> None:
    """Stream the source shards once; append the raw samples of output shards `numbers` to
    their spool tars. Checks every source sample appears exactly once."""
    urls = shard_urls(data_dir, manifest)
    seen = np.zeros(manifest["count"], dtype=bool)
    source = wds.WebDataset(urls, handler=_shard_error_handler(urls), nodesplitter=None, shardshuffle=False)
    with contextlib.ExitStack() as stack:
        sinks = {}
        for number in numbers:
            stream = stack.enter_context(open(spool / f"{number}.tar", "wb"))
            sinks[number] = stack.enter_context(wds.TarWriter(stream, mtime=0))
        for sample in source:
            index = _sample_index(sample)
            if "x.npy" not in sample:
                raise DataError(f"sample {sample['__key__']!r} in shard {sample['__url__']} has no x.npy "
                                "(truncated or corrupt shard)")
            _mark_seen(seen, [index], manifest, data_dir)
            number = int(shard_of_part[parts[index]])
            if number in sinks:
                record = {"__key__": sample["__key__"], "x.npy": sample["x.npy"], PARTITION_FIELD: int(parts[index])}
                if "cls" in sample:
                    record["cls"] = sample["cls"]
                sinks[number].write(record)
    _check_complete(seen, manifest, data_dir)


def _write_sorted_shard(spooled: Path, out: Path, number: int, group: np.ndarray, sizes: np.ndarray,
                        offset: int) -> dict:
    """Sort one spool by (partition, index) in memory and write it as the final shard, atomically."""
    reader = wds.WebDataset([str(spooled)], handler=_shard_error_handler([str(spooled)]), nodesplitter=None,
                            shardshuffle=False, empty_check=False)
    records = sorted(((int(s[PARTITION_FIELD]), _sample_index(s)), s) for s in reader)
    expected = int(sizes[group].sum())
    if len(records) != expected:  # pass 1 checked the source, so this is a bug or a full disk
        raise DataError(f"spooled shard {spooled} holds {len(records)} samples, expected {expected}")
    filename = f"shard-{number:06d}.tar"
    digest = write_tar(out / filename, ({key: value for key, value in sample.items()
                                         if not key.startswith("__") or key == "__key__"} for _, sample in records))
    spooled.unlink()
    return {"file": filename, "count": expected, "first_index": offset, "sha256": digest,
            "partitions": group.tolist(), "partition_sizes": sizes[group].tolist()}


def _sample_index(sample: dict) -> int:
    try:
        return int(sample["__key__"])
    except ValueError as exn:
        raise DataError(f"sample key {sample['__key__']!r} in shard {sample.get('__url__')} is not "
                        "a global sample index") from exn


# ----------------------------------------------------------------------------- reading

def read_partitioned_manifest(part_dir: str | Path, *, source_fingerprint: str | None = None,
                              partition_fingerprint: str | None = None) -> dict:
    """`read_manifest` plus the partition fields: every partition 0..P-1 listed in exactly one
    shard, with sizes adding up to the shard's count. When given, the fingerprints of the source
    shards and of the partition must match, else the shards are stale (error says how to redo)."""
    path = Path(part_dir) / MANIFEST_NAME
    manifest = read_manifest(part_dir)
    section = manifest.get("partitioned")
    if not isinstance(section, dict) or any(key not in section for key in _SECTION_KEYS):
        raise DataError(f"manifest {path} is not of partition-ordered shards (no complete 'partitioned' "
                        f"section with {', '.join(_SECTION_KEYS)}); write them with write_partitioned_shards")
    listed = []
    for shard in manifest["shards"]:
        ids, sizes = shard.get("partitions"), shard.get("partition_sizes")
        if not isinstance(ids, list) or not isinstance(sizes, list) or len(ids) != len(sizes) or not ids:
            raise DataError(f"manifest {path}: shard {shard['file']} lacks matching 'partitions' and "
                            "'partition_sizes' lists")
        if sum(sizes) != shard["count"] or min(sizes) < 1:
            raise DataError(f"manifest {path}: partition sizes of shard {shard['file']} do not add up to "
                            f"its count {shard['count']} or include an empty partition")
        listed.extend(ids)
    if sorted(listed) != list(range(section["n_parts"])):
        raise DataError(f"manifest {path}: shards must list each partition 0..{section['n_parts'] - 1} exactly once")
    redo = (f"; rebuild them with: sddecc partition {section.get('source_dir', '<data_dir>')} --k "
            f"{section.get('k', '<k>')} --parts {section['n_parts']} --rebuild")
    for key, expected in (("source_fingerprint", source_fingerprint), ("partition_fingerprint", partition_fingerprint)):
        if expected is not None and section[key] != expected:
            raise DataError(f"partitioned shards in {part_dir} were made from another "
                            f"{'source' if key.startswith('source') else 'partition'} "
                            f"({key} {str(section[key])[:12]}, now {expected[:12]}){redo}")
    return manifest


def steps_per_epoch(part_manifest: dict, partitions_per_batch: int, world_size: int) -> int:
    """Batches per epoch that every rank can run: the minimum over ranks of
    ceil(partitions in its shards / partitions_per_batch), computed from the manifest alone so
    all ranks agree without communicating. Each rank stops its `stream_subgraphs` after this
    many batches, so no rank waits in a collective for a batch another rank lacks."""
    _check_batch(partitions_per_batch)
    counts = [sum(len(part_manifest["shards"][i]["partitions"]) for i in rank_shards(part_manifest, rank, world_size))
              for rank in range(world_size)]
    return min(math.ceil(count / partitions_per_batch) for count in counts)


def stream_subgraphs(
    part_dir: str | Path,
    partitions_per_batch: int,
    seed: int,
    epoch: int,
    rank: int = 0,
    world_size: int = 1,
    *,
    shuffle_buffer: int | None = None,
    manifest: dict | None = None,
) -> Iterator[SubgraphBatch]:
    """Batches (global indices LongTensor, images FloatTensor (B,C,H,W) in [0,1], labels
    LongTensor or None when unlabelled), each the union of `partitions_per_batch` whole
    partitions (the last batch may hold fewer).

    This rank reads shards rank, rank + R, ... in an order shuffled per epoch by a generator
    seeded with (seed, epoch); completed partitions pass through a buffer of `shuffle_buffer`
    partitions (default 2 x partitions_per_batch; <= 1 keeps the stored order) from which
    batches draw at random, seeded by (seed, epoch, rank). Yields ceil(partitions / per batch)
    batches; each partition is checked to arrive whole, once, with its manifest size. Builds
    its own webdataset pipeline: in a DataLoader use one worker (num_workers=0). Arguments are
    checked on the call (a rank without a shard fails here, not at the first batch).
    """
    _check_batch(partitions_per_batch)
    if min(seed, epoch) < 0:
        raise DataError(f"seed and epoch seed numpy generators and must be non-negative, got seed {seed} epoch {epoch}")
    manifest = manifest if manifest is not None else read_partitioned_manifest(part_dir)
    mine = rank_shards(manifest, rank, world_size)
    shards = [manifest["shards"][mine[i]] for i in np.random.default_rng([seed, epoch]).permutation(len(mine))]
    urls = [str(Path(part_dir).resolve() / shard["file"]) for shard in shards]
    buffer_size = 2 * partitions_per_batch if shuffle_buffer is None else max(1, shuffle_buffer)
    return _subgraph_batches(shards, urls, manifest, partitions_per_batch, buffer_size,
                             np.random.default_rng([seed, epoch, rank]))


def _subgraph_batches(shards: list[dict], urls: list[str], manifest: dict, partitions_per_batch: int,
                      buffer_size: int, rng: np.random.Generator) -> Iterator[SubgraphBatch]:
    lo, hi = manifest["value_range"]
    pipeline = wds.WebDataset(urls, handler=_shard_error_handler(urls), nodesplitter=None, shardshuffle=False,
                              empty_check=False).map(partial(_decode_partitioned, lo=float(lo), hi=float(hi)))
    buffer, batch = [], []
    for part in _whole_partitions(pipeline, shards, urls):
        buffer.append(part)
        if len(buffer) < buffer_size:
            continue
        batch.append(buffer.pop(int(rng.integers(len(buffer)))))
        if len(batch) == partitions_per_batch:
            yield _collate_parts(batch, manifest["has_labels"])
            batch = []
    while buffer:  # the stream has ended: drain the buffer in random order
        batch.append(buffer.pop(int(rng.integers(len(buffer)))))
        if len(batch) == partitions_per_batch or not buffer:
            yield _collate_parts(batch, manifest["has_labels"])
            batch = []
    if batch:
        yield _collate_parts(batch, manifest["has_labels"])


Partition = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _whole_partitions(samples, shards: list[dict], urls: list[str]) -> Iterator[Partition]:
    """Group the decoded sample stream into whole partitions, checking it against the manifest:
    shards in the expected order and complete, each partition contiguous with its listed size."""
    expected = {url: dict(zip(shard["partitions"], shard["partition_sizes"])) for url, shard in zip(urls, shards)}
    position, current, members = -1, None, []

    def close() -> Partition:
        url = urls[position]
        size = expected[url].pop(current, None)
        if size is None:
            raise DataError(f"partition {current} in shard {url} is not listed for that shard or is not contiguous")
        if size != len(members):
            raise DataError(f"partition {current} in shard {url} has {len(members)} samples, manifest says {size} "
                            "(truncated or corrupt shard?)")
        indices, images, labels = zip(*members)
        return torch.tensor(indices, dtype=torch.int64), torch.stack(images), torch.tensor(labels, dtype=torch.int64)

    def finish_shard() -> None:
        if position >= 0 and expected[urls[position]]:
            missing = sorted(expected[urls[position]])
            raise DataError(f"shard {urls[position]} lacks partition(s) {missing[:5]} listed in the manifest "
                            "(truncated shard?)")

    for url, index, image, label, part in samples:
        new_shard = position < 0 or url != urls[position]
        if current is not None and (new_shard or part != current):
            yield close()
            members, current = [], None
        if new_shard:
            finish_shard()
            position += 1
            if position >= len(urls) or url != urls[position]:
                skipped = urls[position] if position < len(urls) else "none"
                raise DataError(f"sample {index} came from shard {url}, expected one from {skipped} "
                                "(an empty or unreadable shard?)")
        current = part
        members.append((index, image, label))
    if current is not None:
        yield close()
    finish_shard()
    if position != len(urls) - 1:
        raise DataError(f"shard {urls[position + 1]} yielded no samples (empty or truncated shard)")


def _decode_partitioned(sample: dict, lo: float, hi: float) -> tuple[str, int, torch.Tensor, int, int]:
    """(shard url, index, image in [0,1], label or -1, partition id) of one raw sample."""
    if PARTITION_FIELD not in sample:
        raise DataError(f"sample {sample['__key__']!r} in shard {sample['__url__']} has no {PARTITION_FIELD}: "
                        "not a partition-ordered shard (write_partitioned_shards)")
    try:
        part = int(sample[PARTITION_FIELD])
    except ValueError as exn:
        raise DataError(f"corrupt {PARTITION_FIELD} of sample {sample['__key__']!r} in shard "
                        f"{sample['__url__']}") from exn
    index, image, label = _decode_sample(sample, lo, hi)
    return sample["__url__"], index, image, label, part


def _collate_parts(batch: list[Partition], has_labels: bool) -> SubgraphBatch:
    indices, images, labels = (torch.cat(column) for column in zip(*batch))
    return indices, images, labels if has_labels else None


def _check_batch(partitions_per_batch: int) -> None:
    if isinstance(partitions_per_batch, bool) or not isinstance(partitions_per_batch, int) or partitions_per_batch < 1:
        raise DataError(f"partitions_per_batch must be a positive integer, got {partitions_per_batch!r}")
