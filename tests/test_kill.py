"""kill -9 at seeded random moments of every stage, then the same command again: the result
equals an uninterrupted run's, byte for byte (prepare's shards and manifest, the partition-
ordered shards), value for value (the graph, the partitions) or bit for bit (training's
assignments and its metrics.jsonl, resumed with --resume).

Each stage is run once uninterrupted, timing how long it works from when it begins to write to
its last artifact (W), then as a chain: started, killed with SIGKILL (the whole process group)
at a moment drawn uniformly from [0, W) after it began to write, by random.Random(stage-seed),
started again, ..., and at last left to finish. Seeds come from SDDECC_KILL_SEEDS (default "0":
one chain per stage in the README's test command); scripts/nightly.sh runs "1 2 3 4 5". Every
kill is printed (stage, seed, delay, what the folder held), so `pytest -s` shows where they
landed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sddecc_dist.graph import load_graph
from sddecc_dist.run_folder import RunFolder

ROOT = Path(__file__).resolve().parent.parent
SEEDS = [int(seed) for seed in os.environ.get("SDDECC_KILL_SEEDS", "0").split()]
KILLS_PER_CHAIN = 2
SDDECC = [sys.executable, "-m", "sddecc_dist.cli"]  # this checkout's, as launch/train.py is
TRAIN = ["configs/digits.yaml", "train.pretrain_epochs=6", "model.self_label_head=true", "train.self_label_epochs=2",
         "train.head_warmup_epochs=3", "train.joint_epochs=20", "train.checkpoint_every=2", "train.eval_every=4",
         "train.kmeans_n_init=2"]


def _command(stage: str, data: Path, run: Path | None = None) -> list[str]:
    if stage == "prepare":
        return [*SDDECC, "prepare", "digits", "--out", str(data), "--samples-per-shard", "10"]
    if stage == "graph":
        return [*SDDECC, "graph", str(data), "--k", "3"]
    if stage == "partition":
        return [*SDDECC, "partition", str(data), "--k", "3", "--parts", "40", "--partitions-per-shard", "2"]
    config, *overrides = TRAIN
    return [sys.executable, "launch/train.py", "--config", config, f"data_dir={data}", f"output_dir={run}", *overrides]


def _run(command: list[str], kill_after: float | None = None, armed=None) -> bool:
    """Run `command` in its own process group; once `armed(pid, start time)` holds (polled
    every 5 ms), SIGKILL the group after `kill_after` seconds. True if it finished first."""
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if kill_after is not None:
        while armed is not None and not armed(process.pid, started) and process.poll() is None:
            time.sleep(0.005)
    try:
        output, _ = process.communicate(timeout=kill_after)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        return False
    assert process.returncode == 0, output[-3000:]
    return True


def _timed(command: list[str], armed, done) -> float:
    """Seconds from when `armed()` began to hold until `done()` did, in an uninterrupted run."""
    armed_at = done_at = None
    started = time.time()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    while process.poll() is None:
        now = time.monotonic()
        armed_at = armed_at or (now if armed(process.pid, started) else None)
        done_at = done_at or (now if done() else None)
        time.sleep(0.005)
    assert process.returncode == 0, process.stdout.read()[-3000:]
    assert armed_at is not None and done_at is not None
    return done_at - armed_at


def _chain(stage: str, seed: int, working: float, command: list[str], again: list[str], folder: Path,
           armed) -> int:
    """Kill `command` KILLS_PER_CHAIN times, each at a moment drawn uniformly from the `working`
    seconds the reference run took from `armed()` to its final artifact, then let `again` finish;
    return the kills."""
    rng, kills, current = random.Random(f"{stage}-{seed}"), 0, command
    for _ in range(KILLS_PER_CHAIN):
        delay = rng.uniform(0.0, working)
        if _run(current, kill_after=delay, armed=armed):
            return kills  # finished before the kill: the chain is done
        kills += 1
        print(f"kill -9: {stage} seed {seed}, {delay:.2f} s after it began to write; {folder.name} then held "
              f"{_summary(folder)}")
        current = again
    assert _run(again)
    return kills


def _summary(folder: Path) -> str:
    """What a killed stage left: shards, manifest, graph, temporaries, checkpoints, metrics lines."""
    if not folder.exists():
        return "nothing"
    names = [p.name for p in folder.iterdir()]
    parts = [f"{sum(n.startswith('shard-') for n in names)} shards"] if any(n.startswith("shard-") for n in names) else []
    parts += [n for n in names if n in ("dataset.json", "graph-k3.pt", "metrics.json", "previous")]
    parts += [f"temporary {n}" for n in names if ".tmp" in n]
    parts += [n for n in names if n.startswith(("partitions-", "partitioned-"))]
    if any(folder.glob("partitioned-*/.spool-*")):
        parts.append("a spool folder")
    if (folder / "checkpoints").is_dir():
        parts.append(f"checkpoints {sorted(p.name for p in (folder / 'checkpoints').iterdir())}")
    if (folder / "metrics.jsonl").is_file():
        lines = (folder / "metrics.jsonl").read_text().split("\n")
        parts.append(f"{len(lines) - 1} metrics lines (last {lines[-2][:40] if len(lines) > 1 else ''!r}"
                     f"{', a torn one' if lines[-1] else ''})")
    return ", ".join(parts) or "an empty folder"


def _writing(stage: str, folder: Path):
    """`armed(pid, start time)`: whether a stage's process has begun its work. Prepare: it wrote
    a file into the data folder (the first shard; the imports and reading the source come
    before). The graph and the partitions: at once (the imports, reading the shards, the
    build and the saves).
    Training: it took the run folder's lock (validation done; its first write)."""
    def prepare(pid, started):
        return folder.exists() and any(_modified_since(p, started) for p in folder.iterdir())

    def train(pid, started):
        try:
            return json.loads((folder / ".lock").read_text()).get("pid") == pid
        except (OSError, ValueError):
            return False
    return {"prepare": prepare, "graph": lambda pid, started: True, "partition": lambda pid, started: True,
            "train": train}[stage]


