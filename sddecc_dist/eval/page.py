"""`sddecc show RUN_DIR`: a static HTML page of a finished run, for a person to look at its clusters.

    RUN/report/
      index.html                 the page: opens from a file:// URL, no server, no network
      sizes.png                  cluster sizes against the even share
      cluster-CCC.png            per cluster: its most confident members above its least confident
      confusion.png              classes x clusters (only when the data have labels)
      curves.png                 the training curves of metrics.jsonl
      map.png                    a 2-D UMAP of the codes of at most `map_samples` samples, by cluster

Everything is read from what the trainer wrote (metrics.json, metrics.jsonl, assignments.csv or
assignments.txt, checkpoints/final.pt) and the run's data folder, streamed once: memory holds the
labels, the chosen images and their codes, never the whole set. Labels, when the data have them,
are read here only to draw the confusion matrix and each cluster's majority class.
"""

from __future__ import annotations

import csv
import html
import io
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display; must precede the pyplot import

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from scipy.optimize import linear_sum_assignment  # noqa: E402

from sddecc_dist.data import DataError, stream_batches  # noqa: E402
from sddecc_dist.eval.plots import DPI, sample_indices  # noqa: E402
from sddecc_dist.run_folder import RunFolder, RunFolderError  # noqa: E402
from sddecc_dist.utils import atomic_write_bytes, atomic_write_text  # noqa: E402

__all__ = ["contact_sheet", "read_assignments_with_confidence", "write_page"]

TILE_PIXELS = 48  # each image drawn at least this wide (nearest-neighbour upscaling: pixels stay pixels)
SHEET_COLUMNS = 8


def write_page(run_dir: str | Path, data_dir: str | Path | None = None, per_cluster: int = 16,
               map_samples: int = 10_000, seed: int = 0, batch_size: int = 1024) -> Path:
    """Write RUN/report/ (see the module's docstring) and return the path of index.html.

    `data_dir` overrides the run config's data folder (a run moved away from its data);
    `per_cluster` images are shown of each cluster's most and of its least confident members;
    the map embeds the codes of a seeded sample of `map_samples` images."""
    run = RunFolder(run_dir)
    if not run.is_finished:
        raise RunFolderError(f"{run.path} has no {RunFolder.METRICS}: show needs a finished run")
    if per_cluster < 1 or map_samples < 2:
        raise ValueError(f"per_cluster={per_cluster} must be >= 1 and map_samples={map_samples} >= 2")
    metrics, log = run.read_metrics(), run.read_metrics_log()
    trained = run.load_model("final", data_dir)
    data_dir = Path(data_dir) if data_dir is not None else Path(trained.config.data_dir)
    manifest = trained.manifest
    clusters, confidence = read_assignments_with_confidence(run)
    if len(clusters) != manifest["count"]:
        raise DataError(f"{run.path}: {len(clusters)} assignments but {data_dir} holds {manifest['count']} samples")
    n_clusters = int(metrics.get("n_clusters") or trained.model.n_clusters)

    shown = _shown_members(clusters, confidence, n_clusters, per_cluster, seed)
    mapped = sample_indices(len(clusters), map_samples, seed)
    wanted = np.unique(np.concatenate([np.empty(0, np.int64)] + [ids for pair in shown.values() for ids in pair]))
    images, codes, labels = _read_data(data_dir, manifest, trained.model, wanted, mapped, batch_size)

    out = run.report_dir
    out.mkdir(parents=True, exist_ok=True)
    names = manifest.get("class_names") or [str(c) for c in range(int(manifest.get("n_classes") or 0))]
    _save_figure(out / "sizes.png", _sizes_figure(clusters, n_clusters))
    _save_figure(out / "curves.png", _curves_figure(log))
    _save_figure(out / "map.png", _map_figure(codes, clusters[mapped], n_clusters, seed))
    if labels is not None:
        _save_figure(out / "confusion.png", _confusion_figure(labels, clusters, n_clusters, names))
    for c, (confident, uncertain) in shown.items():
        sheet = contact_sheet([images[i] for i in confident], [images[i] for i in uncertain])
        if sheet is not None:
            atomic_write_bytes(out / f"cluster-{c:03d}.png", lambda f, s=sheet: s.save(f, format="PNG"))
    page = _html(run, metrics, manifest, clusters, confidence, labels, names, shown, n_clusters, len(mapped))
    atomic_write_text(out / "index.html", page)
    return out / "index.html"


