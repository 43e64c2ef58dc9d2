"""A whole run at a size you choose, every stage timed with its own peak memory (issue 19):
what a team clustering millions of images can expect of this machine.

    python scripts/scale_run.py --n 70000 --out runs/scale-70k
    python scripts/scale_run.py --n 1000000 --out runs/scale-1m --from ../shared/datasets

The images are MNIST digits (all 70 000, from --from), each drawn at random and warped by its
own random affine map (rotation ±15°, shift ±10 %, scale ±10 %) with Gaussian noise (σ 0.05)
added, so that the set has the digits' ten clusters at any N and no two images are equal;
their labels are the digits, read only by the scorer. Stages, each a process of its own (so
that its peak resident memory is its own, from the kernel's rusage of that child):
  make       the labelled images as DIR/set.npz (uint8), in chunks
  prepare    `sddecc prepare DIR/set.npz --out DIR/data` (webdataset shards)
  graph      `sddecc graph DIR/data --index pca_ivf` (recall@3 measured on 1000 queries
             against exact search, in the graph's metadata)
  partition  `sddecc partition DIR/data --parts ceil(N / 1000)` (METIS)
  train      `launch/train.py --config configs/default.yaml` with the settings for millions
             (pretraining streamed from the shards, the Cluster-GCN sampler with partitions
             of 1000 nodes, 4 a step) and a fixed schedule: 2 pretraining epochs, the UMAP +
             GMM start, 1 self-labelling epoch, a head warm-up of about 500 steps, 2 joint
             epochs, then the final inference (spooled) that writes the assignments
  show       `sddecc show DIR/run` (the page)
It writes DIR/scale.json: {"n", "stages": {name: {"seconds", "peak_rss_mib"}}, "seconds",
"peak_rss_mib", "acc", "nmi", "graph": {index, recall}, "train": the schedule}. A stage whose
output is already there (its marker in DIR/scale.json) is not run again.

A run longer than one sitting can be stopped and continued: SIGTERM or SIGUSR1 to this script
(Slurm's pre-emption signals) is passed to the stage running; the trainer saves a checkpoint
and exits with 128 + the signal, and this script records that attempt (its seconds and peak)
under "stopped" in scale.json and exits with the same status. Called again, it continues the
train stage from its checkpoint (train.resume=true); the stage's figures are then the sum of
its attempts' seconds and the largest of their peaks, with "attempts" giving how many ran.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without install

from sddecc_dist.utils import atomic_write_json, console  # noqa: E402

PARTITION_SIZE = 1000
PARTITIONS_PER_BATCH = 4
WARMUP_STEPS = 500  # the GCN learns the start in about as many steps as the full sampler's 500 epochs
CHUNK = 10_000


def train_schedule(n: int) -> list[str]:
    """The train stage's settings: the recipe's for millions of images (pretraining streamed from
    the shards, the Cluster-GCN sampler) with a schedule in epochs, the same at every N (so that
    seconds per image compare), except the head's warm-up, which is about WARMUP_STEPS steps
    at every N (a few epochs at 1M, 28 at 70 000: the recipe's 500 warm-up epochs are full-graph
    steps, far too many with the cluster sampler)."""
    steps_per_epoch = math.ceil(math.ceil(n / PARTITION_SIZE) / PARTITIONS_PER_BATCH)
    warmup = max(1, math.ceil(WARMUP_STEPS / steps_per_epoch))
    return ["train.pretrain_source=shards", "train.pretrain_epochs=2", "train.pretrain_steps=0",
            "train.self_label_epochs=1", "train.self_label_steps=0", "train.joint_sampler=cluster",
            f"train.partition_size={PARTITION_SIZE}", f"train.partitions_per_batch={PARTITIONS_PER_BATCH}",
            f"train.head_warmup_epochs={warmup}", f"train.joint_epochs={warmup + 2}", "train.eval_every=1000",
            "train.checkpoint_every=1000"]


def make_set(n: int, from_dir: Path, path: Path, seed: int) -> None:
    """N warped, noisy MNIST digits and their labels as an uncompressed .npz of uint8 images."""
    import torch

    from sddecc_dist.data import load_source
    from sddecc_dist.data.augment import RandomAffineAugment

    raw = load_source("mnist", from_dir=from_dir / "mnist")
    source = torch.from_numpy(raw.images.astype(np.float32) / 255.0)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    warp = RandomAffineAugment(degrees=15.0, translate=0.1, scale=0.1)
    picks = rng.integers(0, len(source), size=n)
    x = np.empty((n, *source.shape[1:]), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        rows = picks[start:start + CHUNK]
        images = warp(source[rows]) + torch.from_numpy(rng.normal(0, 0.05, (len(rows), *source.shape[1:]))).float()
        x[start:start + len(rows)] = (images.clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp.npz")
    np.savez(temporary, x=x, y=raw.labels[picks])
    os.replace(temporary, path)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
STOPPED_STATUSES = {128 + signum for signum in STOP_SIGNALS}  # the trainer's exit after a checkpoint


def run_stage(name: str, command: list[str], log_path: Path) -> dict:
    """Run `command` as a child process, its output in `log_path`; its wall time and its own peak
    resident memory (ru_maxrss of that child, from os.wait4). A child's high-water mark starts
    at this process's resident memory when it forks, so this process imports neither torch nor
    the data (about 50 MiB). SIGTERM and SIGUSR1 sent to this process go to the child; a child
    that then exits with 128 + the signal (the trainer, after saving a checkpoint) gives its
    figures with "stopped": its exit status."""
    started = time.perf_counter()
    with open(log_path, "a") as log:  # a continued stage's log follows its stopped attempt's
        child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        previous = {signum: signal.signal(signum, lambda signum, _: child.send_signal(signum))
                    for signum in STOP_SIGNALS}
        try:
            _, status, usage = os.wait4(child.pid, 0)  # retried after a handled signal (PEP 475)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    child.returncode = code  # reaped here, not by Popen.wait
    figures = {"seconds": round(seconds, 2), "peak_rss_mib": round(usage.ru_maxrss / 1024, 1)}
    if code in STOPPED_STATUSES:
        return {**figures, "stopped": code}
    if -code in STOP_SIGNALS:  # a stage without checkpoints, ended by the signal passed on
        raise SystemExit(f"stage {name} stopped by signal {-code} after {figures['seconds']} s; "
                         f"run the same command again to repeat it")
    if code != 0:
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"stage {name} failed (exit {code}); the end of {log_path}:\n{tail}")
    return figures


def with_attempts(final: dict, stopped: list[dict]) -> dict:
    """A stage's figures over all its attempts: the stopped ones' seconds added to the last
    one's, the largest peak of them all."""
    if not stopped:
        return final
    attempts = [*stopped, final]
    return {"seconds": round(sum(a["seconds"] for a in attempts), 2),
            "peak_rss_mib": max(a["peak_rss_mib"] for a in attempts), "attempts": len(attempts)}