def _modified_since(path: Path, started: float) -> bool:
    """Whether `path` was written at or after `started`; False for a file the running stage
    renamed or removed between the listing and this look (its temporaries)."""
    try:
        return path.stat().st_mtime >= started
    except FileNotFoundError:
        return False


# each stage's last artifact
FINAL = {"prepare": "dataset.json", "graph": "graph-k3.pt", "partition": "partitioned-k3-p40/dataset.json",
         "train": "metrics.json"}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted stages (prepare, graph, partition, then a training on that folder):
    their folders and the seconds each worked (from `_writing` to its last artifact)."""
    tmp = tmp_path_factory.mktemp("reference")
    data, run = tmp / "data", tmp / "run"
    working = {stage: _timed(_command(stage, data, run), _writing(stage, folder), (folder / FINAL[stage]).exists)
               for stage, folder in (("prepare", data), ("graph", data), ("partition", data), ("train", run))}
    print(f"uninterrupted, seconds of work: {working}")
    return data, run, working


@pytest.mark.parametrize("seed", SEEDS)
def test_prepare_killed_at_random_moments_then_rerun_writes_the_same_shards(reference, tmp_path, seed):
    data_ref, _, times = reference
    data = tmp_path / "data"
    command = _command("prepare", data)
    _chain("prepare", seed, times["prepare"], command, command, data, _writing("prepare", data))
    assert json.loads((data / "dataset.json").read_text()) == json.loads((data_ref / "dataset.json").read_text())
    for shard in json.loads((data_ref / "dataset.json").read_text())["shards"]:
        assert (data / shard["file"]).read_bytes() == (data_ref / shard["file"]).read_bytes()
    assert not [p.name for p in data.iterdir() if ".tmp" in p.name]  # a killed writer's temporary is cleared


@pytest.mark.parametrize("seed", SEEDS)
def test_graph_killed_at_random_moments_then_rerun_builds_the_same_graph(reference, tmp_path, seed):
    data_ref, _, times = reference
    data = tmp_path / "data"
    shutil.copytree(data_ref, data, ignore=shutil.ignore_patterns("graph-*", "partition*"))
    command = _command("graph", data)
    _chain("graph", seed, times["graph"], command, command, data, _writing("graph", data))
    graph, meta = load_graph(data / "graph-k3.pt")
    expected, expected_meta = load_graph(data_ref / "graph-k3.pt")
    assert torch.equal(graph.to_dense(), expected.to_dense())
    assert {k: v for k, v in meta.items() if k != "seconds"} == {k: v for k, v in expected_meta.items() if k != "seconds"}


@pytest.mark.parametrize("seed", SEEDS)
def test_partition_killed_at_random_moments_then_rerun_writes_the_same_partitioned_shards(reference, tmp_path, seed):
    data_ref, _, times = reference
    data = tmp_path / "data"
    shutil.copytree(data_ref, data, ignore=shutil.ignore_patterns("partition*"))
    command = _command("partition", data)
    _chain("partition", seed, times["partition"], command, command, data, _writing("partition", data))
    with np.load(data / "partitions-k3-p40.npz") as got, np.load(data_ref / "partitions-k3-p40.npz") as want:
        assert np.array_equal(got["parts"], want["parts"])
        meta, meta_ref = json.loads(str(got["meta"])), json.loads(str(want["meta"]))
        assert {k: v for k, v in meta.items() if k != "seconds"} == {k: v for k, v in meta_ref.items() if k != "seconds"}
    out, out_ref = data / "partitioned-k3-p40", data_ref / "partitioned-k3-p40"
    manifest = json.loads((out / "dataset.json").read_text())
    expected = json.loads((out_ref / "dataset.json").read_text())
    manifest["partitioned"].pop("source_dir"), expected["partitioned"].pop("source_dir")  # the folders differ
    assert manifest == expected
    for shard in expected["shards"]:
        assert (out / shard["file"]).read_bytes() == (out_ref / shard["file"]).read_bytes()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in out_ref.iterdir())  # no spool, no temporary


@pytest.mark.parametrize("seed", SEEDS)
def test_training_killed_at_random_moments_then_resumed_ends_as_the_uninterrupted_run(reference, tmp_path, seed):
    """Kills land anywhere: before the first checkpoint (the resume then starts anew, the dead
    run moved to previous/), in pretraining, in the start, the self-labelling stage or the joint
    phase, while a checkpoint or metrics.jsonl is written."""
    data_ref, run_ref, times = reference
    run = tmp_path / "run"
    command = _command("train", data_ref, run)
    _chain("train", seed, times["train"], command, [*command, "train.resume=true"], run, _writing("train", run))
    assert (run / "assignments.txt").read_text() == (run_ref / "assignments.txt").read_text()

    def logged(folder):
        return [(r["phase"], r["epoch"], r.get("acc"), r.get("recon")) for r in RunFolder(folder).read_metrics_log()]
    assert logged(run) == logged(run_ref)  # every line once, none torn
    assert json.loads((run / "metrics.json").read_text())["acc"] == json.loads((run_ref / "metrics.json").read_text())["acc"]


def test_a_disk_that_fills_mid_run_keeps_the_last_checkpoint_and_resume_finishes(reference, tmp_path):
    """The run folder on a small tmpfs, filled to the last byte once the first checkpoint is
    complete: the run stops with one line naming the file it could not write (exit status 1, no
    traceback), its complete checkpoints stay, and once space is freed --resume finishes with
    the uninterrupted run's assignments."""
    data_ref, run_ref, _ = reference
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root (CAP_SYS_ADMIN): {mounted.stderr.strip()}")
    try:
        run = disk / "run"
        command = _command("train", data_ref, run)
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 300
        while not list((run / "checkpoints").glob("ckpt-*/trainer_state.json")):
            assert process.poll() is None and time.monotonic() < deadline, "no checkpoint written"
            time.sleep(0.01)
        filler = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # every byte that is left
            while os.write(filler, b"\0" * (1 << 16)):
                pass
        except OSError:
            pass
        finally:
            os.close(filler)
        output, _ = process.communicate(timeout=300)
        assert process.returncode == 1, output[-3000:]
        assert "Traceback" not in output and "No space left on device" in output, output[-3000:]
        error_line = [line for line in output.splitlines() if line.startswith("error:")]
        assert len(error_line) == 1 and str(run) in error_line[0], output[-3000:]
        complete = sorted((run / "checkpoints").glob("ckpt-*/trainer_state.json"))
        assert complete, "the last complete checkpoint is gone"
        print(f"disk full: {error_line[0]}; complete checkpoints {[p.parent.name for p in complete]}")
        (disk / "filler").unlink()
        assert _run([*command, "train.resume=true"])
        assert (run / "assignments.txt").read_text() == (run_ref / "assignments.txt").read_text()
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)
