"""The Slurm batch script under a real Slurm: Debian's slurm-wlm (22.05) and munge, one node
started by scripts/slurm/local_cluster.sh (proctrack/linuxproc, task/none, no cgroups).

A short digits run is submitted three times with `sbatch --gpus-per-node=0` (a CPU partition):
uninterrupted; pre-empted with `scancel --signal=USR1 --batch` (what `--signal=B:USR1@120`
sends before a time limit), which saves, requeues and resumes; and cancelled with `scancel`
(SIGTERM to every process of the job), which saves and stops with exit status 143, then is
submitted again and resumes. Both end with the uninterrupted run's assignments, bit for bit.

Needs root and the packages (apt-get install slurm-wlm munge; scripts/nightly.sh installs
them). Marked `slurm`: about 4 minutes, so it runs in scripts/nightly.sh, not in the README's
test command (`-m "not slurm"` in pyproject.toml's addopts).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sddecc_dist.run_folder import RunFolder

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parent.parent
SINGLE = "scripts/slurm/train_single_node.sbatch"
# Long enough pretraining that the signal lands inside it; the rest short.
OVERRIDES = ["train.pretrain_epochs=40", "train.head_warmup_epochs=20", "train.joint_epochs=30",
             "train.kmeans_n_init=2", "train.eval_every=10", "train.checkpoint_every=10"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [tool for tool in ("munged", "slurmctld", "slurmd", "sbatch") if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.skip(f"a real Slurm needs root and slurm-wlm + munge (missing: {missing or 'root'}); "
                    "scripts/nightly.sh installs them")
    folder = tmp_path_factory.mktemp("slurm")
    subprocess.run(["bash", "scripts/slurm/local_cluster.sh", "start", str(folder)], cwd=REPO, check=True,
                   timeout=120)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.update(SLURM_CONF=str(folder / "slurm.conf"), CONFIG="configs/digits.yaml")
    data = tmp_path_factory.mktemp("data") / "digits"
    subprocess.run(["sddecc", "prepare", "digits", "--out", str(data)], check=True, env=env, timeout=300)
    yield env, folder, data
    subprocess.run(["bash", "scripts/slurm/local_cluster.sh", "stop", str(folder)], cwd=REPO, timeout=60)


def submit(env, log: Path, data: Path, run: Path) -> str:
    out = subprocess.run(["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=2", f"--output={log}",
                          SINGLE, f"data_dir={data}", f"output_dir={run}", *OVERRIDES],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split(";")[0]


def job(env, job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(field.split("=", 1) for field in out.stdout.split() if "=" in field)


def wait_for(condition, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)
    return value


def pretraining_started(run: Path) -> bool:
    return any(line.get("phase") == "pretrain" for line in RunFolder(run).read_metrics_log())


def scontrol(env, *args):
    subprocess.run(["scontrol", *args], env=env, check=True, timeout=30)


def test_preempted_and_cancelled_jobs_resume_to_the_uninterrupted_result(slurm, tmp_path):
    env, folder, data = slurm
    finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")

    whole = submit(env, tmp_path / "whole.out", data, tmp_path / "whole")
    state = wait_for(lambda: job(env, whole)["JobState"] in finished and job(env, whole), "the uninterrupted job")
    assert state["JobState"] == "COMPLETED", (tmp_path / "whole.out").read_text()
    expected = (tmp_path / "whole" / "assignments.txt").read_text()

    # Pre-emption: USR1 to the batch shell -> the training saves and stops -> requeued -> resumes.
    run = tmp_path / "preempted"
    preempted = submit(env, tmp_path / "preempted.out", data, run)
    wait_for(lambda: pretraining_started(run), "the pre-empted job's pretraining")
    subprocess.run(["scancel", "--signal=USR1", "--batch", preempted], env=env, check=True, timeout=30)
    wait_for(lambda: job(env, preempted)["Restarts"] == "1" and job(env, preempted)["JobState"] == "PENDING",
             "the requeue")
    # Slurm holds a requeued job about 120 s (Reason=BeginTime); let it start now.
    scontrol(env, "update", f"JobId={preempted}", "StartTime=now")
    state = wait_for(lambda: job(env, preempted)["JobState"] in finished and job(env, preempted), "the resumed job")
    log = (tmp_path / "preempted.out").read_text()
    assert state["JobState"] == "COMPLETED", log
    assert "saved a checkpoint and stopped on a signal: exit status 143" in log
    assert "requeueing job" in log and "restart count 1" in log
    assert (run / "assignments.txt").read_text() == expected

    # scancel: SIGTERM to every process of the job -> saved, stopped with 143, not requeued;
    # the same submission again resumes it.
    run = tmp_path / "cancelled"
    cancelled = submit(env, tmp_path / "cancelled.out", data, run)
    wait_for(lambda: pretraining_started(run), "the cancelled job's pretraining")
    subprocess.run(["scancel", cancelled], env=env, check=True, timeout=30)
    state = wait_for(lambda: job(env, cancelled)["JobState"] in finished and job(env, cancelled), "the cancel")
    log = (tmp_path / "cancelled.out").read_text()
    assert state["JobState"] == "CANCELLED" and state["Restarts"] == "0", log
    assert "not requeued: submit the same command again" in log, log
    # torchrun's agent (under accelerate launch) got Slurm's SIGTERM once, not a second from
    # the scripts; it shuts down by raising SignalException, with a traceback (docs/distributed.md)
    assert log.count("Received 15 death signal") == 1, log
    again = submit(env, tmp_path / "again.out", data, run)
    state = wait_for(lambda: job(env, again)["JobState"] in finished and job(env, again), "the resubmitted job")
    assert state["JobState"] == "COMPLETED", (tmp_path / "again.out").read_text()
    assert (run / "assignments.txt").read_text() == expected
