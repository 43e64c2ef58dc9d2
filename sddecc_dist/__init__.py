"""sddecc-dist: SDDECC unsupervised image clustering (DDECN + GCN), from webdataset shards."""

__version__ = "0.1.0"