def read_assignments_with_confidence(run: RunFolder) -> tuple[np.ndarray, np.ndarray | None]:
    """The run's final clusters and each sample's confidence (max_j Y_ij, or the self-labelling
    classifier's) from assignments.csv. A run with no posterior (a k-means or Ward start and no
    joint phase) has an empty confidence column, and a run older than assignments.csv only
    assignments.txt: both give no confidence."""
    path = run.path / RunFolder.ASSIGNMENTS_CSV
    if not path.exists():
        return run.read_assignments(), None
    clusters, confidence = [], []
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"cluster", "confidence"} <= set(reader.fieldnames):
            raise RunFolderError(f"{path}: expected the columns key, cluster, confidence, found {reader.fieldnames}")
        for row_number, row in enumerate(reader, start=2):
            try:
                clusters.append(int(row["cluster"]))
                confidence.append(float(row["confidence"]) if row["confidence"] != "" else math.nan)
            except (TypeError, ValueError) as e:
                raise RunFolderError(f"{path}, line {row_number}: {row} is not a cluster and a confidence "
                                     f"({e})") from e
    confidence = np.asarray(confidence, dtype=np.float64)
    if np.isnan(confidence).all():
        return np.asarray(clusters, dtype=np.int64), None
    if np.isnan(confidence).any():
        raise RunFolderError(f"{path}: line {int(np.flatnonzero(np.isnan(confidence))[0]) + 2} has no confidence "
                             f"but others have one")
    return np.asarray(clusters, dtype=np.int64), confidence


