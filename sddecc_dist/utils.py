"""Small shared plumbing below every layer: the console, atomic file writes, resource figures.

Distributed plumbing (ranks, gathering, signals) lives in sddecc_dist.train.distributed."""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

# One console for all progress and log lines, on stderr so stdout stays clean. Redirected to a
# file or a CI log, a wide fixed width keeps each log line on one line.
console = Console(stderr=True, log_path=False, width=None if sys.stderr.isatty() else 200)


def atomic_write_bytes(path: str | Path, write) -> None:
    """Call `write(file_object)` on a temporary file beside `path`, fsync it, rename it into
    place and fsync the folder, so that neither a crash nor a power cut leaves a half-written
    artifact under the real name (a reader sees the old file or the whole new one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_folder(path.parent)
    except Exception as error:
        full = disk_full_error(error, path)
        if full is None:
            raise
        raise full from error
    finally:
        if tmp.exists():
            tmp.unlink()


def disk_full_error(error: BaseException, path: str | Path) -> OSError | None:
    """An OSError(ENOSPC) naming `path` when `error`, raised by a library while it wrote `path`
    (torch.save's RuntimeError, safetensors' SafetensorError), came from a full disk (less than
    1 MiB left), so that it reads as one line like any OSError; None otherwise. Call it before
    the partial file is removed."""
    if isinstance(error, OSError):
        return None
    path = Path(path)
    try:
        free = shutil.disk_usage(path if path.is_dir() else path.parent).free
    except OSError:
        return None
    if free >= 1 << 20:
        return None
    return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({type(error).__name__}: {error})", str(path))


def remove_stale_temporaries(folder: str | Path, pattern: str = ".*.tmp-*") -> list[Path]:
    """Delete the temporaries (files or folders named `pattern`, ending in `-PID`: those of
    atomic_write_bytes by default) that a writer killed mid-write left in `folder`, those whose
    process no longer runs; return them."""
    removed = []
    for path in Path(folder).glob(pattern):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not process_exists(int(pid)):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def process_exists(pid: int) -> bool:
    """Whether a process of this host has this pid (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def fsync_folder(folder: str | Path) -> None:
    """Make a rename into `folder` durable (POSIX: the new entry lives in the folder's data)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch  # here, not at the top: the plumbing above serves processes that never load torch

    atomic_write_bytes(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, lambda f: f.write(text.encode()))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def peak_memory_mib() -> float:
    """Peak resident memory of this process so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
