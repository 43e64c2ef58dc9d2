"""A run folder, and the one place that names the files in it.

    RUN/
      config.yaml                the run's resolved config (written first)
      metrics.jsonl              one line per logged epoch: pretrain, start, joint
      initial_assignments.txt    the start: the partition the centres μ_y come from
      self_label_assignments.txt the self-labelling stage's partition, which replaces the start
      assignments.txt            the final cluster of every sample, line i for sample i
      assignments.csv            the same with each sample's key and confidence (max_j Y_ij; empty without a posterior)
      metrics.json               final scores and facts of the run (written last: a finished run)
      checkpoints/
        ckpt-P-EEEEE-SSSSSSS/    resumable trainer state: phase P, epoch, step (train/checkpoint.py):
          trainer_state.json     the trainer's own state, beside Accelerate's files
        .tmp-ckpt-.../           one being written (never read)
        pretrain.pt, final.pt    model files: weights and config (`write_model_file`, `load_model`)
      predict/                   what `sddecc predict` needs of the training graph (train/predict.py):
        graph_rows.pt            the training nodes' degrees, assignments and confidence; the index's spec
        layer-inputs-L.npy       GCN layer L's input rows of every training node (memory-mapped by predict)
        knn.index                the FAISS index of the graph's features
      previous/TIME/             an earlier run of this folder, moved there whole by `--new-version`
      report/                    `sddecc show`'s page: index.html and its PNGs (eval/page.py)
      .inference-spool/          while the final inference runs: each layer's rows, per rank (train/inference.py)
      .lock                      while a training runs here: its host, pid and Slurm job (RunLock)

A run folder is never overwritten: a fresh run into a folder that holds a run refuses, unless
it is told to continue it (`--resume`) or to move it into previous/ first (`--new-version`).
The trainer writes through a RunFolder; the report, plots, `evaluate` and the analysis scripts
read through one. Model files are read by one reader (`read_model_file`, `load_model`), used by
training's `init_from`, plots and scripts alike.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from sddecc_dist.config import Config, ConfigError, config_from_dict, to_dict
from sddecc_dist.data import read_manifest
from sddecc_dist.model.sddecc import SDDECC
from sddecc_dist.utils import atomic_torch_save, atomic_write_json, atomic_write_text, process_exists

__all__ = ["METRICS_REQUIRED_KEYS", "SCORE_KEYS", "RunFolder", "RunFolderError", "RunLock", "TrainedModel",
           "assignments_csv", "load_model", "read_model_file"]

# Keys metrics.json must hold; acc/nmi/ari come together, and only when the data has labels.
METRICS_REQUIRED_KEYS = ("dataset", "method", "seed", "n_samples", "epoch", "selection", "seconds")
SCORE_KEYS = ("acc", "nmi", "ari")
MODEL_FILES = ("pretrain", "final")


class RunFolderError(ValueError):
    """A run folder, or a file in it, that cannot be read; the message names it."""


@dataclass
class TrainedModel:
    config: Config  # the run's resolved config
    manifest: dict  # its dataset's manifest
    model: SDDECC  # with the file's weights, in eval mode
    phase: str  # the phase the file was written after (pretrain, joint)
    epoch: int


class RunFolder:
    CONFIG = "config.yaml"
    METRICS = "metrics.json"
    METRICS_LOG = "metrics.jsonl"
    ASSIGNMENTS = "assignments.txt"
    ASSIGNMENTS_CSV = "assignments.csv"
    INITIAL_ASSIGNMENTS = "initial_assignments.txt"
    SELF_LABEL_ASSIGNMENTS = "self_label_assignments.txt"
    CHECKPOINTS = "checkpoints"
    TRAINER_STATE = "trainer_state.json"
    PREVIOUS = "previous"
    PREDICT = "predict"
    INFERENCE_SPOOL = ".inference-spool"
    REPORT = "report"
    LOCK = ".lock"
    # What a run writes at the folder's top level (checkpoints.previous: older trainers set an
    # earlier run's checkpoints aside there). Anything else in the folder is not the run's.
    RUN_ENTRIES = (CONFIG, METRICS, METRICS_LOG, ASSIGNMENTS, ASSIGNMENTS_CSV, INITIAL_ASSIGNMENTS,
                   SELF_LABEL_ASSIGNMENTS, CHECKPOINTS, PREDICT, INFERENCE_SPOOL, REPORT, "checkpoints.previous")

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # ---- paths -------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def metrics_log_path(self) -> Path:
        return self.path / self.METRICS_LOG

    @property
    def assignments_path(self) -> Path:
        return self.path / self.ASSIGNMENTS

    @property
    def initial_assignments_path(self) -> Path:
        return self.path / self.INITIAL_ASSIGNMENTS

    @property
    def self_label_assignments_path(self) -> Path:
        return self.path / self.SELF_LABEL_ASSIGNMENTS

    @property
    def checkpoints(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def previous(self) -> Path:
        return self.path / self.PREVIOUS

    @property
    def lock_path(self) -> Path:
        return self.path / self.LOCK

    @property
    def predict_state_path(self) -> Path:
        return self.path / self.PREDICT / "graph_rows.pt"

    @property
    def report_dir(self) -> Path:
        """`sddecc show`'s page and its figures (eval/page.py)."""
        return self.path / self.REPORT

    @property
    def inference_spool(self) -> Path:
        """Where the final inference keeps each layer's rows while it runs (removed after)."""
        return self.path / self.INFERENCE_SPOOL

    @property
    def predict_index_path(self) -> Path:
        return self.path / self.PREDICT / "knn.index"

    def predict_layer_inputs_path(self, layer: int) -> Path:
        """GCN layer `layer`'s input rows of every training node, an (N, width) float32 .npy."""
        return self.path / self.PREDICT / f"layer-inputs-{layer}.npy"

    def model_file(self, name: str) -> Path:
        """checkpoints/pretrain.pt or checkpoints/final.pt."""
        if name not in MODEL_FILES:
            raise ValueError(f"unknown model file {name!r}: expected one of {', '.join(MODEL_FILES)}")
        return self.checkpoints / f"{name}.pt"

    @staticmethod
    def checkpoint_name(phase_index: int, epoch: int, step: int) -> str:
        """The folder name of a trainer checkpoint; names sort in training order."""
        return f"ckpt-{phase_index}-{epoch:05d}-{step:07d}"

    def checkpoint_dir(self, name: str) -> Path:
        return self.checkpoints / name

    def partial_checkpoint_dir(self, name: str) -> Path:
        """Where a checkpoint is written before it is renamed into place."""
        return self.checkpoints / f".tmp-{name}"

    def trainer_state_path(self, checkpoint_dir: Path) -> Path:
        return checkpoint_dir / self.TRAINER_STATE

    def checkpoint_dirs(self) -> list[Path]:
        """Trainer checkpoint folders (complete or not: the reader decides), newest first."""
        return sorted(self.checkpoints.glob("ckpt-*"), key=lambda p: p.name, reverse=True)

    # ---- state -------------------------------------------------------------------------------
    @property
    def is_finished(self) -> bool:
        return self.metrics_path.is_file()

    @property
    def is_started(self) -> bool:
        return self.config_path.is_file()

    @property
    def is_run_folder(self) -> bool:
        return self.is_finished or self.is_started

    def run_entries(self) -> list[Path]:
        """The files and folders of a run present here (an empty checkpoints/ is none)."""
        entries = [self.path / name for name in self.RUN_ENTRIES if (self.path / name).exists()]
        return [p for p in entries if not (p.is_dir() and not any(p.iterdir()))]

    def holds_run(self) -> bool:
        return bool(self.run_entries())

    def move_to_previous(self) -> Path:
        """Move the run held here into previous/TIME/ (UTC, seconds) by renaming its entries:
        nothing is copied, replaced or deleted. Returns that folder."""
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        target, suffix = self.previous / stamp, 1
        while target.exists():
            target, suffix = self.previous / f"{stamp}-{suffix}", suffix + 1
        target.mkdir(parents=True)
        for entry in self.run_entries():
            entry.rename(target / entry.name)
        return target

    # ---- writing (the trainer, the baselines) -----------------------------------------------
    def write_config(self, config: Config | dict) -> None:
        values = to_dict(config) if isinstance(config, Config) else config
        atomic_write_text(self.config_path, yaml.safe_dump(values, sort_keys=False))

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_metrics(self, result: dict) -> None:
        atomic_write_json(self.metrics_path, result)

    def write_assignments(self, assignments: np.ndarray) -> None:
        atomic_write_text(self.assignments_path, _lines(assignments))

    def write_assignments_csv(self, keys: list[str], assignments: np.ndarray, confidence: np.ndarray | None) -> None:
        atomic_write_text(self.path / self.ASSIGNMENTS_CSV, assignments_csv(keys, assignments, confidence))

    def write_initial_assignments(self, assignments: np.ndarray) -> None:
        atomic_write_text(self.initial_assignments_path, _lines(assignments))

    def write_self_label_assignments(self, assignments: np.ndarray) -> None:
        atomic_write_text(self.self_label_assignments_path, _lines(assignments))

    def write_model_file(self, name: str, model: torch.nn.Module, config: Config, phase: str, epoch: int) -> None:
        """A plain model file (weights + config) for other stages and scripts."""
        atomic_torch_save({"phase": phase, "epoch": epoch, "model": model.state_dict(), "config": to_dict(config)},
                          self.model_file(name))

    # ---- reading -----------------------------------------------------------------------------
    def read_assignments(self) -> np.ndarray:
        return self._read_labels(self.assignments_path, "a finished run folder")

    def read_initial_assignments(self) -> np.ndarray:
        return self._read_labels(self.initial_assignments_path, "a run past its start")

    def read_self_label_assignments(self) -> np.ndarray:
        return self._read_labels(self.self_label_assignments_path, "a run past its self-labelling stage")

    def _read_labels(self, path: Path, what: str) -> np.ndarray:
        if not path.is_file():
            raise RunFolderError(f"{path} does not exist: is {self.path} {what}?")
        try:
            return np.loadtxt(path, dtype=np.int64, ndmin=1)
        except ValueError as error:
            raise RunFolderError(f"{path} is not one integer per line: {error}") from error

    def read_metrics(self) -> dict:
        """metrics.json, checked: every required key, integer seed and N, numeric seconds and
        scores, the three scores together or none."""
        if not self.path.is_dir():
            raise RunFolderError(f"run {self.path}: folder does not exist")
        if not self.metrics_path.is_file():
            raise RunFolderError(f"run {self.path}: run not finished (no {self.METRICS})")
        metrics = self._read_json(self.metrics_path)
        missing = [key for key in METRICS_REQUIRED_KEYS if key not in metrics]
        if missing:
            raise RunFolderError(f"run {self.path}: {self.METRICS} lacks key(s) {', '.join(missing)} "
                                 f"(written by newer trainers; rerun or add them)")
        for key in ("dataset", "method", "selection"):
            if not isinstance(metrics[key], str) or not metrics[key]:
                raise RunFolderError(f"run {self.path}: {self.METRICS} {key} must be a non-empty string, "
                                     f"got {metrics[key]!r}")
        for key in ("seed", "n_samples"):
            if not isinstance(metrics[key], int) or isinstance(metrics[key], bool):
                raise RunFolderError(f"run {self.path}: {self.METRICS} {key} must be an integer, "
                                     f"got {metrics[key]!r}")
        if not _is_number(metrics["seconds"]):
            raise RunFolderError(f"run {self.path}: {self.METRICS} seconds must be a number, "
                                 f"got {metrics['seconds']!r}")
        if metrics["epoch"] is not None and not isinstance(metrics["epoch"], int):  # a baseline may write null
            raise RunFolderError(f"run {self.path}: {self.METRICS} epoch must be an integer or null, "
                                 f"got {metrics['epoch']!r}")
        present = [key for key in SCORE_KEYS if key in metrics]
        if present and len(present) != len(SCORE_KEYS):
            absent = [key for key in SCORE_KEYS if key not in metrics]
            raise RunFolderError(f"run {self.path}: {self.METRICS} has {', '.join(present)} but lacks key(s) "
                                 f"{', '.join(absent)}")
        for key in present:
            if not _is_number(metrics[key]):
                raise RunFolderError(f"run {self.path}: {self.METRICS} {key} must be a number, "
                                     f"got {metrics[key]!r}")
        return metrics

    def read_metrics_log(self) -> list[dict]:
        """The lines of metrics.jsonl ([] when there is none). A last line without its newline
        is one a killed run was writing: it is left out, never parsed as a record."""
        return self._metrics_log()[0]

    def _metrics_log(self) -> tuple[list[dict], bool]:
        """(the records of metrics.jsonl, whether a torn last line follows them)."""
        if not self.metrics_log_path.is_file():
            return [], False
        *lines, tail = self.metrics_log_path.read_text().split("\n")  # `tail`: torn, or empty
        records = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RunFolderError(f"run {self.path}: {self.METRICS_LOG} line {number} is not valid JSON "
                                     f"({e})") from e
            if not isinstance(record, dict):
                raise RunFolderError(f"run {self.path}: {self.METRICS_LOG} line {number} is not a JSON object")
            records.append(record)
        return records, bool(tail)

    def keep_metrics_log(self, keep) -> int:
        """Rewrite metrics.jsonl (atomically) with the records for which `keep(record)` holds and
        without a torn last line: a resumed run drops what its interrupted run logged after the
        checkpoint it continues from, so that no epoch is logged twice. Returns how many
        records (or torn lines) were dropped."""
        records, torn = self._metrics_log()
        kept = [record for record in records if keep(record)]
        if len(kept) < len(records) or torn:
            atomic_write_text(self.metrics_log_path, "".join(json.dumps(record) + "\n" for record in kept))
        return len(records) - len(kept) + int(torn)

    def read_config(self) -> Config | None:
        """The run's training config, or None where the folder has none (a baseline folder has no
        config.yaml, or one naming its `baseline` instead of a training config)."""
        if not self.config_path.is_file():
            return None
        try:
            values = yaml.safe_load(self.config_path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise RunFolderError(f"run {self.path}: {self.CONFIG} is not valid YAML ({e})") from e
        if not isinstance(values, dict):
            raise RunFolderError(f"run {self.path}: {self.CONFIG} does not hold a mapping")
        if "baseline" in values:
            return None
        try:
            return config_from_dict(values, str(self.config_path))
        except ConfigError as e:
            raise RunFolderError(f"run {self.path}: {e}") from e

    def _read_json(self, path: Path) -> dict[str, Any]:
        try:
            value = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RunFolderError(f"run {self.path}: {path.name} is not valid JSON ({e})") from e
        if not isinstance(value, dict):
            raise RunFolderError(f"run {self.path}: {path.name} is not a JSON object")
        return value

    def load_model(self, name: str = "final", data_dir: str | Path | None = None) -> TrainedModel:
        """The model of checkpoints/pretrain.pt or final.pt (see `load_model`)."""
        return load_model(self.model_file(name), data_dir)


class RunLock:
    """RUN/.lock: one training writes into a run folder at a time.

    The lock file holds its owner's host, pid, Slurm job id and start time; it is created with
    O_EXCL, so two processes cannot both take it. A lock is stale, and is taken over, when its
    owner is a process of this host that no longer runs, or the same Slurm job (a requeued job
    keeps its id and may land on another node). A lock of a live process, or of another host
    outside this job, is held: `acquire` refuses with a message that names the owner."""

    def __init__(self, run: RunFolder, owner: dict):
        self.run, self.owner = run, owner

    @classmethod
    def acquire(cls, run: RunFolder) -> tuple[RunLock, str | None]:
        """Take the lock (creating the folder); returns it and, when a stale lock was taken
        over, a line saying whose. Raises RunFolderError when the lock is held or the folder
        cannot be written."""
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        try:
            run.path.mkdir(parents=True, exist_ok=True)
            if cls._create(run.lock_path, owner):
                return cls(run, owner), None
            held = cls._read(run.lock_path)
            if not cls._is_stale(held, owner):
                raise RunFolderError(
                    f"{run.path} is in use: a training runs there (pid {held.get('pid')} on {held.get('host')}, "
                    f"since {held.get('started')}); wait for it to end or choose another output_dir. If no such "
                    f"process runs, delete {run.lock_path}")
            run.lock_path.unlink(missing_ok=True)
            if not cls._create(run.lock_path, owner):  # another process took it over first
                raise RunFolderError(f"{run.path} is in use: another process took its stale lock just now")
        except OSError as error:
            raise RunFolderError(f"output_dir {run.path} cannot be written: {error.strerror or error}") from error
        return cls(run, owner), f"took over the stale lock of pid {held.get('pid')} on {held.get('host')}"

    def release(self) -> None:
        """Remove the lock file, if it is still this process's."""
        if self._read(self.run.lock_path).get("pid") == self.owner["pid"]:
            self.run.lock_path.unlink(missing_ok=True)

    @staticmethod
    def _create(path: Path, owner: dict) -> bool:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(owner, f)
            f.flush()
            os.fsync(f.fileno())
        return True

    @staticmethod
    def _read(path: Path) -> dict:
        try:
            value = json.loads(path.read_text())
        except (OSError, ValueError):  # gone, or cut short by its writer's death
            return {}
        return value if isinstance(value, dict) else {}

    @staticmethod
    def _is_stale(held: dict, owner: dict) -> bool:
        if not held:  # unreadable: its writer died between creating and writing it
            return True
        if held.get("slurm_job_id") and held.get("slurm_job_id") == owner["slurm_job_id"]:
            return True  # this job, before it was requeued
        if held.get("host") != owner["host"]:
            return False  # a process elsewhere: nothing here can tell whether it still runs
        pid = held.get("pid")
        if not isinstance(pid, int) or pid == owner["pid"]:
            return True
        return not process_exists(pid)


def assignments_csv(keys: list[str], assignments: np.ndarray, confidence: np.ndarray | None,
                    codes: np.ndarray | None = None) -> str:
    """CSV text: key, cluster, confidence (and code_0, code_1, ... with `codes`), one row per
    sample; the confidence is left empty when `confidence` is None (a run with no posterior)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", "cluster", "confidence"] + ([f"code_{i}" for i in range(codes.shape[1])]
                                                         if codes is not None else []))
    for i, key in enumerate(keys):
        row = [key, int(assignments[i]), f"{float(confidence[i]):.6f}" if confidence is not None else ""]
        writer.writerow(row + ([f"{v:.6g}" for v in codes[i]] if codes is not None else []))
    return buffer.getvalue()


def read_model_file(path: str | Path) -> tuple[Config, dict]:
    """(the resolved config, the file's contents) of a model file (`RunFolder.write_model_file`)."""
    path = Path(path)
    if not path.is_file():
        raise RunFolderError(f"model file {path} does not exist (a run writes checkpoints/pretrain.pt after "
                             f"pretraining and checkpoints/final.pt at the end)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same message
        raise RunFolderError(f"model file {path} is not readable: {type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or not {"model", "config"} <= state.keys():
        raise RunFolderError(f"{path} is not a model file (no 'model' and 'config' entries)")
    try:
        config = config_from_dict(state["config"], str(path))
    except ConfigError as error:
        raise RunFolderError(f"model file {path}: its config no longer loads: {error}") from error
    return config, state


def load_model(path: str | Path, data_dir: str | Path | None = None) -> TrainedModel:
    """The model of a model file with its weights, its config and its dataset's manifest.

    The manifest is read from `data_dir`, by default the config's own (pass it for a run folder
    moved away from its data); the number of clusters is that of the file's centres μ_y. A
    file written before q(y) was saved with the model gets the uniform q(y) it was trained with."""
    config, state = read_model_file(path)
    manifest = read_manifest(config.data_dir if data_dir is None else data_dir)
    model = SDDECC(tuple(manifest["image_shape"]), int(state["model"]["centers"].shape[0]), config.model)
    model.load_trained(state["model"])
    model.eval()
    return TrainedModel(config, manifest, model, state.get("phase", "?"), state.get("epoch", -1))


def _lines(values: np.ndarray) -> str:
    return "\n".join(map(str, np.asarray(values).tolist())) + "\n"


def _is_number(value: Any) -> bool:
    # bool is an int subclass, but true/false in metrics.json is never a score.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
