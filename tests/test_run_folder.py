"""A run folder is never overwritten: a fresh run into a folder that holds a run refuses before
it writes anything, `--new-version` moves the earlier run whole into previous/TIME/, and one
training at a time holds a folder's lock (issue 22)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from sddecc_dist.config import ConfigError, load_config
from sddecc_dist.pipeline import prepare_dataset
from sddecc_dist.run_folder import RunFolder, RunFolderError, RunLock
from sddecc_dist.train.checkpoint import Position
from sddecc_dist.train.loop import logged_before, train

ROOT = Path(__file__).resolve().parent.parent


def _config(tmp_path, run_name="run", *overrides):
    return load_config(ROOT / "configs/digits.yaml", [
        f"data_dir={tmp_path / 'data'}", f"output_dir={tmp_path / run_name}", "train.pretrain_epochs=1",
        "train.head_warmup_epochs=2", "train.joint_epochs=4", "train.checkpoint_every=2",
        "train.kmeans_n_init=1", *overrides])


def _snapshot(folder: Path) -> dict:
    """Every file under `folder` with its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished short run on digits, and its folder's snapshot."""
    tmp = tmp_path_factory.mktemp("finished")
    prepare_dataset("digits", tmp / "data", samples_per_shard=1000)
    result = train(_config(tmp))
    return tmp, result


def test_a_fresh_run_into_a_folder_holding_a_run_refuses_and_leaves_it_as_it_was(finished):
    tmp, _ = finished
    before = _snapshot(tmp / "run")
    with pytest.raises(RunFolderError, match=r"holds a run \(config.yaml, metrics.json, .*--resume.*--new-version"):
        train(_config(tmp, "run", "seed=1"))
    assert _snapshot(tmp / "run") == before
    assert not (tmp / "run" / RunFolder.LOCK).exists()
    # the command line says it in one line, exit status 2, no traceback
    out = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/digits.yaml",
                          f"data_dir={tmp / 'data'}", f"output_dir={tmp / 'run'}"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "holds a run" in out.stderr and "Traceback" not in out.stderr
    assert _snapshot(tmp / "run") == before


def test_new_version_moves_the_earlier_run_whole_into_previous(finished, tmp_path):
    tmp, first = finished
    run = tmp_path / "run"
    # a copy of the finished run to move (the fixture's folder stays for the other tests)
    subprocess.run(["cp", "-a", str(tmp / "run"), str(run)], check=True)
    before = _snapshot(run)
    with pytest.raises(ConfigError, match="train.resume .* train.new_version .* choose one"):
        load_config(ROOT / "configs/digits.yaml", [f"output_dir={run}", "train.resume=true",
                                                   "train.new_version=true"])
    second = train(_config(tmp_path, "run", f"data_dir={tmp / 'data'}", "seed=1", "train.new_version=true"))
    (moved,) = (run / RunFolder.PREVIOUS).iterdir()
    assert {name: value[0] for name, value in _snapshot(moved).items()} == \
        {name: value[0] for name, value in before.items()}  # every file, byte for byte
    assert json.loads((run / "metrics.json").read_text())["seed"] == 1 == second["seed"]
    assert json.loads((moved / "metrics.json").read_text())["acc"] == first["acc"]
    # a second new version keeps both earlier ones
    train(_config(tmp_path, "run", f"data_dir={tmp / 'data'}", "seed=2", "train.new_version=true"))
    assert len(list((run / RunFolder.PREVIOUS).iterdir())) == 2


def test_a_folder_in_use_by_a_live_training_is_refused_and_a_stale_lock_taken_over(finished, tmp_path):
    tmp, _ = finished
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run.lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": live.pid, "slurm_job_id": None,
                                             "started": "then"}))
        before = _snapshot(run.path)
        with pytest.raises(RunFolderError, match=rf"in use: a training runs there \(pid {live.pid} on "):
            train(_config(tmp_path, "run", f"data_dir={tmp / 'data'}"))
        assert _snapshot(run.path) == before  # the running training's lock untouched, nothing written
    finally:
        live.kill()
        live.wait()
    # its process is gone: the lock is stale, taken over, and released at the end
    train(_config(tmp_path, "run", f"data_dir={tmp / 'data'}"))
    assert run.is_finished and not run.lock_path.exists()


def test_lock_staleness_by_host_pid_and_slurm_job(tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run")
    lock, took_over = RunLock.acquire(run)
    assert took_over is None and json.loads(run.lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not run.lock_path.exists()
    # another host's live-or-not process: held, unless it is this Slurm job before its requeue
    run.lock_path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "slurm_job_id": "77", "started": "then"}))
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    with pytest.raises(RunFolderError, match="pid 1 on elsewhere"):
        RunLock.acquire(run)
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock, took_over = RunLock.acquire(run)
    assert "pid 1 on elsewhere" in took_over
    lock.release()
    # a lock file cut short by its writer's death is stale
    run.lock_path.write_text('{"host": "')
    lock, took_over = RunLock.acquire(run)
    lock.release()


