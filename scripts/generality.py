"""The generality suite: the default recipe on image sets nobody tuned it for, beside two
baselines that need no training (issue 23).

    python scripts/generality.py --out runs/generality                      # every set, seeds 0 1 2
    python scripts/generality.py --out runs/generality --sets digits k40 --seeds 0

Each set is derived, seeded, from what is at hand (scikit-learn's digits, and USPS, MNIST and
Fashion-MNIST from --from, default ../shared/datasets) and written as DIR/sets/NAME.npz, then
prepared as shards. On each set it runs `configs/default.yaml` (only image size, channels and
K come from the data: no per-set override) and, beside it, k-means on the raw pixels and
N2D's UMAP + GMM on the raw pixels (10 dimensions, 20 neighbours or N/K if fewer, min_dist 0,
a full-covariance GMM). Results: DIR/generality.json and DIR/generality.md (rows = sets).
Everything already computed is kept, so an interrupted suite continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.cluster import KMeans

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from sddecc_dist.data import load_all, load_source  # noqa: E402
from sddecc_dist.eval.health import cluster_health  # noqa: E402
from sddecc_dist.eval.metrics import clustering_scores  # noqa: E402
from sddecc_dist.graph.knn import umap_knn  # noqa: E402
from sddecc_dist.model.initial_partition import gmm_partition, umap_embedding, umap_neighbours  # noqa: E402
from sddecc_dist.pipeline import prepare_dataset  # noqa: E402
from sddecc_dist.run_folder import RunFolder  # noqa: E402
from sddecc_dist.utils import atomic_write_json, atomic_write_text, console  # noqa: E402


# ---- the sets ------------------------------------------------------------------------------

def _raw(name: str, from_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, C, H, W) float32 in [0, 1] and labels of a built-in set."""
    raw = load_source(name, from_dir=None if name == "digits" else from_dir / name)
    lo, hi = raw.value_range
    return ((raw.images.astype(np.float32) - lo) / (hi - lo)), raw.labels.astype(np.int64)


def _subset(x, y, n, seed):
    keep = np.sort(np.random.default_rng(seed).choice(len(x), size=n, replace=False))
    return x[keep], y[keep]


def _per_class(x, y, classes, n_each, seed):
    rng = np.random.default_rng(seed)
    keep = np.concatenate([rng.choice(np.flatnonzero(y == c), size=n_each, replace=False) for c in classes])
    return x[keep], y[keep]


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    return np.stack([np.asarray(Image.fromarray(img[0]).resize((size, size), Image.BILINEAR))[None]
                     for img in x]).astype(np.float32)


