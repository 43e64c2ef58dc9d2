"""The Slurm scripts (scripts/slurm/) run under bash with stand-in srun, scontrol and accelerate.

The stand-ins, written into tmp_path/bin and put first on PATH, record their argv (and a few
variables) as JSON lines instead of running anything. The stand-in srun runs its command once
per node, concurrently, with SLURM_NODEID/SLURM_PROCID set, and passes SIGUSR1 on to them as
the real one does. The tests assert the exact `accelerate launch` line of every node and the
pre-emption path: SIGUSR1 to the batch script -> SIGTERM to the training processes under
accelerate -> their exit status -> scontrol requeue.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SINGLE = "scripts/slurm/train_single_node.sbatch"
MULTI = "scripts/slurm/train_multi_node.sbatch"
JOB_ID = "4242"
PORT = str(20000 + int(JOB_ID) % 20000)  # the helper's default: 24242

RECORD = '''
import json, os, signal, sys
def record(entry):
    entry.update(tool=os.path.basename(sys.argv[0]), node=os.environ.get("SLURM_NODEID"))
    with open(os.environ["STANDIN_LOG"], "a") as f:
        f.write(json.dumps(entry) + "\\n")
'''

ACCELERATE = RECORD + '''
import subprocess, time
if os.environ.get("STANDIN_ROLE") != "worker":  # `accelerate launch`
    record({"argv": sys.argv[1:], "cwd": os.getcwd(),
            "usr1_ignored": signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN,
            "shutdown_timeout": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"),
            "use_cpu": os.environ.get("ACCELERATE_USE_CPU"), "omp_threads": os.environ.get("OMP_NUM_THREADS")})
    if not os.environ.get("STANDIN_BLOCK"):
        sys.exit(0)
    # One training process under the launcher, as accelerate starts it; every SIGTERM the
    # launcher itself gets is recorded (torchrun's agent logs an error for a second one).
    got = []
    signal.signal(signal.SIGTERM, lambda s, f: got.append("SIGTERM"))
    worker = subprocess.Popen([sys.executable, sys.argv[0], *sys.argv[1:]], env=dict(os.environ, STANDIN_ROLE="worker"))
    while worker.poll() is None:
        time.sleep(0.01)
    record({"launcher_signals": got})
    sys.exit(0 if worker.returncode == 0 else 1)  # accelerate launch reports any failed worker as 1
# the training process: runs until a signal comes, then "saves" and exits as the trainer does
got = []
for sig in (signal.SIGTERM, signal.SIGINT):
    signal.signal(sig, lambda s, f: got.append(signal.Signals(s).name))
open(os.path.join(os.environ["STANDIN_READY"], "node-" + os.environ.get("SLURM_NODEID", "0")), "w").close()
deadline = time.monotonic() + 20
while not got and time.monotonic() < deadline:
    time.sleep(0.01)
time.sleep(0.3)  # a second signal on its way is recorded too
record({"signals": got})
status = int(os.environ.get("STANDIN_EXIT_ON_SIGNAL", "143")) if got else 99
if status > 128 and os.environ.get("SLURM_NODEID", "0") == "0":  # the main process, as stopped_on_signal
    with open(os.environ["SDDECC_STOP_FILE"], "w") as f:
        f.write(f"{status}\\n")
sys.exit(status)
'''

SCONTROL = RECORD + '''
record({"argv": sys.argv[1:]})
if sys.argv[1:3] == ["show", "hostnames"]:
    known = {"gpu-[07-08]": ["gpu-07", "gpu-08"], "gpu-07": ["gpu-07"]}
    if sys.argv[3] not in known:
        sys.exit("scontrol: unknown node list " + sys.argv[3])
    print("\\n".join(known[sys.argv[3]]))
'''

SRUN = RECORD + '''
import subprocess
record({"argv": sys.argv[1:]})
args = sys.argv[1:]
while args and args[0].startswith("-"):  # the scripts give options as --name=value
    args.pop(0)
children = []
for node in range(int(os.environ["SLURM_NNODES"])):
    env = dict(os.environ, SLURM_NODEID=str(node), SLURM_PROCID=str(node), SLURM_LOCALID="0")
    children.append(subprocess.Popen(args, env=env))
def forward(sig, frame):  # real srun passes SIGUSR1 on to its tasks (and turns SIGTERM into SIGKILL)
    for child in children:
        child.send_signal(signal.SIGUSR1 if sig == signal.SIGUSR1 else signal.SIGKILL)
signal.signal(signal.SIGUSR1, forward)
signal.signal(signal.SIGTERM, forward)
sys.exit(max(child.wait() for child in children))
'''


@pytest.fixture
def cluster(tmp_path):
    """Stand-ins on PATH and a clean environment; returns (env, read_log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in {"accelerate": ACCELERATE, "scontrol": SCONTROL, "srun": SRUN}.items():
        path = bin_dir / name
        path.write_text(f"#!{sys.executable}\n{body}")
        path.chmod(0o755)
    (tmp_path / "ready").mkdir()
    log = tmp_path / "standin.jsonl"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "SBATCH_", "ACCELERATE_", "TORCH_ELASTIC_"))
           and k not in ("CONFIG", "GPUS_PER_NODE", "MAIN_PROCESS_PORT")}
    env.update(
        PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}",
        STANDIN_LOG=str(log),
        STANDIN_READY=str(tmp_path / "ready"),
        SLURM_SUBMIT_DIR=str(REPO),
        SLURM_JOB_ID=JOB_ID,
        SLURM_JOB_NAME="sddecc",
        SLURM_NODEID="0",  # as in the batch step; srun must give each node its own
        SLURM_PROCID="0",
        SLURM_GPUS_ON_NODE="4",
    )

    def read_log(tool=None):
        if not log.exists():
            return []
        entries = [json.loads(line) for line in log.read_text().splitlines()]
        return [e for e in entries if tool is None or e["tool"] == tool]

    return env, read_log


