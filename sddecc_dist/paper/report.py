"""Results table: our finished runs next to the paper's numbers (Tables 3 and 4).

Run folders are read through RunFolder (metrics.json, the config, metrics.jsonl). Runs are
grouped by (dataset, method, λ1, λ2, additions to the paper's method, N) over seeds; each row
gives mean ± sample std, the paper's figure (sddecc_dist.paper.published) and the difference.
The additions are the config's departures from the paper (sddecc_dist.config.departures). Our figures are those of the final epoch; the label-selected best epoch is
shown beside them for reference only, because choosing it needs the labels.

Every figure can be traced: the run folders behind each row are listed under the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sddecc_dist.config import departures
from sddecc_dist.paper.published import DATASET_ORDER, METHOD_ORDER, PAPER_N, PAPER_ROW, paper_score
from sddecc_dist.run_folder import SCORE_KEYS, RunFolder, RunFolderError
from sddecc_dist.utils import atomic_write_text

__all__ = [
    "Group",
    "ReportError",
    "RunResult",
    "Stat",
    "group_runs",
    "load_run",
    "markdown_report",
    "report",
]


DASH = "—"

# A run folder that cannot be reported; the message names the folder and the problem.
ReportError = RunFolderError


@dataclass
class RunResult:
    path: Path
    dataset: str
    method: str
    seed: int
    n_samples: int
    acc: float | None
    nmi: float | None
    ari: float | None
    seconds: float
    epoch: int | None
    selection: str
    lambda1: float | None  # loss.mi_weight of the run's config
    lambda2: float | None  # loss.kl_weight
    additions: str = DASH  # what the config changes in the paper's method (config.departures), or —
    # The best ACC over the logged joint epochs and the NMI of that epoch: chosen with labels.
    best_label_epoch: int | None = None
    best_label_acc: float | None = None
    best_label_nmi: float | None = None


@dataclass
class Stat:
    """Mean and sample standard deviation (ddof=1; 0 for a single run) over n runs."""
    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: list[float]) -> Stat:
        array = np.asarray(values, dtype=float)
        std = float(np.std(array, ddof=1)) if len(array) > 1 else 0.0
        return cls(float(np.mean(array)), std, len(array))


@dataclass
class Group:
    dataset: str
    method: str
    lambda1: float | None
    lambda2: float | None
    n_samples: int
    additions: str = DASH
    runs: list[RunResult] = field(default_factory=list)
    acc: Stat | None = None  # None when the runs have no labels
    nmi: Stat | None = None
    ari: Stat | None = None
    seconds: Stat | None = None
    # Label-selected best (reference only), over the runs that logged joint epochs with scores.
    best_label_acc: Stat | None = None
    best_label_nmi: Stat | None = None

    @property
    def seeds(self) -> list[int]:
        return [run.seed for run in self.runs]


# ---- loading -------------------------------------------------------------------------------

def _best_label_epoch(log: list[dict], folder: Path) -> tuple[int, float, float] | None:
    """(epoch, acc, nmi) of the joint-phase epoch with the highest ACC (earliest on ties), or
    None without scored joint lines (no labels, or no metrics.jsonl)."""
    best = None
    for entry in log:
        if entry.get("phase") != "joint":
            continue
        # Without labels the joint lines carry no scores; they cannot be selected on.
        if not all(isinstance(entry.get(key), (int, float)) for key in ("acc", "nmi")):
            continue
        if not isinstance(entry.get("epoch"), int):
            raise ReportError(f"run {folder}: {RunFolder.METRICS_LOG} has scores but no integer epoch")
        if best is None or entry["acc"] > best[1]:
            best = (entry["epoch"], float(entry["acc"]), float(entry["nmi"]))
    return best


def load_run(path: str | Path) -> RunResult:
    """Read one finished run folder; ReportError names the folder and what is wrong."""
    run = RunFolder(path)
    metrics = run.read_metrics()  # checked: required keys, types, all scores or none
    scores = {key: float(metrics[key]) if key in metrics else None for key in SCORE_KEYS}
    config = run.read_config()  # None for a baseline folder
    best = _best_label_epoch(run.read_metrics_log(), run.path)
    return RunResult(
        path=run.path,
        dataset=metrics["dataset"],
        method=metrics["method"],
        seed=metrics["seed"],
        n_samples=metrics["n_samples"],
        acc=scores["acc"],
        nmi=scores["nmi"],
        ari=scores["ari"],
        seconds=float(metrics["seconds"]),
        epoch=metrics["epoch"],
        selection=metrics["selection"],
        lambda1=None if config is None else config.loss.mi_weight,
        lambda2=None if config is None else config.loss.kl_weight,
        additions=DASH if config is None else ", ".join(departures(config)) or DASH,
        best_label_epoch=None if best is None else best[0],
        best_label_acc=None if best is None else best[1],
        best_label_nmi=None if best is None else best[2],
    )


# ---- grouping ------------------------------------------------------------------------------

def _optional_order(value: float | None) -> tuple[bool, float]:
    return (value is not None, value if value is not None else 0.0)


def _group_order(group: Group) -> tuple:
    dataset = (DATASET_ORDER.index(group.dataset), "") if group.dataset in DATASET_ORDER \
        else (len(DATASET_ORDER), group.dataset)
    method = (METHOD_ORDER.index(group.method), "") if group.method in METHOD_ORDER \
        else (len(METHOD_ORDER), group.method)
    return (dataset, method, _optional_order(group.lambda1), _optional_order(group.lambda2),
            group.additions != DASH, group.additions, group.n_samples)


def group_runs(runs: list[RunResult]) -> list[Group]:
    """Group runs by (dataset, method, λ1, λ2, additions, N) and summarise each over its seeds,
    in table order. N (the number of samples) is part of the key so a run on a subset never averages
    with one on the full set. Two runs with the same seed in one group are refused: a copied
    folder would otherwise count twice."""
    groups: dict[tuple, Group] = {}
    for run in runs:
        key = (run.dataset, run.method, run.lambda1, run.lambda2, run.additions, run.n_samples)
        group = groups.setdefault(key, Group(run.dataset, run.method, run.lambda1, run.lambda2,
                                             run.n_samples, run.additions))
        for other in group.runs:
            if other.seed == run.seed:
                raise ReportError(f"runs {other.path} and {run.path} are both seed {run.seed} of "
                                  f"{run.dataset} {run.method} (λ1={run.lambda1}, λ2={run.lambda2}); "
                                  f"a duplicated folder would count twice: report only one")
        group.runs.append(run)

    for group in groups.values():
        group.runs.sort(key=lambda r: r.seed)
        labelled = [run.acc is not None for run in group.runs]
        if any(labelled) and not all(labelled):
            names = ", ".join(str(run.path) for run in group.runs)
            raise ReportError(f"runs {names} are one group but only some have scores (labels)")
        if all(labelled):
            group.acc = Stat.of([run.acc for run in group.runs])
            group.nmi = Stat.of([run.nmi for run in group.runs])
            group.ari = Stat.of([run.ari for run in group.runs])
        group.seconds = Stat.of([run.seconds for run in group.runs])
        selected = [run for run in group.runs if run.best_label_acc is not None]
        if selected:
            group.best_label_acc = Stat.of([run.best_label_acc for run in selected])
            group.best_label_nmi = Stat.of([run.best_label_nmi for run in selected])
    return sorted(groups.values(), key=_group_order)


# ---- rendering -----------------------------------------------------------------------------


def _cell(text: str) -> str:
    # A | inside a cell would end it.
    return text.replace("|", "\\|")


def _stat(stat: Stat | None) -> str:
    return DASH if stat is None else f"{stat.mean:.4f} ± {stat.std:.4f}"


def _lambda(value: float | None) -> str:
    return DASH if value is None else f"{value:g}"


def _delta(ours: Stat | None, paper: float | None) -> str:
    return DASH if ours is None or paper is None else f"{ours.mean - paper:+.4f}"


def _method_cell(method: str) -> str:
    row = PAPER_ROW.get(method)
    return method if row is None or row == method else f"{method} ({row})"


def _dataset_cell(group: Group) -> str:
    paper_n = PAPER_N.get(group.dataset)
    mark = " *" if paper_n is not None and group.n_samples != paper_n else ""
    return f"{group.dataset} (N={group.n_samples}){mark}"


def _label_selected_cell(group: Group) -> str:
    if group.best_label_acc is None:
        return DASH
    text = f"{group.best_label_acc.mean:.4f} / {group.best_label_nmi.mean:.4f}"
    epochs = [run.best_label_epoch for run in group.runs if run.best_label_epoch is not None]
    text += f" (epoch{'s' if len(epochs) > 1 else ''} {', '.join(map(str, epochs))})"
    if group.best_label_acc.n != len(group.runs):
        text += f" ({group.best_label_acc.n} of {len(group.runs)} runs)"
    return text


def _group_label(group: Group) -> str:
    return (f"{group.dataset} (N={group.n_samples}), {group.method}, λ1={_lambda(group.lambda1)}, "
            f"λ2={_lambda(group.lambda2)}" + (f", additions: {group.additions}" if group.additions != DASH else ""))


def markdown_report(groups: list[Group], title: str | None = None,
                    unfinished: list[Path] | None = None) -> str:
    """The results table, an explanation of its columns, and the run folders behind each row.
    `unfinished` folders (allowed by the caller) are listed last as not finished."""
    title = title or "Clustering results against the paper (SDDECC, Fu et al. 2021)"
    header = ["dataset", "method (paper row)", "λ1", "λ2", "additions to the paper's method", "seeds (n: list)", "ACC ours",
              "ACC paper", "ΔACC", "NMI ours", "NMI paper", "ΔNMI", "ARI ours", "selection",
              "label-selected best epoch ACC / NMI (uses labels; reference only)", "seconds (mean)"]
    lines = [f"# {title}", "", "| " + " | ".join(header) + " |",
             "|" + "|".join(" --- " for _ in header) + "|"]
    for group in groups:
        paper = paper_score(group.dataset, group.method)
        selections = sorted({run.selection for run in group.runs})
        row = [
            _dataset_cell(group),
            _method_cell(group.method),
            _lambda(group.lambda1),
            _lambda(group.lambda2),
            group.additions,
            f"{len(group.runs)}: {', '.join(map(str, group.seeds))}",
            _stat(group.acc),
            DASH if paper is None else f"{paper.acc:.4f}",
            _delta(group.acc, None if paper is None else paper.acc),
            _stat(group.nmi),
            DASH if paper is None else f"{paper.nmi:.4f}",
            _delta(group.nmi, None if paper is None else paper.nmi),
            _stat(group.ari),
            "; ".join(selections),
            _label_selected_cell(group),
            f"{group.seconds.mean:.1f}",
        ]
        lines.append("| " + " | ".join(_cell(text) for text in row) + " |")

    lines += [
        "",
        "**Columns.** *ours* is the mean ± sample standard deviation (ddof = 1; 0 for a single "
        "run) over the seeds listed, each run scored at its **final epoch, with no label-based "
        "model selection** (the *selection* column quotes what each run recorded). *paper* is "
        "Table 3 (K-means, AE+K-means, SDDECC) or Table 4 (the ConvAE ablations) of the paper; "
        "it gives no ARI, and none for datasets other than USPS, MNIST and Fashion-MNIST (—). "
        "Δ = ours − paper, on the means. λ1 = `loss.mi_weight`, λ2 = `loss.kl_weight` from each "
        f"run's {RunFolder.CONFIG} (— where it has none). *Additions* are what a run's config adds to the "
        "paper's method: joint-phase terms Eq. 19 does not have (cluster balance, Eq. 18 on "
        "graph-smoothed codes, neighbour consistency), a Ward instead of a k-means start, q(y) "
        "from the start's cluster sizes instead of uniform, a head warm-up on the start's labels "
        "(docs/method.md); — for none: a row "
        "with additions is our method, not the paper's. The **label-selected** column is the mean over "
        "runs of the best logged joint-epoch ACC and the NMI of that epoch, with the epochs: "
        "picking that epoch needs the labels, so it is **not a result**, only a measure of how "
        "far the final epoch is from the best one seen.",
    ]
    if any(PAPER_N.get(g.dataset) not in (None, g.n_samples) for g in groups):
        lines += ["", "\\* N differs from the number of images the paper clusters ("
                  + ", ".join(f"{name} {n}" for name, n in PAPER_N.items())
                  + "): Δ on such a row is not a like-for-like comparison."]

    lines += ["", "## Runs behind each row", ""]
    for group in groups:
        folders = ", ".join(f"`{run.path}` (seed {run.seed})" for run in group.runs)
        lines.append(f"- {_group_label(group)}: {folders}")
    if unfinished:
        lines += ["", f"## Not finished ({RunFolder.CONFIG} but no {RunFolder.METRICS}; not in the table)", ""]
        lines += [f"- `{folder}`" for folder in unfinished]
    return "\n".join(lines) + "\n"


# ---- entry point for `sddecc report` -------------------------------------------------------

def _expand(paths: list[str | Path]) -> list[Path]:
    """Each path is a run folder or a directory whose immediate subdirectories are run folders.
    The same folder named twice (e.g. `runs/a` and `runs/`) is taken once."""
    folders: list[Path] = []
    seen: set[Path] = set()
    for given in map(Path, paths):
        if not given.is_dir():
            raise ReportError(f"{given}: no such run folder or directory")
        if RunFolder(given).is_run_folder:
            found = [given]
        else:
            found = sorted(sub for sub in given.iterdir() if sub.is_dir() and RunFolder(sub).is_run_folder)
            if not found:
                raise ReportError(f"{given}: not a run folder (no {RunFolder.METRICS} or {RunFolder.CONFIG}) "
                                  f"and none of its subdirectories is one")
        for folder in found:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                folders.append(folder)
    return folders


def report(paths: list[str | Path], out: Path | None = None, allow_unfinished: bool = False,
           title: str | None = None) -> str:
    """Load every run under `paths`, group, render the Markdown, write it atomically to `out`
    if given, and return it. Unfinished runs (config.yaml but no metrics.json) are an error
    naming them, unless `allow_unfinished`, which lists them under the table instead."""
    folders = _expand(paths)
    finished = [folder for folder in folders if RunFolder(folder).is_finished]
    unfinished = [folder for folder in folders if not RunFolder(folder).is_finished]
    if unfinished and not allow_unfinished:
        raise ReportError(f"run(s) not finished (no {RunFolder.METRICS}): "
                          + ", ".join(map(str, unfinished))
                          + "; wait for them, leave them out, or allow unfinished runs")
    if not finished:
        raise ReportError("no finished runs under " + ", ".join(map(str, paths)))
    groups = group_runs([load_run(folder) for folder in finished])
    text = markdown_report(groups, title=title, unfinished=unfinished)
    if out is not None:
        atomic_write_text(out, text)
    return text
