"""The paper's figures from run folders: Figure 6 (t-SNE of the learned codes) and Figure 7
(ACC / NMI over the λ1 x λ2 grid).

Both read only what the trainer writes (checkpoints, config.yaml, metrics.json), so a figure can
be redrawn at any time without retraining. PNGs are written atomically, like every artifact.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.manifold import TSNE  # noqa: E402

from sddecc_dist.config import method_name  # noqa: E402
from sddecc_dist.data import DataError, load_all  # noqa: E402
from sddecc_dist.run_folder import RunFolder, RunFolderError, load_model  # noqa: E402
from sddecc_dist.utils import atomic_write_bytes  # noqa: E402

__all__ = ["DPI", "HEATMAP_FIGSIZE", "TSNE_FIGSIZE", "embedding_tsne", "lambda_grid", "lambda_heatmaps",
           "sample_indices"]

DPI = 100
TSNE_FIGSIZE = (7.0, 6.0)  # inches: a 700 x 600 PNG at DPI (no tight bbox, so the size is fixed)
HEATMAP_FIGSIZE = (6.0, 4.5)  # inches: 600 x 450


# ---- Figure 6: t-SNE of the mean codes --------------------------------------------------------

def sample_indices(n_total: int, n_samples: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded random subset of size n_samples (all when there are fewer),
    so the same seed always draws the same points."""
    if n_samples < 2:
        raise ValueError(f"n_samples={n_samples} must be at least 2 for a t-SNE embedding")
    if n_samples >= n_total:
        return np.arange(n_total)
    return np.sort(np.random.default_rng(seed).choice(n_total, size=n_samples, replace=False))


def embedding_tsne(
    run_dir: str | Path,
    out_png: str | Path,
    n_samples: int = 2000,
    seed: int = 0,
    model_file: str = "final",
    data_dir: str | Path | None = None,
) -> Path:
    """Figure 6: a 2-D t-SNE of the mean codes of a run's model, coloured by true class.

    The model and its config come from the run's model file `model_file` (final or pretrain);
    the images from the config's data_dir (`data_dir` overrides it, for a run folder moved away
    from its data). The title carries ACC / NMI from metrics.json only for the final model,
    since those scores belong to it, not to e.g. the pretrained one.
    """
    run, out_png = RunFolder(run_dir), Path(out_png)
    trained = load_model(run.model_file(model_file), data_dir)
    config, manifest, model = trained.config, trained.manifest, trained.model
    data_dir = Path(data_dir) if data_dir is not None else Path(config.data_dir)
    if not manifest["has_labels"]:
        raise DataError(f"{data_dir / 'dataset.json'} ({manifest['name']}) has no labels: "
                        "the t-SNE figure is coloured by true class")

    images, labels = load_all(data_dir, manifest)
    chosen = sample_indices(len(images), n_samples, seed)
    codes = model.mean_codes(images[torch.from_numpy(chosen)], "cpu").numpy()
    classes = labels.numpy()[chosen]
    # t-SNE needs perplexity < number of points; 30 (the default) whenever there are enough.
    perplexity = min(30.0, (len(chosen) - 1) / 3)
    embedded = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity).fit_transform(codes)

    title = f"{method_name(config)} on {manifest['name']}"
    if run.is_finished:
        metrics = run.read_metrics()
        title = f"{metrics.get('method', method_name(config))} on {metrics.get('dataset', manifest['name'])}"
        if model_file == "final" and "acc" in metrics and "nmi" in metrics:
            title += f": ACC {metrics['acc']:.3f} / NMI {metrics['nmi']:.3f}"
    if model_file != "final":
        title += f" ({model_file} model)"

    fig = plt.figure(figsize=TSNE_FIGSIZE, dpi=DPI)
    try:
        ax = fig.add_axes((0.08, 0.08, 0.74, 0.84))  # room on the right for the legend
        colours = plt.get_cmap("tab10" if classes.max() < 10 else "tab20")  # tab20 repeats past 20 classes
        for c in np.unique(classes):
            keep = classes == c
            ax.scatter(embedded[keep, 0], embedded[keep, 1], s=4, color=colours(int(c) % colours.N),
                       label=str(int(c)), linewidths=0)
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0), markerscale=3, frameon=False)
        _save_png(fig, out_png)
    finally:
        plt.close(fig)
    return out_png


# ---- Figure 7: ACC / NMI over the λ1 x λ2 grid ------------------------------------------------