def contact_sheet(top: list[torch.Tensor], bottom: list[torch.Tensor]) -> Image.Image | None:
    """One PNG-ready grid: the `top` images in rows of SHEET_COLUMNS, a gap, then the `bottom`
    ones. Images are (C, H, W) floats in [0, 1], C = 1 or 3; None when both lists are empty."""
    if not top and not bottom:
        return None
    first = (top or bottom)[0]
    channels, height, width = first.shape
    scale = max(1, math.ceil(TILE_PIXELS / max(height, width)))
    tile_h, tile_w, pad = height * scale, width * scale, 2
    rows = math.ceil(len(top) / SHEET_COLUMNS) + math.ceil(len(bottom) / SHEET_COLUMNS)
    gap = 4 * pad if top and bottom else 0
    mode = "RGB" if channels == 3 else "L"
    sheet = Image.new(mode, (SHEET_COLUMNS * (tile_w + pad) + pad, rows * (tile_h + pad) + pad + gap),
                      (96, 96, 96) if mode == "RGB" else 96)
    y = pad
    for group in (top, bottom):
        for i, image in enumerate(group):
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8)
            array = pixels[0].numpy() if channels == 1 else pixels.permute(1, 2, 0).numpy()
            tile = Image.fromarray(array, mode).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            sheet.paste(tile, (pad + (i % SHEET_COLUMNS) * (tile_w + pad), y + (i // SHEET_COLUMNS) * (tile_h + pad)))
        if group:
            y += math.ceil(len(group) / SHEET_COLUMNS) * (tile_h + pad) + gap
    return sheet


# ---- what is read ------------------------------------------------------------------------------

def _shown_members(clusters: np.ndarray, confidence: np.ndarray | None, n_clusters: int, per_cluster: int,
                   seed: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per cluster, (its most confident members, its least confident ones), at most `per_cluster`
    each and never the same sample twice; without confidences, a seeded sample of members and none."""
    rng = np.random.default_rng(seed)
    shown = {}
    for c in range(n_clusters):
        members = np.flatnonzero(clusters == c)
        if confidence is None:
            chosen = np.sort(rng.choice(members, size=min(per_cluster, len(members)), replace=False))
            shown[c] = (chosen, np.empty(0, dtype=np.int64))
            continue
        ranked = members[np.argsort(-confidence[members], kind="stable")]
        top = ranked[:per_cluster]
        bottom = ranked[max(len(top), len(ranked) - per_cluster):][::-1]  # least confident first
        shown[c] = (top, bottom)
    return shown


def _read_data(data_dir: Path, manifest: dict, model, wanted: np.ndarray, mapped: np.ndarray,
               batch_size: int) -> tuple[dict[int, torch.Tensor], np.ndarray, np.ndarray | None]:
    """One pass over the shards: the images of `wanted`, the mean codes of `mapped` (in the
    order of `mapped`) and every label (None when the data have none)."""
    labels = np.full(manifest["count"], -1, dtype=np.int64) if manifest["has_labels"] else None
    is_wanted = np.zeros(manifest["count"], dtype=bool)
    is_wanted[wanted] = True
    map_row = np.full(manifest["count"], -1, dtype=np.int64)
    map_row[mapped] = np.arange(len(mapped))
    images: dict[int, torch.Tensor] = {}
    codes = np.zeros((len(mapped), model.latent_dim), dtype=np.float32)
    with torch.no_grad():
        for index, batch, batch_labels in stream_batches(data_dir, batch_size, manifest=manifest):
            ids = index.numpy()
            if labels is not None:
                labels[ids] = batch_labels.numpy()
            for row in np.flatnonzero(is_wanted[ids]):
                images[int(ids[row])] = batch[row].clone()
            rows = map_row[ids]
            if (rows >= 0).any():
                codes[rows[rows >= 0]] = model.mean_codes(batch[torch.from_numpy(rows >= 0)], "cpu").numpy()
    return images, codes, labels


# ---- figures -----------------------------------------------------------------------------------

def _save_figure(path: Path, figure) -> None:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    plt.close(figure)
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))


def _colours(n_clusters: int) -> np.ndarray:
    """One colour per cluster: tab10 / tab20 while they suffice, then evenly spaced hues."""
    if n_clusters <= 10:
        return plt.get_cmap("tab10")(np.arange(n_clusters))
    if n_clusters <= 20:
        return plt.get_cmap("tab20")(np.arange(n_clusters))
    return plt.get_cmap("hsv")(np.arange(n_clusters) / n_clusters)


def _sizes_figure(clusters: np.ndarray, n_clusters: int):
    sizes = np.bincount(clusters, minlength=n_clusters)
    figure, axis = plt.subplots(figsize=(max(6.0, 0.3 * n_clusters), 3.2))
    axis.bar(np.arange(n_clusters), sizes, color=_colours(n_clusters))
    axis.axhline(len(clusters) / n_clusters, color="black", linestyle="--", linewidth=1, label="even share")
    axis.set_xlabel("cluster")
    axis.set_ylabel("samples")
    axis.set_xticks(np.arange(n_clusters) if n_clusters <= 30 else np.arange(0, n_clusters, 5))
    axis.legend(loc="upper right")
    figure.tight_layout()
    return figure


def _curves_figure(log: list[dict]):
    """Three panels: pretraining losses by epoch; the joint phase's terms by epoch; the scores
    and label-free health of the start, the self-labelled partition and each logged joint epoch."""
    figure, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    pretrain = [r for r in log if r.get("phase") == "pretrain"]
    joint = [r for r in log if r.get("phase") == "joint"]
    _lines(axes[0], pretrain, ["recon"], "pretraining epoch")
    if any("global_mi" in r for r in pretrain):  # MI estimates are O(1), reconstruction O(10): own axis
        _lines(axes[0].twinx(), pretrain, ["global_mi", "local_mi"], None, colours=["tab:orange", "tab:green"],
               legend_at="upper center")
    _lines(axes[1], joint, ["recon", "cluster_kl", "balance", "start", "start_ce", "global_mi", "local_mi"],
           "joint epoch", log_scale=True)
    stages = ([r for r in log if r.get("phase") in ("kmeans", "self_label")] + joint)
    for r, x in zip(stages, range(len(stages))):
        r["_x"] = x
    _lines(axes[2], stages, ["acc", "nmi", "start_agreement", "size_entropy", "silhouette"], None,
           x_key="_x", markers=True)
    axes[2].set_xticks([r["_x"] for r in stages])
    axes[2].set_xticklabels([{"kmeans": "start", "self_label": "self-lab."}.get(r["phase"], str(r["epoch"]))
                             for r in stages], rotation=90, fontsize=7)
    axes[2].set_xlabel("stage / joint epoch")
    axes[0].set_title("pretraining")
    axes[1].set_title("joint phase: loss terms")
    axes[2].set_title("scores and health")
    figure.tight_layout()
    return figure


def _lines(axis, records: list[dict], keys: list[str], xlabel: str | None, x_key: str = "epoch",
           log_scale: bool = False, markers: bool = False, colours: list[str] | None = None,
           legend_at: str = "best") -> None:
    drawn = False
    for i, key in enumerate(keys):
        points = [(r[x_key], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            x, y = zip(*points)
            axis.plot(x, y, marker="o" if markers or len(points) == 1 else None, markersize=3, label=key,
                      color=colours[i] if colours else None)
            drawn = True
    if not drawn:
        axis.text(0.5, 0.5, "not logged in this run", ha="center", va="center", transform=axis.transAxes)
        return
    if log_scale and all(v > 0 for line in axis.get_lines() for v in line.get_ydata()):
        axis.set_yscale("log")
    if xlabel:
        axis.set_xlabel(xlabel)
    axis.legend(fontsize=7, loc=legend_at)


def _map_figure(codes: np.ndarray, clusters: np.ndarray, n_clusters: int, seed: int):
    import umap  # imported here: numba compiles on first import (seconds), and only this figure needs it

    neighbours = int(min(15, len(codes) - 1))
    embedded = umap.UMAP(n_components=2, n_neighbors=neighbours, min_dist=0.1, random_state=seed, n_jobs=1,
                         init="spectral" if len(codes) > n_clusters + 2 else "random").fit_transform(codes)
    figure, axis = plt.subplots(figsize=(7.0, 6.0))
    colours = _colours(n_clusters)
    point = max(1.0, min(12.0, 4000 / len(codes)))
    axis.scatter(embedded[:, 0], embedded[:, 1], c=colours[clusters], s=point, linewidths=0)
    for c in range(n_clusters):  # the cluster's number at its members' median
        where = embedded[clusters == c]
        if len(where):
            x, y = np.median(where, axis=0)
            axis.text(x, y, str(c), fontsize=9, weight="bold", ha="center", va="center",
                      bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.7, "linewidth": 0})
    axis.set_xticks([])
    axis.set_yticks([])
    axis.set_title(f"UMAP of the codes of {len(codes)} samples, coloured by cluster")
    figure.tight_layout()
    return figure


def _matched_order(contingency: np.ndarray) -> np.ndarray:
    """Clusters in the order of the classes they are matched to (Hungarian, as ACC matches
    them), unmatched clusters last."""
    rows, cols = linear_sum_assignment(contingency, maximize=True)
    matched = cols[np.argsort(rows)]
    return np.concatenate([matched, np.setdiff1d(np.arange(contingency.shape[1]), matched)])


def _contingency(labels: np.ndarray, clusters: np.ndarray, n_clusters: int) -> np.ndarray:
    classes = int(labels.max()) + 1
    contingency = np.zeros((classes, n_clusters), dtype=np.int64)
    np.add.at(contingency, (labels, clusters), 1)
    return contingency


def _confusion_figure(labels: np.ndarray, clusters: np.ndarray, n_clusters: int, names: list[str]):
    contingency = _contingency(labels, clusters, n_clusters)
    order = _matched_order(contingency)
    table = contingency[:, order]
    shares = table / np.maximum(table.sum(axis=1, keepdims=True), 1)
    side = max(5.0, 0.45 * max(table.shape))
    figure, axis = plt.subplots(figsize=(side + 1.5, side))
    shown = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if max(table.shape) <= 20:
        for (i, j), count in np.ndenumerate(table):
            if count:
                axis.text(j, i, str(count), ha="center", va="center", fontsize=7,
                          color="white" if shares[i, j] > 0.5 else "black")
    axis.set_xticks(np.arange(table.shape[1]), [str(c) for c in order], fontsize=7)
    axis.set_yticks(np.arange(table.shape[0]),
                    [names[i] if i < len(names) else str(i) for i in range(table.shape[0])], fontsize=7)
    axis.set_xlabel("cluster (in the order of the class it is matched to)")
    axis.set_ylabel("class")
    figure.colorbar(shown, ax=axis, label="share of the class", fraction=0.046)
    figure.tight_layout()
    return figure


# ---- the page ----------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 1180px; padding: 16px 24px;
       color: #1d1d1f; background: #fafafa; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
.sub { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 8px 0; } td, th { padding: 3px 10px; text-align: right; }
th { background: #eee; } td:first-child, th:first-child { text-align: left; }
.facts td { text-align: left; } .warn { background: #fff3cd; padding: 8px 12px; border-left: 4px solid #e0a800; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(420px, 1fr)); gap: 14px; }
.card { background: white; border: 1px solid #ddd; border-radius: 6px; padding: 8px 10px; }
.card h3 { margin: 0 0 4px 0; font-size: 15px; } .card p { margin: 2px 0 6px 0; color: #555; font-size: 13px; }
.card img, .figure img { image-rendering: pixelated; max-width: 100%; height: auto; }
.swatch { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 5px; }
nav a { margin-right: 14px; }
"""


def _html(run: RunFolder, metrics: dict, manifest: dict, clusters: np.ndarray, confidence: np.ndarray | None,
          labels: np.ndarray | None, names: list[str], shown: dict, n_clusters: int, n_mapped: int) -> str:
    e = html.escape
    n = len(clusters)
    sizes = np.bincount(clusters, minlength=n_clusters)
    colours = _colours(n_clusters)
    health = metrics.get("health") or {}
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{e(run.path.name)}: clusters"
             f"</title><style>{STYLE}</style></head><body>",
             f"<h1>{e(str(metrics.get('method', 'run')))} on {e(str(manifest.get('name', '?')))}</h1>",
             f"<p class='sub'>{e(str(run.path.resolve()))} &middot; {n} samples, {n_clusters} clusters &middot; "
             f"{e(str(metrics.get('selection', '')))}</p>",
             "<nav><a href='#summary'>summary</a><a href='#clusters'>clusters</a>"
             + ("<a href='#confusion'>confusion</a>" if labels is not None else "")
             + "<a href='#curves'>training</a><a href='#map'>map</a></nav>"]
    for warning in metrics.get("warnings") or []:
        parts.append(f"<p class='warn'>warning: degenerate result: {e(str(warning))}</p>")

    facts = []
    if labels is not None and all(k in metrics for k in ("acc", "nmi", "ari")):
        facts.append(("ACC / NMI / ARI (labels read only here)",
                      f"{metrics['acc']:.4f} / {metrics['nmi']:.4f} / {metrics['ari']:.4f}"))
    facts += [("clusters used", f"{health.get('clusters_used', int((sizes > 0).sum()))} of {n_clusters}"),
              ("cluster sizes", f"{sizes.min() / n:.1%} to {sizes.max() / n:.1%} of the samples "
                                f"(even share {1 / n_clusters:.1%})")]
    for key, what in (("size_entropy", "size entropy (1 = even)"), ("start_agreement", "agreement with the start"),
                      ("silhouette", "silhouette of the codes")):
        if isinstance(health.get(key), (int, float)):
            facts.append((what, f"{health[key]:.3f}"))
    if confidence is not None:
        facts.append(("confidence (max of Y)", f"median {np.median(confidence):.3f}, "
                                               f"{(confidence < 0.5).mean():.1%} of samples below 0.5"))
    for key, what, fmt in (("seconds", "wall time", "{:.0f} s"), ("peak_rss_mib", "peak memory", "{:.0f} MiB"),
                           ("seed", "seed", "{}"), ("world_size", "processes", "{}")):
        if key in metrics:
            facts.append((what, fmt.format(metrics[key])))
    parts.append("<h2 id='summary'>Summary</h2><table class='facts'>"
                 + "".join(f"<tr><td>{e(k)}</td><td>{e(v)}</td></tr>" for k, v in facts) + "</table>")
    parts.append("<div class='figure'><img src='sizes.png' alt='cluster sizes'></div>")

    parts.append("<h2 id='clusters'>Clusters</h2><p class='sub'>"
                 + ("Each sheet: the cluster's most confident members (top rows) above its least confident "
                    "ones (bottom rows, least confident first)." if confidence is not None else
                    "This run has no confidences (no posterior: a k-means or Ward start without a joint phase): "
                    "a random sample of each cluster's members.")
                 + "</p><div class='grid'>")
    contingency = _contingency(labels, clusters, n_clusters) if labels is not None else None
    for c in range(n_clusters):
        colour = "#%02x%02x%02x" % tuple(int(255 * v) for v in colours[c][:3])
        line = f"{sizes[c]} samples ({sizes[c] / n:.1%})"
        if confidence is not None and sizes[c]:
            line += f", mean confidence {confidence[clusters == c].mean():.3f}"
        if contingency is not None and sizes[c]:
            top = int(contingency[:, c].argmax())
            line += (f"; mostly {e(names[top] if top < len(names) else str(top))} "
                     f"({contingency[top, c] / sizes[c]:.0%})")
        image = (f"<img src='cluster-{c:03d}.png' alt='cluster {c} members'>" if sizes[c]
                 else "<p>empty: no sample is assigned to this cluster</p>")
        parts.append(f"<div class='card' id='cluster-{c}'><h3><span class='swatch' style='background:{colour}'>"
                     f"</span>cluster {c}</h3><p>{line}</p>{image}</div>")
    parts.append("</div>")
    if labels is not None:
        parts.append("<h2 id='confusion'>Classes against clusters</h2><div class='figure'>"
                     "<img src='confusion.png' alt='confusion matrix'></div>")
    parts.append("<h2 id='curves'>Training</h2><div class='figure'><img src='curves.png' alt='training curves'>"
                 "</div>")
    parts.append(f"<h2 id='map'>Map of the codes</h2><p class='sub'>UMAP of the mean codes of {n_mapped} "
                 "samples (a seeded sample), coloured by cluster.</p><div class='figure'>"
                 "<img src='map.png' alt='2-D map of the codes'></div>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