def single_node(env):
    env.update(SLURM_NNODES="1", SLURM_JOB_NUM_NODES="1", SLURM_JOB_NODELIST="gpu-07")
    return env


def multi_node(env):
    env.update(SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_JOB_NODELIST="gpu-[07-08]")
    return env


def run(script, env, *args):
    # cwd elsewhere on purpose: the scripts must cd to SLURM_SUBMIT_DIR themselves
    return subprocess.run(["bash", str(REPO / script), *args], env=env, cwd="/",
                          capture_output=True, text=True, timeout=60)


def launches(read_log):
    """accelerate argv per node, from the stand-in's records."""
    calls = [e for e in read_log("accelerate") if "argv" in e]
    return {e["node"]: e["argv"] for e in calls}, calls


def test_single_node_launch_line(cluster):
    env, read_log = cluster
    env = single_node(env)
    env["CONFIG"] = "configs/paper/mnist.yaml"
    result = run(SINGLE, env, "seed=3", "output_dir=runs/mnist-s3")
    assert result.returncode == 0, result.stdout + result.stderr
    by_node, calls = launches(read_log)
    assert len(calls) == 1
    assert calls[0]["argv"] == [
        "launch", "--config_file", "configs/accelerate/multi_gpu.yaml",
        "--num_processes", "4", "--main_process_port", PORT,
        "launch/train.py", "--config", "configs/paper/mnist.yaml",
        "seed=3", "output_dir=runs/mnist-s3", "train.resume=true",
    ]
    assert calls[0]["cwd"] == str(REPO)
    assert calls[0]["usr1_ignored"] is True
    assert calls[0]["shutdown_timeout"] == "90"
    assert read_log("srun") == [] and read_log("scontrol") == []  # nothing to look up; no requeue
    assert "accelerate launch --config_file configs/accelerate/multi_gpu.yaml" in result.stdout


def test_multi_node_launch_lines(cluster):
    env, read_log = cluster
    env = multi_node(env)
    result = run(MULTI, env, "seed=3")
    assert result.returncode == 0, result.stdout + result.stderr
    (srun,) = read_log("srun")
    assert srun["argv"] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                            "bash", "scripts/slurm/accelerate_cmd.sh", "seed=3"]
    by_node, calls = launches(read_log)
    assert len(calls) == 2
    for rank in ("0", "1"):
        assert by_node[rank] == [
            "launch", "--config_file", "configs/accelerate/multi_node.yaml",
            "--num_machines", "2", "--machine_rank", rank,
            "--main_process_ip", "gpu-07", "--main_process_port", PORT,
            "--num_processes", "8",
            "launch/train.py", "--config", "configs/default.yaml", "seed=3", "train.resume=true",
        ], rank
    lookups = [e["argv"] for e in read_log("scontrol")]
    assert lookups == [["show", "hostnames", "gpu-[07-08]"]] * 2  # one per node, none a requeue


