"""Small shared plumbing: atomic file writes and resource figures."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

# One console for all progress and log lines, on stderr so stdout stays clean. Redirected to a
# file or a CI log, a wide fixed width keeps each log line on one line.
console = Console(stderr=True, log_path=False, width=None if sys.stderr.isatty() else 200)


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, then rename it into place,
    so a crash never leaves a half-written artifact under the real name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# ---- distributed plumbing (the model and data layers never see ranks) ---------------------

def gather_rows(accelerator, ids: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Each rank holds `rows` for the global node ids `ids`; return the full (n, ...) matrix on
    every rank, checking that every node arrives exactly once. gloo's all_gather needs equal
    sizes, so shares are padded (id -1) to the largest one first."""
    if accelerator.num_processes > 1:
        ids = accelerator.pad_across_processes(ids.to(accelerator.device), dim=0, pad_index=-1)
        rows = accelerator.pad_across_processes(rows.contiguous(), dim=0)
        ids, rows = accelerator.gather(ids).cpu(), accelerator.gather(rows)
        keep = ids >= 0
        ids, rows = ids[keep], rows[keep.to(rows.device)]
    counts = torch.bincount(ids.cpu(), minlength=n)
    if len(counts) != n or not bool((counts == 1).all()):
        bad = int(torch.nonzero(counts[:n] != 1)[0]) if len(counts) == n else n
        raise RuntimeError(f"gathering {n} rows: node {bad} arrived {int(counts[bad]) if bad < n else 'out of range'} "
                           f"times (each rank must hold a disjoint share covering every node)")
    full = rows.new_empty((n, *rows.shape[1:]))
    full[ids.to(rows.device)] = rows
    return full