def lambda_grid(run_dirs: Iterable[str | Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(λ1 values, λ2 values, ACC, NMI): the sorted distinct loss.mi_weight (λ1) and
    loss.kl_weight (λ2) of the runs, and (len(λ1), len(λ2)) matrices of the mean over seeds of
    each cell's final ACC / NMI, NaN where no run exists.

    Raises for a run folder without metrics.json or scores, for runs of different datasets, and
    for two runs of one cell with the same seed (the same run given twice would be counted twice).
    """
    runs = [_read_grid_run(Path(r)) for r in run_dirs]
    if not runs:
        raise ValueError("no run folders given")
    datasets = {r["dataset"] for r in runs}
    if len(datasets) > 1:
        by_dataset = {d: next(str(r["dir"]) for r in runs if r["dataset"] == d) for d in sorted(datasets)}
        raise ValueError("runs of different datasets cannot share one grid: "
                         + ", ".join(f"{d} (e.g. {where})" for d, where in by_dataset.items()))
    seen: dict[tuple[float, float, int], Path] = {}
    for r in runs:
        key = (r["lambda1"], r["lambda2"], r["seed"])
        if key in seen:
            raise ValueError(f"{seen[key]} and {r['dir']} are both λ1={key[0]:g}, λ2={key[1]:g}, seed {key[2]}: "
                             "give each run once")
        seen[key] = r["dir"]
    lambda1 = np.array(sorted({r["lambda1"] for r in runs}))
    lambda2 = np.array(sorted({r["lambda2"] for r in runs}))
    matrices = []
    for metric in ("acc", "nmi"):
        matrix = np.full((len(lambda1), len(lambda2)), np.nan)
        for i, l1 in enumerate(lambda1):
            for j, l2 in enumerate(lambda2):
                values = [r[metric] for r in runs if r["lambda1"] == l1 and r["lambda2"] == l2]
                if values:
                    matrix[i, j] = float(np.mean(values))
        matrices.append(matrix)
    return lambda1, lambda2, matrices[0], matrices[1]


def lambda_heatmaps(run_dirs: Iterable[str | Path], out_dir: str | Path) -> tuple[Path, Path]:
    """Figure 7: heatmaps of ACC and NMI over (λ1, λ2), each cell the mean over seeds, written
    to out_dir/fig7_acc.png and out_dir/fig7_nmi.png. A cell without runs stays blank ("—")."""
    run_dirs = [Path(r) for r in run_dirs]
    lambda1, lambda2, acc, nmi = lambda_grid(run_dirs)
    dataset = _read_grid_run(run_dirs[0])["dataset"]
    out_dir = Path(out_dir)
    paths = (out_dir / "fig7_acc.png", out_dir / "fig7_nmi.png")
    for label, matrix, path in zip(("ACC", "NMI"), (acc, nmi), paths):
        _heatmap(matrix, lambda1, lambda2, f"{label} on {dataset} (mean over seeds)", label, path)
    return paths


def _heatmap(matrix: np.ndarray, lambda1: np.ndarray, lambda2: np.ndarray, title: str, label: str,
             path: Path) -> None:
    """One annotated heatmap: λ2 across (columns), λ1 up (rows), NaN cells left blank."""
    colours = plt.get_cmap("viridis").with_extremes(bad="white")
    fig = plt.figure(figsize=HEATMAP_FIGSIZE, dpi=DPI)
    try:
        ax = fig.add_axes((0.15, 0.14, 0.65, 0.76))
        finite = matrix[np.isfinite(matrix)]
        low, high = float(finite.min()), float(finite.max())
        if low == high:  # one value everywhere: widen so the colour scale is defined
            low, high = low - 0.5, high + 0.5
        image = ax.imshow(np.ma.masked_invalid(matrix), cmap=colours, vmin=low, vmax=high,
                          origin="lower", aspect="auto")
        for i in range(matrix.shape[0]):
            for j in range(matrix.shape[1]):
                value = matrix[i, j]
                if np.isnan(value):
                    ax.text(j, i, "—", ha="center", va="center", color="black")
                else:
                    bright = (value - low) / (high - low) > 0.6  # viridis is light at the top
                    ax.text(j, i, f"{value:.3f}", ha="center", va="center", color="black" if bright else "white")
        ax.set_xticks(range(len(lambda2)), [f"{v:g}" for v in lambda2])
        ax.set_yticks(range(len(lambda1)), [f"{v:g}" for v in lambda1])
        ax.set_xlabel("λ2 (loss.kl_weight)")
        ax.set_ylabel("λ1 (loss.mi_weight)")
        ax.set_title(title, fontsize=10)
        fig.colorbar(image, cax=fig.add_axes((0.84, 0.14, 0.03, 0.76)), label=label)
        _save_png(fig, path)
    finally:
        plt.close(fig)


def _read_grid_run(run_dir: Path) -> dict:
    """λ1, λ2, seed, dataset and scores of one trainer run folder, with errors that name it."""
    run = RunFolder(run_dir)
    metrics = run.read_metrics()
    config = run.read_config()
    if config is None:
        raise RunFolderError(f"{run.config_path} holds no training config: not a trained SDDECC run")
    if "acc" not in metrics or "nmi" not in metrics:
        raise RunFolderError(f"{run.metrics_path} has no acc / nmi (a run on unlabelled data cannot be scored)")
    return {
        "dir": run_dir,
        "lambda1": config.loss.mi_weight,
        "lambda2": config.loss.kl_weight,
        "seed": int(metrics["seed"]),
        "dataset": metrics["dataset"],
        "acc": float(metrics["acc"]),
        "nmi": float(metrics["nmi"]),
    }


def _save_png(fig: plt.Figure, path: Path) -> None:
    """Write the figure to a temporary file beside `path` and rename it into place."""
    atomic_write_bytes(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
