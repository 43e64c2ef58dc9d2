"""Data layer: raw dataset readers and webdataset shards."""

from .shards import load_all, read_manifest, sample_pipeline, shard_urls, stream_batches, verify_shards, write_shards
from .sources import DATASET_FILES, DataError, RawDataset, load_source

__all__ = [
    "DATASET_FILES",
    "DataError",
    "RawDataset",
    "load_all",
    "load_source",
    "read_manifest",
    "sample_pipeline",
    "shard_urls",
    "stream_batches",
    "verify_shards",
    "write_shards",
]