def build_set(name: str, from_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one set of the suite (seeded: the same arrays every time)."""
    if name == "digits":
        return _raw("digits", from_dir)
    if name in ("usps", "usps-2000", "usps-1000", "usps-k2"):
        x, y = _raw("usps", from_dir)
        if name in ("usps-2000", "usps-1000"):
            return _subset(x, y, int(name.split("-")[1]), seed=1)
        if name == "usps-k2":  # two digit classes, relabelled 0 and 1
            keep = np.isin(y, [3, 8])
            return x[keep], (y[keep] == 8).astype(np.int64)
        return x, y
    if name in ("mnist-5000", "fmnist-5000"):
        return _subset(*_raw("mnist" if name.startswith("mnist") else "fashion-mnist", from_dir), 5000, seed=2)
    if name == "mnist+fmnist":  # one set of K = 20: digits 0-9 and garments 10-19
        xm, ym = _per_class(*_raw("mnist", from_dir), range(10), 250, seed=3)
        xf, yf = _per_class(*_raw("fashion-mnist", from_dir), range(10), 250, seed=3)
        return np.concatenate([xm, xf]), np.concatenate([ym, yf + 10])
    if name == "k40":  # 10 images of each of 40 classes: digits and garments, upright and turned 90°
        xm, ym = _per_class(*_raw("mnist", from_dir), range(10), 20, seed=4)
        xf, yf = _per_class(*_raw("fashion-mnist", from_dir), range(10), 20, seed=4)
        parts = []
        for offset, (x, y) in enumerate(((xm, ym), (xf, yf))):
            upright = np.concatenate([np.flatnonzero(y == c)[:10] for c in range(10)])
            turned = np.concatenate([np.flatnonzero(y == c)[10:] for c in range(10)])
            parts.append((x[upright], y[upright] + 20 * offset))
            parts.append((np.rot90(x[turned], 1, axes=(2, 3)).copy(), y[turned] + 20 * offset + 10))
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    if name in ("mnist-32px", "mnist-64px"):
        x, y = _subset(*_raw("mnist", from_dir), 2000, seed=5)
        return _resize(x, int(name.split("-")[1][:-2])), y
    if name == "mnist-rgb":  # digits in a random colour on a random background, colours not tied to the class
        x, y = _subset(*_raw("mnist", from_dir), 2000, seed=6)
        rng = np.random.default_rng(6)
        ink, paper = rng.random((len(x), 3, 1, 1)), rng.random((len(x), 3, 1, 1))
        return (x * ink + (1 - x) * paper).astype(np.float32), y
    if name == "mnist-imbalanced":  # class c has 100 + 400 c / 9 images: the largest 5x the smallest
        x, y = _raw("mnist", from_dir)
        rng = np.random.default_rng(7)
        keep = np.concatenate([rng.choice(np.flatnonzero(y == c), size=100 + round(400 * c / 9), replace=False)
                               for c in range(10)])
        return x[np.sort(keep)], y[np.sort(keep)]
    raise SystemExit(f"unknown set {name!r}; sets: {', '.join(SETS)}")


SETS = ["digits", "usps", "usps-2000", "usps-1000", "usps-k2", "mnist-5000", "fmnist-5000", "mnist+fmnist", "k40",
        "mnist-32px", "mnist-64px", "mnist-rgb", "mnist-imbalanced"]
FAST = ["digits", "usps-1000", "k40"]  # digits: the quickstart test (tests/test_quickstart.py); the others: tests/test_generality.py


# ---- one row ------------------------------------------------------------------------------

def baselines(data_dir: Path, seed: int, umap_gmm: bool = True) -> dict:
    """k-means (10 starts) and UMAP + GMM (10 starts; unless `umap_gmm` is False) on the raw
    pixels, as the recipe reads them."""
    images, labels = load_all(data_dir)
    x, y = images.flatten(1).numpy(), labels.numpy()
    k = len(np.unique(y))
    started = time.time()
    kmeans = KMeans(k, n_init=10, random_state=seed).fit_predict(x)
    kmeans_seconds = time.time() - started
    result = {"kmeans": {**clustering_scores(y, kmeans), "seconds": round(kmeans_seconds, 1)}}
    if not umap_gmm:
        return result
    started = time.time()
    embedding = umap_embedding(x, k, seed, knn=umap_knn(x, umap_neighbours(len(x), k)))
    umap_gmm = gmm_partition(embedding, k, n_init=10, seed=seed)
    return {**result, "umap_gmm": {**clustering_scores(y, umap_gmm), "seconds": round(time.time() - started, 1),
                                   **cluster_health(umap_gmm, k)}}


def recipe(data_dir: Path, run_dir: Path, seed: int, config: Path, threads: int | None) -> dict:
    """The recipe as a user runs it: one `launch/train.py` process."""
    run = RunFolder(run_dir)
    if not run.is_finished:
        command = [sys.executable, str(ROOT / "launch" / "train.py"), "--config", str(config),
                   f"data_dir={data_dir}", f"output_dir={run_dir}", f"seed={seed}"]
        if threads:
            command.append(f"train.num_threads={threads}")
        if run.is_started:
            command.append("train.resume=true")
        started = time.time()
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"the recipe failed on {data_dir} (seed {seed}):\n{out.stderr[-3000:]}")
        wall = time.time() - started
        metrics = run.read_metrics()
        metrics["wall_seconds"] = round(wall, 1)
        run.write_metrics(metrics)
    return run.read_metrics()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--sets", nargs="+", default=SETS, choices=SETS, metavar="SET")
    parser.add_argument("--fast", action="store_true",
                        help=f"only the fast part: {', '.join(FAST)} (digits: the quickstart's test; the "
                             f"others: tests/test_generality.py)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--from", dest="from_dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                        help="folder with usps/, mnist/, fashion-mnist/ raw files")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--no-umap-baseline", dest="umap_baseline", action="store_false",
                        help="k-means on the raw pixels only (CI's fast sets: the test compares with k-means)")
    parser.add_argument("--threads", type=int, help="torch threads of each training run (default: torch's own, "
                                                    "one per core unless OMP_NUM_THREADS says otherwise)")
    args = parser.parse_args()
    sets = FAST if args.fast else args.sets
    results_path = args.out / "generality.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name in sets:
        data_dir = args.out / "data" / name
        if not (data_dir / "dataset.json").is_file():
            x, y = build_set(name, args.from_dir)
            npz = args.out / "sets" / f"{name}.npz"
            npz.parent.mkdir(parents=True, exist_ok=True)
            np.savez(npz, x=x, y=y)
            prepare_dataset(str(npz), data_dir, samples_per_shard=max(1000, len(x) // 2))
        row = results.get(name, {})
        manifest = json.loads((data_dir / "dataset.json").read_text())
        row.update(n=manifest["count"], image=manifest["image_shape"], k=manifest["n_classes"])
        runs = row.setdefault("runs", {})
        for seed in args.seeds:
            key = str(seed)
            if key not in runs or (args.umap_baseline and "umap_gmm" not in runs[key]["baselines"]):
                console.log(f"{name}, seed {seed}: baselines")
                runs.setdefault(key, {})["baselines"] = baselines(data_dir, seed, args.umap_baseline)
            if "recipe" not in runs[key]:
                console.log(f"{name}, seed {seed}: the recipe")
                metrics = recipe(data_dir, args.out / "runs" / f"{name}-s{seed}", seed, args.config, args.threads)
                runs[key]["recipe"] = {key: metrics.get(key) for key in (
                    "acc", "nmi", "ari", "n_used_clusters", "seconds", "wall_seconds", "peak_rss_mib", "health",
                    "warnings")}
                run_dir = args.out / "runs" / f"{name}-s{seed}"
                runs[key]["recipe"]["start"] = _phase_scores(run_dir, "kmeans")
                runs[key]["recipe"]["self_labelled"] = _phase_scores(run_dir, "self_label")
            results[name] = row
            atomic_write_json(results_path, results)
    atomic_write_text(args.out / "generality.md", markdown(results, sets))
    console.log(f"wrote {results_path} and {args.out / 'generality.md'} "
                f"(peak RSS of this process {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB)")
    return 0


def _phase_scores(run_dir: Path, phase: str) -> dict | None:
    """The scores the trainer logged after a stage: the start ("kmeans") or the self-labelling
    stage ("self_label"); None when the run has no such line."""
    for line in RunFolder(run_dir).read_metrics_log():
        if line.get("phase") == phase and "acc" in line:
            return {"acc": line["acc"], "nmi": line["nmi"]}
    return None


def _mean(values: list, digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    return f"{np.mean(values):.{digits}f}" + (f" ± {np.std(values, ddof=1):.{digits}f}" if len(values) > 1 else "")


def markdown(results: dict, sets: list[str]) -> str:
    header = ["set", "N", "image", "K", "seeds", "recipe ACC", "recipe NMI", "start ACC", "self-labelled ACC",
              "k-means ACC",
              "k-means NMI", "UMAP+GMM ACC", "UMAP+GMM NMI", "clusters used", "largest cluster", "seconds",
              "peak RSS MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name in [s for s in SETS if s in results]:
        row = results[name]
        runs = [r for r in row["runs"].values() if "recipe" in r]
        recipe_runs = [r["recipe"] for r in runs]
        lines.append("| " + " | ".join([
            name, str(row["n"]), "×".join(map(str, row["image"])), str(row["k"]), str(len(runs)),
            _mean([r["acc"] for r in recipe_runs]), _mean([r["nmi"] for r in recipe_runs]),
            _mean([(r.get("start") or {}).get("acc") for r in recipe_runs]),
            _mean([(r.get("self_labelled") or {}).get("acc") for r in recipe_runs]),
            _mean([r["baselines"]["kmeans"]["acc"] for r in runs]),
            _mean([r["baselines"]["kmeans"]["nmi"] for r in runs]),
            _mean([r["baselines"].get("umap_gmm", {}).get("acc") for r in runs]),
            _mean([r["baselines"].get("umap_gmm", {}).get("nmi") for r in runs]),
            " ".join(str(r["n_used_clusters"]) for r in recipe_runs),
            " ".join(f"{r['health']['size_max']:.2f}" for r in recipe_runs),
            _mean([r["seconds"] for r in recipe_runs], 0),
            _mean([r["peak_rss_mib"] for r in recipe_runs], 0),
        ]) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
