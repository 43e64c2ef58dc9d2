"""Data and runs shared by several test modules, and the threads of each pytest-xdist worker."""

import os
from pathlib import Path

import numpy as np
import pytest

# The README's test command runs the suite in pytest-xdist workers, one per core. Each worker,
# and every process it starts (they inherit the environment), then gets its share of the cores:
# on this 2-core machine one thread, because a torch process with two threads beside a busy
# one ran 50 to 70 times slower (../shared/notes/platform.md). Set before torch, faiss or numba
# is imported, which read these variables once.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))
    for _variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ[_variable] = _threads


@pytest.fixture(scope="session")
def browser() -> str:
    """Headless Chromium's path, for the page tests (tests/test_show_page.py, tests/test_quickstart.py)."""
    from headless_chromium import find_browser

    path = find_browser()
    assert path, "the page test needs headless Chromium: apt-get install chromium (the README's test command does)"
    return path


@pytest.fixture(scope="session")
def coloured_digits_npz(tmp_path_factory) -> Path:
    """scikit-learn's digits (real data), each drawn in a random ink colour on a random paper
    colour: an RGB set whose colours say nothing of the class. Written once per session."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    ink, paper = rng.random((2, len(digits.images), 3, 1, 1))
    grey = (digits.images / 16.0)[:, None]
    path = tmp_path_factory.mktemp("coloured") / "coloured-digits.npz"
    np.savez(path, x=(grey * ink + (1 - grey) * paper).astype(np.float32), y=digits.target)
    return path


def short_digits_run(folder: Path, pretrain: int, warmup: int, joint: int) -> Path:
    """A real run of configs/digits.yaml on digits with a short schedule (seconds), data in
    FOLDER/data, run folder FOLDER/run; returns FOLDER."""
    from sddecc_dist.config import load_config
    from sddecc_dist.train.loop import train

    root = Path(__file__).resolve().parent.parent
    train(load_config(root / "configs/digits.yaml", [
        f"data_dir={folder / 'data'}", f"output_dir={folder / 'run'}", f"train.pretrain_epochs={pretrain}",
        f"train.head_warmup_epochs={warmup}", f"train.joint_epochs={joint}", "train.kmeans_n_init=1"]))
    return folder


# pytest-xdist's `--dist loadfile` hands each worker whole test files, in the order given here
# (`--no-loadscope-reorder`, pyproject.toml: by default it puts the files with the most tests
# first, which left the few-test files that run whole trainings to the end, one worker running
# them while the other idled). Longest first, so that the short files fill in at the end.
# Seconds per file, setup + call + teardown, from `PYTEST_ADDOPTS=--durations=0 bash .ci/run` at
# commit 1a4aff9; the files not named keep their collection order after these.
SECONDS_PER_FILE = {"test_distributed.py": 445, "test_generality.py": 285, "test_train.py": 191,
                    "test_quickstart.py": 182, "test_kill.py": 143, "test_reproduce.py": 113,
                    "test_scale_run.py": 109, "test_gpu_check.py": 99, "test_graph.py": 50}


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: -SECONDS_PER_FILE.get(item.path.name, 0))  # stable: a file's own order kept
