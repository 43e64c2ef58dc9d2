"""Results table: our finished runs next to the paper's numbers (Tables 3 and 4).

A run folder is what the trainer writes (`runs/NAME/`): `metrics.json` (final scores, written
last, so its absence means the run did not finish), `config.yaml` (optional here: a K-means
baseline may have none) and `metrics.jsonl` (per-epoch log). Runs are grouped by
(dataset, method, λ1, λ2, additions to the paper's method, N) over seeds; each row gives mean ± sample std, the paper's figure
and the difference. Our figures are those of the final epoch; the label-selected best epoch is
shown beside them for reference only, because choosing it needs the labels.

Every figure can be traced: the run folders behind each row are listed under the table.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import yaml

from sddecc_dist.utils import atomic_write_text

__all__ = [
    "PAPER",
    "PAPER_N",
    "PAPER_ROW",
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


class ReportError(ValueError):
    """A run folder that cannot be reported; the message names the folder and the problem."""


class PaperScore(NamedTuple):
    acc: float
    nmi: float


# The paper's numbers (Fu et al. 2021), ACC and NMI; it gives no ARI. Keys: paper row name,
# then dataset (our manifest names). Table 3 compares methods, Table 4 ablates SDDECC; its last
# row (ConvAE+MI+GCN) is SDDECC itself and repeats Table 3's figures.
PAPER: dict[str, dict[str, PaperScore]] = {
    # Table 3
    "K-means": {"usps": PaperScore(.6682, .6270), "mnist": PaperScore(.5322, .5004),
                "fashion-mnist": PaperScore(.4742, .5120)},
    "AE+K-means": {"usps": PaperScore(.6931, .6620), "mnist": PaperScore(.8076, .7303),
                   "fashion-mnist": PaperScore(.5853, .6142)},
    "DEC": {"usps": PaperScore(.7408, .7529), "mnist": PaperScore(.8655, .8372),
            "fashion-mnist": PaperScore(.5180, .5462)},
    "IDEC": {"usps": PaperScore(.7605, .7846), "mnist": PaperScore(.8806, .8672),
             "fashion-mnist": PaperScore(.5291, .5570)},
    "Deepcluster": {"usps": PaperScore(.5623, .5403), "mnist": PaperScore(.7971, .6615),
                    "fashion-mnist": PaperScore(.5422, .5100)},
    "SDCN": {"usps": PaperScore(.7789, .7926), "mnist": PaperScore(.8530, .8427),
             "fashion-mnist": PaperScore(.5780, .6047)},
    "SDDECC": {"usps": PaperScore(.7986, .8142), "mnist": PaperScore(.9022, .8958),
               "fashion-mnist": PaperScore(.6171, .6306)},
    # Table 4
    "ConvAE": {"usps": PaperScore(.6981, .6519), "mnist": PaperScore(.7762, .7450),
               "fashion-mnist": PaperScore(.5462, .5563)},
    "ConvAE+MI": {"usps": PaperScore(.7853, .7442), "mnist": PaperScore(.8350, .8023),
                  "fashion-mnist": PaperScore(.5922, .6091)},
    "ConvAE+GCN": {"usps": PaperScore(.7822, .7875), "mnist": PaperScore(.8574, .8449),
                   "fashion-mnist": PaperScore(.5843, .6167)},
}
PAPER["ConvAE+MI+GCN"] = PAPER["SDDECC"]  # Table 4's last row is SDDECC: one copy of its figures

# Our method name -> the paper's row. ConvAE+MI+K-means has no paper row.
PAPER_ROW: dict[str, str] = {
    "K-means": "K-means",
    "ConvAE+K-means": "AE+K-means",
    "ConvAE": "ConvAE",
    "ConvAE+MI": "ConvAE+MI",
    "ConvAE+GCN": "ConvAE+GCN",
    "ConvAE+MI+GCN": "SDDECC",
}

# How many images the paper clusters (train and test together). A run on fewer samples (a
# manifest may still be named "mnist") is flagged in the table: its Δ is not like for like.
PAPER_N: dict[str, int] = {"usps": 9298, "mnist": 70000, "fashion-mnist": 70000}

DATASET_ORDER = ["usps", "mnist", "fashion-mnist"]
METHOD_ORDER = ["K-means", "ConvAE+K-means", "ConvAE+MI+K-means", "ConvAE", "ConvAE+MI",
                "ConvAE+GCN", "ConvAE+MI+GCN"]

# Keys metrics.json must hold; acc/nmi/ari are absent for runs without labels.
REQUIRED_KEYS = ["dataset", "method", "seed", "n_samples", "epoch", "selection", "seconds"]
SCORE_KEYS = ["acc", "nmi", "ari"]


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
    lambda1: float | None  # loss.mi_weight of config.yaml
    lambda2: float | None  # loss.kl_weight of config.yaml
    additions: str = DASH  # what the config adds to the paper's method (ADDITIONS, CHOICES), or —
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

def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true/false in metrics.json is never a score.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path, folder: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ReportError(f"run {folder}: {path.name} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ReportError(f"run {folder}: {path.name} is not a JSON object")
    return value


# Loss keys of terms that are not in the paper's objective, and how the report names them.
ADDITIONS = {
    "balance_weight": "balance {}",
    "cluster_code_smoothing": "Eq. 18 on Â^{} codes",
    "neighbour_weight": "neighbour {}",
}
# Settings that depart from the paper when not at its value: (config section, key, the paper's
# value, name, applies without a joint phase). A run without a joint phase reports its initial
# partition, so the start method applies there too; q(y) does not.
CHOICES = [
    ("train", "center_init", "kmeans", "Ward start", True),
    ("loss", "cluster_prior", "uniform", "q(y) from the start", False),
    ("train", "head_warmup_target", "posterior", "head warm-up on the start", False),
]


def _read_loss_settings(folder: Path) -> tuple[float | None, float | None, str]:
    """λ1 = loss.mi_weight, λ2 = loss.kl_weight from config.yaml (None where not given: a
    K-means baseline folder may have no config.yaml, or one without a loss section), and the
    additions to the paper's method that are on (ADDITIONS, CHOICES), or — for none."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None, None, DASH
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ReportError(f"run {folder}: config.yaml is not valid YAML ({e})") from e
    loss = config.get("loss") if isinstance(config, dict) else None
    if not isinstance(loss, dict):
        return None, None, DASH
    values = {}
    for key in ("mi_weight", "kl_weight", *ADDITIONS):
        value = loss.get(key)
        if value is not None and not _is_number(value):
            raise ReportError(f"run {folder}: config.yaml loss.{key} is not a number: {value!r}")
        values[key] = None if value is None else float(value)
    train = config.get("train") if isinstance(config.get("train"), dict) else {}
    joint = not (loss.get("cluster_kl") is False or train.get("joint_epochs") == 0)
    additions = [text.format(f"{values[key]:g}") for key, text in ADDITIONS.items() if joint and values[key]]
    sections = {"loss": loss, "train": train}
    additions += [name for section, key, paper, name, without_joint in CHOICES
                  if (joint or without_joint) and sections[section].get(key, paper) != paper]
    return values["mi_weight"], values["kl_weight"], ", ".join(additions) or DASH