def resumable(run: Path) -> bool:
    """Whether the train stage's run folder holds a checkpoint of a stopped attempt."""
    checkpoints = run / "checkpoints"
    return checkpoints.is_dir() and any(checkpoints.iterdir())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, required=True, help="images")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--from", dest="from_dir", type=Path, default=ROOT.parent / "shared" / "datasets",
                        help="folder with mnist/ (the raw MNIST files)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "default.yaml")
    parser.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)  # the make stage's process
    parser.add_argument("overrides", nargs="*", help="key=value for the train stage, after its schedule")
    args = parser.parse_args()
    if args.make_only:
        make_set(args.n, args.from_dir, args.out / "set.npz", args.seed)
        return 0
    if args.n < 2 * PARTITION_SIZE:
        raise SystemExit(f"--n {args.n}: at least {2 * PARTITION_SIZE} images (two partitions of {PARTITION_SIZE})")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result_path = out / "scale.json"
    result = json.loads(result_path.read_text()) if result_path.is_file() else {}
    if result.get("n", args.n) != args.n:
        raise SystemExit(f"{result_path} is a run of {result['n']} images, not {args.n}: use another --out")
    schedule = train_schedule(args.n) + args.overrides
    result.update(n=args.n, train=schedule)
    stages = result.setdefault("stages", {})
    data, run = out / "data", out / "run"
    python, cli = sys.executable, [sys.executable, "-m", "sddecc_dist.cli"]
    commands = {
        "make": [python, str(Path(__file__).resolve()), "--make-only", "--n", str(args.n), "--out", str(out),
                 "--from", str(args.from_dir.resolve()), "--seed", str(args.seed)],
        "prepare": [*cli, "prepare", str(out / "set.npz"), "--out", str(data)],
        "graph": [*cli, "graph", str(data), "--k", "3", "--index", "pca_ivf"],
        "partition": [*cli, "partition", str(data), "--k", "3", "--parts", str(math.ceil(args.n / PARTITION_SIZE))],
        "train": [python, str(ROOT / "launch" / "train.py"), "--config", str(args.config), f"data_dir={data}",
                  f"output_dir={run}", f"seed={args.seed}", *schedule],
        "show": [*cli, "show", str(run)],
    }
    stopped = result.setdefault("stopped", {})
    for name, command in commands.items():
        if name in stages:
            continue
        if name == "train" and stopped.get(name) and resumable(run):
            command = [*command, "train.resume=true"]
        console.log(f"{name}: {' '.join(command[1:])}")
        figures = run_stage(name, command, out / f"{name}.log")
        if "stopped" in figures:
            stopped.setdefault(name, []).append(figures)
            atomic_write_json(result_path, result)
            console.log(f"{name}: stopped (exit {figures['stopped']}) after {figures['seconds']} s, peak "
                        f"{figures['peak_rss_mib']} MiB; run the same command again to continue it")
            return figures["stopped"]
        stages[name] = with_attempts(figures, stopped.get(name, []))
        console.log(f"{name}: {stages[name]['seconds']} s, peak {stages[name]['peak_rss_mib']} MiB")
        atomic_write_json(result_path, result)

    from sddecc_dist.graph import load_graph  # torch: only now, after the stages

    meta = load_graph(next(data.glob("graph-k3*.pt")))[1]
    metrics = json.loads((run / "metrics.json").read_text())
    result.update(seconds=round(sum(s["seconds"] for s in stages.values()), 2),
                  peak_rss_mib=max(s["peak_rss_mib"] for s in stages.values()),
                  acc=metrics.get("acc"), nmi=metrics.get("nmi"), n_used_clusters=metrics.get("n_used_clusters"),
                  graph={"index": meta.get("index"), "recall": meta.get("recall"),
                         "recall_method": meta.get("recall_method"), "seconds": meta.get("seconds")})
    atomic_write_json(result_path, result)
    console.log(json.dumps({key: result[key] for key in ("n", "seconds", "peak_rss_mib", "acc", "nmi", "graph")}))
    for name, stage in stages.items():
        console.log(f"  {name:<10} {stage['seconds']:>9.1f} s {stage['peak_rss_mib']:>9.1f} MiB "
                    f"{1e6 * stage['seconds'] / args.n:>8.1f} µs/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
