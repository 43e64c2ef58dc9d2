"""Distributed plumbing, the only module of the trainer that knows about ranks: the
Accelerator, gathering rows of a sharded node set, stop signals all ranks agree on, DeepSpeed's
master weights, and console output from the main process only. The model and the data layer
never see ranks; the loop calls these.
"""

from __future__ import annotations

import os
import signal

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from sddecc_dist.config import Config
from sddecc_dist.utils import atomic_write_text, console


def make_accelerator(config: Config) -> Accelerator:
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    on_cpu = not torch.cuda.is_available()
    handlers = [
        # Each phase leaves parts of the model unused (the GCN in pretraining, the DDECN in the
        # head warm-up): DDP must not wait for their gradients.
        DistributedDataParallelKwargs(find_unused_parameters=True),
    ]
    if on_cpu and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # gloo on CPU (DeepSpeed would pick another backend); only when launched with several
        # processes: with this handler a lone process would look for a process group.
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        # Without cpu=True, `accelerate launch --multi_gpu` on a CPU machine starts processes
        # that each think they are alone (platform.md). DeepSpeed brings its own CPU accelerator.
        cpu=on_cpu and not deepspeed,
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )


def log(*args, **kwargs) -> None:
    """console.log on the main process only."""
    if PartialState().is_main_process:
        console.log(*args, **kwargs)


def progress_bars() -> Progress:
    """rich progress bars, drawn by the main process only."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not PartialState().is_main_process,
    )


def gather_rows(accelerator: Accelerator, ids: torch.Tensor, rows: torch.Tensor, n: int) -> torch.Tensor:
    """Each rank holds `rows` for the global node ids `ids`; return the full (n, ...) matrix on
    every rank, checking that every node arrives exactly once. gloo's all_gather needs equal
    sizes, so shares are padded (id -1) to the largest one first."""
    if accelerator.num_processes > 1:
        ids = accelerator.pad_across_processes(ids.to(accelerator.device), dim=0, pad_index=-1)
        rows = accelerator.pad_across_processes(rows.contiguous(), dim=0)
        ids, rows = accelerator.gather(ids).cpu(), accelerator.gather(rows)
        keep = ids >= 0
        ids, rows = ids[keep], rows[keep.to(rows.device)]
    counts = torch.bincount(ids.cpu(), minlength=n)
    if len(counts) != n or not bool((counts == 1).all()):
        bad = int(torch.nonzero(counts[:n] != 1)[0]) if len(counts) == n else n
        raise RuntimeError(f"gathering {n} rows: node {bad} arrived {int(counts[bad]) if bad < n else 'out of range'} "
                           f"times (each rank must hold a disjoint share covering every node)")
    full = rows.new_empty((n, *rows.shape[1:]))
    full[ids.to(rows.device)] = rows
    return full


def sum_over_ranks(accelerator: Accelerator, tensor: torch.Tensor) -> torch.Tensor:
    return accelerator.reduce(tensor, reduction="sum") if accelerator.num_processes > 1 else tensor


class Preempted(SystemExit):
    """Raised after a checkpoint was saved on SIGTERM / SIGUSR1; exit status 128 + signal."""


# Named by scripts/slurm/accelerate_cmd.sh: the file into which a stopped run writes its status.
STOP_FILE_VARIABLE = "SDDECC_STOP_FILE"


def stopped_on_signal(signum: int, accelerator: Accelerator) -> Preempted:
    """The exception that ends a run stopped on a signal: exit status 128 + signal (143 for
    SIGTERM, 138 for SIGUSR1), apart from 1 (an error) and 2 (bad input). `accelerate launch`
    (and torchrun's agent under it) reports any failed worker as 1, so the main process also
    writes the status into the file $SDDECC_STOP_FILE names, which the Slurm batch script reads
    to exit with it."""
    status = 128 + signum
    path = os.environ.get(STOP_FILE_VARIABLE)
    if path and accelerator.is_main_process:
        atomic_write_text(path, f"{status}\n")
    return Preempted(status)


class StopSignal:
    """SIGTERM and SIGUSR1 (Slurm's pre-emption and time-limit warnings) only set a flag; the
    loop checks it after each step, all ranks agree through one all-reduce, save and exit."""

    def __init__(self):
        self.signum = 0
        self._previous = {}

    def __enter__(self):
        for signum in (signal.SIGTERM, signal.SIGUSR1):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def _handle(self, signum, frame):
        self.signum = signum

    def agreed(self, accelerator: Accelerator) -> int:
        """The signal number if any rank got one, else 0 (every rank calls this every step)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.reduce(flag, reduction="sum").item() > 0) * (self.signum or signal.SIGTERM)


def sync_master_weights(optimizer) -> None:
    """DeepSpeed ZeRO keeps its own fp32 master copy of every parameter, which would overwrite
    weights set directly on the module (centres, q(y), a loaded pretraining) at the next step:
    refresh it from the module. DeepSpeed offers no public call for this; its ZeRO optimisers'
    `_restore_from_bit16_weights` is the one its own checkpoint loading uses. A no-op elsewhere."""
    restore = getattr(getattr(optimizer, "optimizer", None), "_restore_from_bit16_weights", None)
    if restore is not None:
        restore()


def reset_optimizer_moments(optimizer) -> None:
    """Fresh Adam moments, as a new optimiser would have (the joint phase's start). DeepSpeed
    keeps its moments in its own partitions; there they carry over."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if isinstance(inner, torch.optim.Optimizer):
        inner.state.clear()


def set_deepspeed_micro_batch(accelerator: Accelerator, micro_batch: int) -> None:
    """No DataLoader goes through prepare(): DeepSpeed must be told the micro-batch size."""
    if accelerator.state.deepspeed_plugin is not None:
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = micro_batch
