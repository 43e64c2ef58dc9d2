"""Data layer: raw dataset readers, webdataset shards and their partition-ordered form."""

from .partitioned import (
    partition_fingerprint,
    read_partitioned_manifest,
    steps_per_epoch,
    stream_subgraphs,
    write_partitioned_shards,
)
from .shards import (
    load_all,
    manifest_fingerprint,
    rank_shards,
    read_manifest,
    sample_key,
    sample_keys,
    sample_pipeline,
    shard_indices,
    shard_urls,
    stream_batches,
    stream_share,
    verify_shards,
    write_shards,
)
from .sources import DATASET_FILES, DataError, RawDataset, load_source

__all__ = [
    "DATASET_FILES",
    "DataError",
    "RawDataset",
    "load_all",
    "load_source",
    "manifest_fingerprint",
    "partition_fingerprint",
    "rank_shards",
    "read_manifest",
    "read_partitioned_manifest",
    "sample_key",
    "sample_keys",
    "sample_pipeline",
    "shard_indices",
    "shard_urls",
    "steps_per_epoch",
    "stream_batches",
    "stream_share",
    "stream_subgraphs",
    "verify_shards",
    "write_partitioned_shards",
    "write_shards",
]