def test_resume_without_a_checkpoint_moves_the_unfinished_run_aside(finished, tmp_path):
    """A run that died before its first checkpoint left a config and a log: --resume has
    nothing to continue, so that run moves to previous/ and a new one starts."""
    tmp, _ = finished
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("name: died-early\n")
    (run / "metrics.jsonl").write_text('{"phase": "pretrain", "epoch": 1}\n')
    train(_config(tmp_path, "run", f"data_dir={tmp / 'data'}", "train.resume=true"))
    (moved,) = (run / RunFolder.PREVIOUS).iterdir()
    assert (moved / "config.yaml").read_text() == "name: died-early\n"
    assert RunFolder(run).is_finished


def test_an_output_dir_that_cannot_be_written_is_named_in_one_line(finished, tmp_path):
    tmp, _ = finished
    (tmp_path / "a-file").write_text("not a folder")
    out = subprocess.run([sys.executable, "launch/train.py", "--config", "configs/digits.yaml",
                          f"data_dir={tmp / 'data'}", f"output_dir={tmp_path / 'a-file' / 'run'}"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"output_dir {tmp_path / 'a-file' / 'run'} cannot be written: Not a directory" in " ".join(out.stderr.split())


def test_os_errors_end_in_one_line_naming_the_file_unless_debugging(monkeypatch, capsys):
    from sddecc_dist.cli import run_reporting_errors

    def full_disk() -> None:
        raise OSError(28, "No space left on device", "/runs/x/checkpoints/final.pt")

    monkeypatch.delenv("SDDECC_DEBUG", raising=False)
    assert run_reporting_errors(full_disk) == 1
    assert "/runs/x/checkpoints/final.pt: No space left on device" in capsys.readouterr().err
    monkeypatch.setenv("SDDECC_DEBUG", "1")
    with pytest.raises(OSError, match="No space left"):
        run_reporting_errors(full_disk)


def test_an_error_longer_than_the_console_stays_one_line_and_is_printed_verbatim(monkeypatch, capsys):
    """A deep run folder's path is longer than the console's 200 columns (a CI run's tmpfs path
    was cut in two): the error is still one line, and text that looks like rich markup in it
    (an override key, a path with brackets) is printed as it is."""
    from sddecc_dist.cli import run_reporting_errors

    deep = "/tmp/" + "/".join(f"level-{i}" for i in range(40)) + "/checkpoints/.tmp-ckpt-0"
    monkeypatch.delenv("SDDECC_DEBUG", raising=False)

    def full_disk() -> None:
        raise OSError(28, "No space left on device", deep)

    def bad_key() -> None:
        raise ValueError("train.lrs[0]: unknown key in [red]runs/[bold]x.yaml")

    assert run_reporting_errors(full_disk) == 1 and run_reporting_errors(bad_key) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"error: {deep}: No space left on device (SDDECC_DEBUG=1 shows the traceback)",
                     "error: train.lrs[0]: unknown key in [red]runs/[bold]x.yaml"]


def test_a_torn_metrics_line_is_never_read_and_a_resume_drops_it_with_the_lines_after_its_checkpoint(tmp_path):
    run = RunFolder(tmp_path)
    lines = [{"phase": "pretrain", "epoch": 1}, {"phase": "pretrain", "epoch": 2}, {"phase": "kmeans", "epoch": 2},
             {"phase": "joint", "epoch": 50}, {"phase": "joint", "epoch": 100}]
    for line in lines:
        run.append_metrics(line)
    with open(run.metrics_log_path, "a") as f:
        f.write('{"phase": "joint", "ep')  # a kill -9 inside the write
    assert run.read_metrics_log() == lines  # the torn line is not a record and no error
    # a run resumed from the checkpoint of joint epoch 50: epoch 100 and the torn line go
    assert run.keep_metrics_log(lambda r: logged_before(Position("joint", 50, 0), r)) == 2
    assert run.metrics_log_path.read_text() == "".join(json.dumps(line) + "\n" for line in lines[:4])
    assert run.keep_metrics_log(lambda r: True) == 0  # nothing torn is left
    # a damaged line in the middle is not a torn write: named, not skipped
    run.metrics_log_path.write_text('{"phase": "pretrain", "epoch": 1}\n{oops\n')
    with pytest.raises(RunFolderError, match="metrics.jsonl line 2 is not valid JSON"):
        run.read_metrics_log()


@pytest.mark.parametrize("position, kept", [
    (Position("pretrain", 1, 0), ["pretrain 1"]),
    (Position("pretrain", 1, 7), ["pretrain 1"]),  # stopped inside epoch 2
    (Position("joint", 0, 0), ["pretrain 1", "pretrain 2", "kmeans 2", "self_label 6"]),
    (Position("joint", 50, 3), ["pretrain 1", "pretrain 2", "kmeans 2", "self_label 6", "joint 50"]),
])
def test_logged_before_follows_the_order_of_lines_and_checkpoints(position, kept):
    records = [{"phase": p, "epoch": e} for p, e in
               [("pretrain", 1), ("pretrain", 2), ("kmeans", 2), ("self_label", 6), ("joint", 50), ("joint", 100)]]
    assert [f"{r['phase']} {r['epoch']}" for r in records if logged_before(position, r)] == kept
