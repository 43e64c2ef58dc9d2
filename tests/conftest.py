"""Data and runs shared by several test modules."""

from pathlib import Path

import numpy as np
import pytest


# The README's quickstart: the default recipe, unchanged, on scikit-learn's digits.
QUICKSTART = ["configs/default.yaml", "data.source=digits"]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's quickstart in a temporary folder (about a minute): its result, and the folder
    holding data/ and run/. Shared by the tests that check the run and those that read it."""
    from sddecc_dist.config import load_config
    from sddecc_dist.train.loop import train

    tmp = tmp_path_factory.mktemp("quickstart")
    root = Path(__file__).resolve().parent.parent
    config = load_config(root / QUICKSTART[0],
                         [*QUICKSTART[1:], f"data_dir={tmp / 'data'}", f"output_dir={tmp / 'run'}"])
    return train(config), tmp


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
