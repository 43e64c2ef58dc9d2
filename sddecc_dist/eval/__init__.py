"""Scoring and looking at clusterings: metrics (ACC, NMI, ARI), training-free baselines written
as run folders, and figures drawn from run folders. Reads runs through RunFolder; knows nothing
of the trainer."""