def test_launch_line_follows_the_environment(cluster):
    env, read_log = cluster
    env = multi_node(env)
    env.update(ACCELERATE_CONFIG="configs/accelerate/deepspeed_zero2.yaml", GPUS_PER_NODE="2",
               MAIN_PROCESS_PORT="29555", CONFIG="configs/digits.yaml")
    result = run(MULTI, env)
    assert result.returncode == 0, result.stdout + result.stderr
    by_node, _ = launches(read_log)
    assert by_node["1"] == [
        "launch", "--config_file", "configs/accelerate/deepspeed_zero2.yaml",
        "--num_machines", "2", "--machine_rank", "1",
        "--main_process_ip", "gpu-07", "--main_process_port", "29555", "--num_processes", "4",
        "launch/train.py", "--config", "configs/digits.yaml", "train.resume=true",
    ]


@pytest.mark.parametrize("processes, threads", [(None, "8"), ("2", "4")])
def test_an_allocation_without_gpus_trains_on_the_cpus(cluster, processes, threads):
    """sbatch --gpus-per-node=0 on a CPU partition: no SLURM_GPUS_ON_NODE, PROCESSES_PER_NODE
    processes (default 1) on the CPUs (ACCELERATE_USE_CPU, the platform's working way), each
    with its share of the task's CPUs as OMP threads."""
    env, read_log = cluster
    env = single_node(env)
    del env["SLURM_GPUS_ON_NODE"]
    env["SLURM_CPUS_PER_TASK"] = "8"
    if processes:
        env["PROCESSES_PER_NODE"] = processes
    result = run(SINGLE, env)
    assert result.returncode == 0, result.stdout + result.stderr
    by_node, calls = launches(read_log)
    assert calls[0]["argv"][:6] == ["launch", "--config_file", "configs/accelerate/multi_gpu.yaml",
                                    "--num_processes", processes or "1", "--main_process_port"]
    assert calls[0]["use_cpu"] == "true" and calls[0]["omp_threads"] == threads
    assert "no GPU in this allocation" in result.stderr


def test_submitted_outside_the_repository_fails_clearly(cluster, tmp_path):
    env, read_log = cluster
    env = single_node(env)
    env["SLURM_SUBMIT_DIR"] = str(tmp_path)
    result = run(SINGLE, env)
    assert result.returncode == 2
    assert "repository root" in result.stderr
    assert read_log("accelerate") == []


def test_single_node_script_refuses_several_nodes(cluster):
    env, read_log = cluster
    env = multi_node(env)
    result = run(SINGLE, env)
    assert result.returncode == 2
    assert "train_multi_node.sbatch" in result.stderr
    assert read_log("accelerate") == []


