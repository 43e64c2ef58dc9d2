"""Resumable trainer checkpoints: where the run is, and every piece of trainer state, saved
atomically and read back.

A checkpoint is a folder RUN/checkpoints/ckpt-P-EEEEE-SSSSSSS/ (RunFolder names it) holding
Accelerate's state (model, optimiser, every rank's RNG; DeepSpeed writes its own shards there)
and `trainer_state.json`, a `TrainerState`: the position of the next step and the trainer's
own state as named fields. It is written as `.tmp-NAME` and renamed once complete, so a crash
never leaves a folder that looks valid; the newest `keep` are kept.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from accelerate import Accelerator

from sddecc_dist.config import ConfigError
from sddecc_dist.run_folder import RunFolder
from sddecc_dist.train.distributed import log
from sddecc_dist.utils import atomic_write_json, disk_full_error

PHASES = ("pretrain", "joint")
STATE_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Position:
    """The next step to run: phase, epoch within it, step within the epoch."""

    phase: str = "pretrain"
    epoch: int = 0
    step: int = 0

    @property
    def name(self) -> str:
        """Its checkpoint folder's name (sorts in training order)."""
        return RunFolder.checkpoint_name(PHASES.index(self.phase), self.epoch, self.step)

    def next(self, steps_in_epoch: int) -> Position:
        """The position after this step."""
        if self.step + 1 < steps_in_epoch:
            return Position(self.phase, self.epoch, self.step + 1)
        return Position(self.phase, self.epoch + 1, 0)


@dataclass
class TrainerState:
    """What the loop needs to continue, besides what Accelerate saves."""

    position: Position = field(default_factory=Position)
    start_ready: bool = False  # the start (centres, q(y), initial_assignments.txt) is computed
    start_scores: dict = field(default_factory=dict)  # its scores (empty without labels)
    # The self-labelling stage replaced the start (self_label_assignments.txt, centres, q(y))
    start_self_labelled: bool = False
    # Running estimate of the data's cluster marginal over minibatch steps (losses.marginal_balance_kl)
    cluster_marginal: list[float] | None = None
    sampler: dict = field(default_factory=dict)  # the joint sampler's state_dict(), checked on resume
    # The joint epoch at which the GCN's warm-up ended (train.head_warmup_agreement), once it has
    head_warmup_ended: int | None = None
    done: bool = False  # the final checkpoint of a finished run

    def to_json(self) -> dict:
        return {"format_version": STATE_FORMAT_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, values: dict, path: Path) -> TrainerState:
        if values.get("format_version") != STATE_FORMAT_VERSION:
            raise ConfigError(f"{path} has trainer state format {values.get('format_version')}, "
                              f"expected {STATE_FORMAT_VERSION}")
        values = {k: v for k, v in values.items() if k != "format_version"}
        values.setdefault("start_self_labelled", False)  # written before the stage existed: it had none
        values.setdefault("head_warmup_ended", None)  # written before the warm-up could end early
        names = {f.name for f in dataclasses.fields(cls)}
        if set(values) != names:
            raise ConfigError(f"{path} holds fields {sorted(values)}, expected {sorted(names)}")
        return cls(**{**values, "position": Position(**values["position"])})


class Checkpointer:
    def __init__(self, run: RunFolder, accelerator: Accelerator, keep: int):
        self.run = run
        self.accelerator = accelerator
        self.keep = keep

    def save(self, state: TrainerState) -> None:
        """Every rank calls this (each saves its RNG state; DeepSpeed its shards)."""
        name = state.position.name
        final, tmp = self.run.checkpoint_dir(name), self.run.partial_checkpoint_dir(name)
        is_main = self.accelerator.is_main_process
        if is_main and tmp.exists():
            shutil.rmtree(tmp)
        self.accelerator.wait_for_everyone()
        try:
            self.accelerator.save_state(str(tmp))
        except Exception as error:  # a full disk: one line naming the checkpoint; the older ones stay
            full = disk_full_error(error, tmp)
            if full is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise full from error
        self.accelerator.wait_for_everyone()
        if is_main:
            atomic_write_json(self.run.trainer_state_path(tmp), state.to_json())
            if final.exists():
                shutil.rmtree(final)
            os.rename(tmp, final)
            for old in self.complete()[self.keep:]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()

    def complete(self) -> list[Path]:
        """Complete checkpoint folders, newest first (one without its state file is not one)."""
        return [p for p in self.run.checkpoint_dirs() if self.run.trainer_state_path(p).is_file()]

    def restore(self) -> TrainerState | None:
        """Load the newest checkpoint that loads; skip (with a warning) any that does not."""
        complete = self.complete()
        legacy = [p for p in self.run.checkpoint_dirs() if (p / "position.json").is_file()]
        if not complete and legacy:
            raise ConfigError(f"checkpoint {legacy[0]} was written by an older sddecc-dist (position.json, no "
                              f"{RunFolder.TRAINER_STATE}) and cannot be resumed by this one; start the run "
                              f"anew with --new-version (the old run moves to {self.run.previous}/)")
        for folder in complete:
            try:
                path = self.run.trainer_state_path(folder)
                state = TrainerState.from_json(json.loads(path.read_text()), path)
                self.accelerator.load_state(str(folder))
            except Exception as error:  # noqa: BLE001 - any unreadable checkpoint is skipped
                log(f"[yellow]checkpoint {folder} is unreadable ({type(error).__name__}: "
                    f"{error}); trying an older one")
                continue
            at = state.position
            log(f"resumed from {folder} ({at.phase}, epoch {at.epoch}, step {at.step})")
            return state
        return None