def _best_label_epoch(folder: Path) -> tuple[int, float, float] | None:
    """(epoch, acc, nmi) of the joint-phase epoch with the highest ACC (earliest on ties), or
    None without metrics.jsonl or without scored joint lines (no labels)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    best = None
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"run {folder}: metrics.jsonl line {number} is not valid JSON ({e})") from e
        if not isinstance(entry, dict) or entry.get("phase") != "joint":
            continue
        # Without labels the joint lines carry no scores; they cannot be selected on.
        if not (_is_number(entry.get("acc")) and _is_number(entry.get("nmi"))):
            continue
        if not isinstance(entry.get("epoch"), int):
            raise ReportError(f"run {folder}: metrics.jsonl line {number} has scores but no integer epoch")
        if best is None or entry["acc"] > best[1]:
            best = (entry["epoch"], float(entry["acc"]), float(entry["nmi"]))
    return best


def load_run(path: str | Path) -> RunResult:
    """Read one finished run folder; ReportError names the folder and what is wrong."""
    folder = Path(path)
    if not folder.is_dir():
        raise ReportError(f"run {folder}: folder does not exist")
    metrics_path = folder / "metrics.json"
    if not metrics_path.is_file():
        raise ReportError(f"run {folder}: run not finished (no metrics.json)")
    metrics = _read_json(metrics_path, folder)

    missing = [key for key in REQUIRED_KEYS if key not in metrics]
    if missing:
        raise ReportError(f"run {folder}: metrics.json lacks key(s) {', '.join(missing)} "
                          f"(written by newer trainers; rerun or add them)")
    for key in ("dataset", "method", "selection"):
        if not isinstance(metrics[key], str) or not metrics[key]:
            raise ReportError(f"run {folder}: metrics.json {key} must be a non-empty string, "
                              f"got {metrics[key]!r}")
    for key in ("seed", "n_samples"):
        if not isinstance(metrics[key], int) or isinstance(metrics[key], bool):
            raise ReportError(f"run {folder}: metrics.json {key} must be an integer, got {metrics[key]!r}")
    if not _is_number(metrics["seconds"]):
        raise ReportError(f"run {folder}: metrics.json seconds must be a number, got {metrics['seconds']!r}")
    # A K-means baseline has no epochs; it may write null.
    if metrics["epoch"] is not None and not isinstance(metrics["epoch"], int):
        raise ReportError(f"run {folder}: metrics.json epoch must be an integer or null, "
                          f"got {metrics['epoch']!r}")

    # Scores come together: all three with labels, none without. One alone is a broken file.
    present = [key for key in SCORE_KEYS if key in metrics]
    if present and len(present) != len(SCORE_KEYS):
        absent = [key for key in SCORE_KEYS if key not in metrics]
        raise ReportError(f"run {folder}: metrics.json has {', '.join(present)} but lacks key(s) "
                          f"{', '.join(absent)}")
    for key in present:
        if not _is_number(metrics[key]):
            raise ReportError(f"run {folder}: metrics.json {key} must be a number, got {metrics[key]!r}")
    scores = {key: float(metrics[key]) if key in metrics else None for key in SCORE_KEYS}

    lambda1, lambda2, additions = _read_loss_settings(folder)
    best = _best_label_epoch(folder)
    return RunResult(
        path=folder,
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
        lambda1=lambda1,
        lambda2=lambda2,
        additions=additions,
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


def paper_score(dataset: str, method: str) -> PaperScore | None:
    """The paper's (ACC, NMI) for our method on a dataset, or None where it has no figure."""
    row = PAPER_ROW.get(method)
    return None if row is None else PAPER[row].get(dataset)


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
        "run's config.yaml (— where it has none). *Additions* are what a run's config adds to the "
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
        lines += ["", "## Not finished (config.yaml but no metrics.json; not in the table)", ""]
        lines += [f"- `{folder}`" for folder in unfinished]
    return "\n".join(lines) + "\n"


