"""Reproduction mode: the paper's tables and figures, one command each.

    sddecc reproduce table3 --dataset usps --seeds 10   # K-means, AE+K-means, SDDECC
    sddecc reproduce table4 --dataset usps --seeds 10   # ConvAE, +MI, +GCN, +MI+GCN
    sddecc reproduce fig6   --dataset usps              # t-SNE of each Table 4 model (seed 0)
    sddecc reproduce fig7   --dataset fashion-mnist     # the lambda1 x lambda2 grid

Every run is a run folder RUNS_DIR/DATASET/VARIANT-sSEED, trained from the dataset's paper
config (configs/paper/) stacked with the variant's file (configs/ablations/). A run that has
its metrics.json is kept as it is; one that stopped before the end is resumed from its own
checkpoints; so a reproduction that was interrupted continues where it stopped, and one run
can be deleted and redone alone. Each training run is its own process (`python
launch/train.py`, or the `--launcher` given, e.g. `accelerate launch --num_processes 2`):
Accelerate's state is per process. The table (sddecc_dist.paper.report) and the figures
(sddecc_dist.eval.plots) are written next to the runs, from the run folders only.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from sddecc_dist.config import ConfigError, load_config
from sddecc_dist.eval.baselines import kmeans_on_pixels
from sddecc_dist.eval.plots import embedding_tsne, lambda_heatmaps
from sddecc_dist.paper.published import TARGETS
from sddecc_dist.paper.report import report
from sddecc_dist.pipeline import prepare_dataset
from sddecc_dist.run_folder import RunFolder
from sddecc_dist.utils import console

# The dataset name of a manifest -> its paper config.
PAPER_CONFIGS = {
    "usps": "paper/usps.yaml",
    "mnist": "paper/mnist.yaml",
    "fashion-mnist": "paper/fashion_mnist.yaml",
}
# Table 4's rows, in the paper's order: variant name = its file in configs/ablations/.
TABLE4_VARIANTS = ["convae", "convae_mi", "convae_gcn", "convae_mi_gcn"]
# Table 3's rows that need no extra code: k-means on raw pixels, k-means on the ConvAE's codes,
# and the full model (the same runs as Table 4's last row).
TABLE3_VARIANTS = ["kmeans_pixels", "ae_kmeans", "convae_mi_gcn"]
# Figure 7's grid (section 4.5).
FIG7_LAMBDA1 = [0.001, 0.005, 0.01, 0.05, 0.1]
FIG7_LAMBDA2 = [1.0, 1.25, 1.5, 1.75, 2.0]


@dataclass
class PlannedRun:
    """One run folder of a reproduction: a training run, or the k-means-on-pixels baseline."""

    variant: str
    seed: int
    output_dir: Path
    config_files: list[Path]
    overrides: list[str] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return RunFolder(self.output_dir).is_finished

    @property
    def started(self) -> bool:
        return RunFolder(self.output_dir).is_started


def plan(target: str, dataset: str, seeds: list[int], runs_dir: Path, configs_dir: Path,
         overrides: list[str], base_config: Path | None = None) -> list[PlannedRun]:
    """The runs a target needs, in the order they are run. `base_config` replaces the
    dataset's paper config (e.g. a shorter schedule of one's own)."""
    if target not in TARGETS:
        raise ConfigError(f"unknown reproduction target {target!r}: expected one of {', '.join(TARGETS)}")
    if base_config is None and dataset not in PAPER_CONFIGS:
        raise ConfigError(f"the paper has no configuration for dataset {dataset!r} (expected one of "
                          f"{', '.join(PAPER_CONFIGS)}); give one with --config")
    base = Path(base_config) if base_config is not None else configs_dir / PAPER_CONFIGS[dataset]
    out = runs_dir / dataset

    def run(variant: str, seed: int, extra: list[str] | None = None, files: list[Path] | None = None) -> PlannedRun:
        if files is None:
            files = [] if variant == "kmeans_pixels" else [configs_dir / "ablations" / f"{variant}.yaml"]
        return PlannedRun(variant, seed, out / f"{variant}-s{seed}", [base, *files],
                          [*overrides, *(extra or [])])

    if target == "table3":
        return [run(v, s) for v in TABLE3_VARIANTS for s in seeds]
    if target == "table4":
        return [run(v, s) for v in TABLE4_VARIANTS for s in seeds]
    if target == "fig6":
        return [run(v, seeds[0]) for v in TABLE4_VARIANTS]
    return [run(f"lambda_{l1:g}_{l2:g}", s, [f"loss.mi_weight={l1}", f"loss.kl_weight={l2}"], files=[])
            for l1 in FIG7_LAMBDA1 for l2 in FIG7_LAMBDA2 for s in seeds]


def _train_script() -> Path:
    script = Path(__file__).resolve().parents[2] / "launch" / "train.py"
    if not script.is_file():
        raise ConfigError(f"{script} not found: reproduction runs from a checkout of sddecc-dist "
                          "(pip install -e .), where launch/train.py lives")
    return script


def train_command(run: PlannedRun, launcher: list[str]) -> list[str]:
    """The command line of one training run (resumed when its folder holds a started run)."""
    command = [*launcher, str(_train_script())]
    for path in run.config_files:
        command += ["--config", str(path)]
    command += [*run.overrides, f"seed={run.seed}", f"output_dir={run.output_dir}"]
    if run.started:
        command.append("train.resume=true")
    return command


def _ensure_data(config_files: list[Path], overrides: list[str]) -> str:
    """Prepare the dataset's shards if they are missing (the k-means baseline reads them);
    returns the data folder."""
    config = load_config(config_files, overrides)
    if not (Path(config.data_dir) / "dataset.json").is_file():
        if config.data.source is None:
            raise ConfigError(f"{config.data_dir} holds no prepared dataset and the config names no data.source")
        prepare_dataset(config.data.source, config.data_dir, from_dir=config.data.from_dir,
                        split=config.data.split, size=config.data.size,
                        samples_per_shard=config.data.samples_per_shard)
    return config.data_dir


def execute(runs: list[PlannedRun], launcher: list[str], dry_run: bool = False) -> None:
    """Run what is not finished, one run at a time."""
    for i, run in enumerate(runs, 1):
        label = f"[{i}/{len(runs)}] {run.variant} seed {run.seed} -> {run.output_dir}"
        if run.finished:
            console.log(f"{label}: finished, kept")
            continue
        if run.variant == "kmeans_pixels":
            console.log(f"{label}: k-means on raw pixels")
            if not dry_run:
                data_dir = _ensure_data(run.config_files, run.overrides)
                kmeans_on_pixels(data_dir, run.output_dir, seed=run.seed)
            continue
        command = train_command(run, launcher)
        console.log(f"{label}: {'resuming' if run.started else 'training'}\n  {shlex.join(command)}")
        if dry_run:
            continue
        started = time.time()
        if subprocess.run(command).returncode != 0:
            raise RuntimeError(f"run {run.output_dir} failed (command: {shlex.join(command)}); "
                               "rerun the same reproduce command to resume it")
        console.log(f"{label}: done in {time.time() - started:.0f} s")


def reproduce(target: str, dataset: str, seeds: list[int], runs_dir: str | Path = "runs/reproduce",
              configs_dir: str | Path = "configs", overrides: list[str] | None = None,
              launcher: str = "", dry_run: bool = False, base_config: str | Path | None = None,
              only: list[str] | None = None) -> list[Path]:
    """Run (or resume) what `target` needs and write its table or figures; returns their paths.
    `only`: the variants (e.g. ["kmeans_pixels", "ae_kmeans"]) to run and report, when the
    others do not fit the time at hand."""
    runs_dir, configs_dir = Path(runs_dir), Path(configs_dir)
    if not seeds:
        raise ConfigError("reproduction needs at least one seed")
    runs = plan(target, dataset, seeds, runs_dir, configs_dir, list(overrides or []),
                Path(base_config) if base_config is not None else None)
    if only:
        unknown = sorted(set(only) - {run.variant for run in runs})
        if unknown:
            raise ConfigError(f"{target} has no variant(s) {', '.join(unknown)}; its variants: "
                              f"{', '.join(dict.fromkeys(run.variant for run in runs))}")
        runs = [run for run in runs if run.variant in only]
    for run in runs:  # every config and override is checked before hours of training start
        if run.variant != "kmeans_pixels":
            load_config(run.config_files, run.overrides)
    execute(runs, shlex.split(launcher) or [sys.executable], dry_run)
    if dry_run:
        return []
    out = runs_dir / dataset
    folders = [run.output_dir for run in runs]
    if target in ("table3", "table4", "fig7"):
        table = out / f"{target}.md"
        report(folders, out=table)
        console.log(f"{target} for {dataset}: {table}")
        written = [table]
        if target == "fig7":
            written += list(lambda_heatmaps(folders, out))
        return written
    written = [embedding_tsne(run.output_dir, out / f"fig6_{run.variant}.png", seed=run.seed) for run in runs]
    console.log(f"fig6 for {dataset}: {', '.join(map(str, written))}")
    return written