def signal_batch(script, env, sig, read_log, n_nodes, whole_job=False):
    """Start the batch script, wait until every node's training runs, send `sig` to the batch
    shell (scancel --batch, sbatch --signal=B:...) or, with `whole_job`, to every process of
    the job at once (scancel, a time limit)."""
    env["STANDIN_BLOCK"] = "1"
    batch = subprocess.Popen(["bash", str(REPO / script)], env=env, cwd="/", text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    ready = Path(env["STANDIN_READY"])
    try:
        deadline = time.monotonic() + 20
        while len(list(ready.iterdir())) < n_nodes:
            assert batch.poll() is None, batch.stdout.read()
            assert time.monotonic() < deadline, "accelerate stand-in never started"
            time.sleep(0.02)
        if whole_job:
            os.killpg(batch.pid, sig)
        else:
            batch.send_signal(sig)
        output, _ = batch.communicate(timeout=30)
    finally:
        if batch.poll() is None:
            os.killpg(batch.pid, signal.SIGKILL)
            batch.wait()
    return batch.returncode, output


def signals(read_log, key):
    return [e[key] for e in read_log("accelerate") if key in e]


@pytest.mark.parametrize("layout, script, n_nodes", [(single_node, SINGLE, 1), (multi_node, MULTI, 2)])
def test_usr1_saves_and_requeues(cluster, layout, script, n_nodes):
    env, read_log = cluster
    status, output = signal_batch(script, layout(env), signal.SIGUSR1, read_log, n_nodes)
    assert signals(read_log, "signals") == [["SIGTERM"]] * n_nodes, output  # every node's training was told
    assert signals(read_log, "launcher_signals") == [[]] * n_nodes, output  # and not the launchers
    requeues = [e["argv"] for e in read_log("scontrol") if e["argv"][0] == "requeue"]
    assert requeues == [["requeue", JOB_ID]], output  # once, after they exited
    # the status the training stopped with, not the launcher's 1
    assert status == 143, output
    assert output.index("saved a checkpoint and stopped on a signal: exit status 143") < output.index("requeueing job 4242")


@pytest.mark.parametrize("sig, exit_code, message", [
    (signal.SIGTERM, 143, "not requeued: submit the same command again"),  # scancel --batch: saved, stopped
    (signal.SIGUSR1, 0, "training exited with status 0"),  # it had finished
])
def test_no_requeue_on_sigterm_or_when_finished(cluster, sig, exit_code, message):
    env, read_log = cluster
    env["STANDIN_EXIT_ON_SIGNAL"] = str(exit_code)
    status, output = signal_batch(SINGLE, single_node(env), sig, read_log, 1)
    assert signals(read_log, "signals") == [["SIGTERM"]], output
    assert [e for e in read_log("scontrol") if e["argv"][0] == "requeue"] == [], output
    assert status == exit_code and message in output, output


def test_a_failure_after_usr1_is_status_1_and_requeued(cluster):
    """A training that fails instead of saving writes no stop status: the launcher's 1 stands."""
    env, read_log = cluster
    env["STANDIN_EXIT_ON_SIGNAL"] = "1"
    status, output = signal_batch(SINGLE, single_node(env), signal.SIGUSR1, read_log, 1)
    assert status == 1 and "training exited with status 1" in output, output
    assert [e["argv"] for e in read_log("scontrol") if e["argv"][0] == "requeue"] == [["requeue", JOB_ID]]


def test_a_sigterm_to_the_whole_job_reaches_the_launcher_once(cluster):
    """scancel and the time limit send SIGTERM to every process of the job: the launcher gets
    Slurm's, and the scripts pass theirs on to the training processes only."""
    env, read_log = cluster
    status, output = signal_batch(SINGLE, single_node(env), signal.SIGTERM, read_log, 1, whole_job=True)
    assert signals(read_log, "launcher_signals") == [["SIGTERM"]], output
    assert signals(read_log, "signals")[0][0] == "SIGTERM", output
    assert status == 143 and [e for e in read_log("scontrol") if e["argv"][0] == "requeue"] == [], output


def test_sbatch_headers():
    for script in (SINGLE, MULTI):
        lines = (REPO / script).read_text().splitlines()
        directives = {line.split()[1].split("=")[0] for line in lines if line.startswith("#SBATCH ")}
        assert {"--requeue", "--signal", "--output", "--open-mode", "--time", "--gpus-per-node",
                "--nodes"} <= directives, script
        assert "#SBATCH --signal=B:USR1@120" in lines
        assert "#SBATCH --output=logs/%x-%j.out" in lines


@pytest.mark.parametrize("name, distributed_type, processes", [
    ("single_gpu.yaml", "NO", 1),
    ("multi_gpu.yaml", "MULTI_GPU", -1),
    ("multi_cpu.yaml", "MULTI_GPU", 2),  # + ACCELERATE_USE_CPU=true: see configs/accelerate/README.md
    ("multi_node.yaml", "MULTI_GPU", -1),
    ("deepspeed_zero2.yaml", "DEEPSPEED", 2),
])
def test_accelerate_configs_load(name, distributed_type, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs" / "accelerate" / name))  # rejects unknown keys
    assert config.distributed_type == distributed_type
    assert config.num_processes == processes
    assert config.mixed_precision == "no"
    if name == "deepspeed_zero2.yaml":
        assert config.deepspeed_config == {
            "deepspeed_multinode_launcher": "standard", "gradient_accumulation_steps": 1,
            "gradient_clipping": 1.0, "offload_optimizer_device": "none",
            "offload_param_device": "none", "zero3_init_flag": False, "zero_stage": 2,
        }