# ---- entry point for `sddecc report` -------------------------------------------------------

def _is_run_folder(folder: Path) -> bool:
    return (folder / "metrics.json").is_file() or (folder / "config.yaml").is_file()


def _expand(paths: list[str | Path]) -> list[Path]:
    """Each path is a run folder or a directory whose immediate subdirectories are run folders.
    The same folder named twice (e.g. `runs/a` and `runs/`) is taken once."""
    folders: list[Path] = []
    seen: set[Path] = set()
    for given in map(Path, paths):
        if not given.is_dir():
            raise ReportError(f"{given}: no such run folder or directory")
        if _is_run_folder(given):
            found = [given]
        else:
            found = sorted(sub for sub in given.iterdir() if sub.is_dir() and _is_run_folder(sub))
            if not found:
                raise ReportError(f"{given}: not a run folder (no metrics.json or config.yaml) "
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
    finished = [folder for folder in folders if (folder / "metrics.json").is_file()]
    unfinished = [folder for folder in folders if not (folder / "metrics.json").is_file()]
    if unfinished and not allow_unfinished:
        raise ReportError("run(s) not finished (no metrics.json): "
                          + ", ".join(map(str, unfinished))
                          + "; wait for them, leave them out, or allow unfinished runs")
    if not finished:
        raise ReportError("no finished runs under " + ", ".join(map(str, paths)))
    groups = group_runs([load_run(folder) for folder in finished])
    text = markdown_report(groups, title=title, unfinished=unfinished)
    if out is not None:
        atomic_write_text(out, text)
    return text
