"""scripts/scale_run.py (issue 19): every stage of a whole run as its own process, timed, with
that process's own peak memory, written to scale.json; a second call continues, not repeats.
A short schedule here (the script's own is for 70 000 to 1 000 000 images)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from sddecc_dist.data import load_all

ROOT = Path(__file__).resolve().parent.parent
MNIST = ROOT.parent / "shared" / "datasets"
STAGES = ["make", "prepare", "graph", "partition", "train", "show"]


def test_scale_run_times_every_stage_and_continues(tmp_path):
    out = tmp_path / "scale"
    command = [sys.executable, "scripts/scale_run.py", "--n", "2000", "--out", str(out), "--from", str(MNIST),
               "train.pretrain_epochs=1", "train.self_label_epochs=0", "train.center_init=kmeans",
               "train.kmeans_n_init=1", "train.head_warmup_epochs=3", "train.joint_epochs=4"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    result = json.loads((out / "scale.json").read_text())
    assert result["n"] == 2000 and list(result["stages"]) == STAGES
    for name, stage in result["stages"].items():
        assert stage["seconds"] > 0 and stage["peak_rss_mib"] > 0, name
    # each stage's peak is its own process's: the training holds far more than the partitioning
    assert result["stages"]["train"]["peak_rss_mib"] > 2 * result["stages"]["partition"]["peak_rss_mib"]
    assert result["peak_rss_mib"] == max(s["peak_rss_mib"] for s in result["stages"].values())
    assert abs(result["seconds"] - sum(s["seconds"] for s in result["stages"].values())) < 0.05
    assert result["graph"]["index"] == "pca_ivf" and 0.5 < result["graph"]["recall"] <= 1.0
    assert result["train"][-1] == "train.joint_epochs=4"  # the overrides come after the schedule
    assert (out / "run" / "report" / "index.html").is_file() and (out / "run" / "assignments.csv").is_file()
    metrics = json.loads((out / "run" / "metrics.json").read_text())
    assert result["acc"] == metrics["acc"] and metrics["n_samples"] == 2000

    # the set: warped digits, every image its own, the labels MNIST's ten
    images, labels = load_all(out / "data")
    flat = images.flatten(1).numpy()
    assert len(np.unique(flat, axis=0)) == 2000
    assert sorted(np.unique(labels.numpy())) == list(range(10))

    # a second call finds every stage done and runs none of them again
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert json.loads((out / "scale.json").read_text())["stages"] == result["stages"]
    bigger = subprocess.run([*command[:3], "3000", *command[4:]], cwd=ROOT, capture_output=True, text=True)
    assert bigger.returncode != 0 and "is a run of 2000 images, not 3000" in bigger.stderr + bigger.stdout


# A child that stands for the trainer: on SIGTERM it exits with 128 + 15, as the trainer does
# after saving its checkpoint; left alone it would run for a minute.
PREEMPTIBLE = "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *_: sys.exit(143)); time.sleep(60)"
STOP_THE_STAGE = f"""
import json, os, signal, sys, threading
from pathlib import Path
sys.path.insert(0, "scripts")
from scale_run import run_stage
threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGTERM)).start()  # the signal goes to the script
print(json.dumps(run_stage("train", [sys.executable, "-c", {PREEMPTIBLE!r}], Path(sys.argv[1]))))
"""


def test_a_signal_to_the_script_stops_the_stage_and_is_recorded(tmp_path):
    done = subprocess.run([sys.executable, "-c", STOP_THE_STAGE, str(tmp_path / "train.log")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["stopped"] == 143  # the child got the signal passed on and exited as the trainer does
    assert 1.5 < figures["seconds"] < 30 and figures["peak_rss_mib"] > 0


def test_a_continued_stage_adds_its_attempts_seconds_and_keeps_the_largest_peak():
    sys.path.insert(0, str(ROOT / "scripts"))
    from scale_run import with_attempts

    final = {"seconds": 10.0, "peak_rss_mib": 300.0}
    assert with_attempts(final, []) == final
    stopped = [{"seconds": 5.5, "peak_rss_mib": 900.0, "stopped": 143}, {"seconds": 2.25, "peak_rss_mib": 200.0, "stopped": 138}]
    assert with_attempts(final, stopped) == {"seconds": 17.75, "peak_rss_mib": 900.0, "attempts": 3}
