#!/bin/bash
# Shared part of the Slurm scripts (train_single_node.sbatch, train_multi_node.sbatch).
#
# Run on a node:   bash scripts/slurm/accelerate_cmd.sh [key=value ...]
#   Builds this node's `accelerate launch` line from the Slurm variables, prints it, and runs it.
#   A SIGUSR1 or SIGTERM it receives is passed on as SIGTERM to the training processes (the
#   launcher's children), which save a checkpoint and exit; the launcher then exits as they did.
#   Not to the launcher itself: a scancel or a time limit sends SIGTERM to every process of the
#   job, the launcher included, and torchrun's agent logs an error for a second one. The agent
#   handles the SIGTERM it gets from Slurm by passing it on to the workers and waiting up to
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them. A SIGUSR1 would kill the launcher and
#   orphan the workers, so the launcher is started with SIGUSR1 ignored (the trainer may still
#   install its own handler). Exits with the launcher's status.
#
# Sourced by a batch script:   source scripts/slurm/accelerate_cmd.sh; run_and_requeue CMD ...
#   Runs CMD in the background and waits for it. SIGUSR1 (sbatch --signal=B:USR1@120) is
#   passed on to CMD as SIGUSR1 and, once CMD has exited with a non-zero status (it stopped
#   early, having saved), the job is put back in the queue: `scontrol requeue $SLURM_JOB_ID`.
#   SIGTERM is passed on the same way (as SIGUSR1: srun turns a SIGTERM it gets into SIGKILL of
#   its tasks) but the job is not requeued. Status 0 (training finished) never requeues.
#   Exit status: 0 finished; 128 + N the training saved a checkpoint and stopped on signal N
#   (143 SIGTERM, 138 SIGUSR1; the trainer writes it into $SDDECC_STOP_FILE, as the launcher
#   reports any stopped worker as 1); anything else an error (1) or bad input (2).
#
# Environment (all optional except the Slurm ones, which Slurm sets):
#   CONFIG              training config                (default configs/default.yaml)
#   ACCELERATE_CONFIG   Accelerate config file         (default configs/accelerate/multi_gpu.yaml
#                                                       on one node, multi_node.yaml on several)
#   GPUS_PER_NODE       processes per node             (default $SLURM_GPUS_ON_NODE)
#   PROCESSES_PER_NODE  processes per node without GPUs (default 1): an allocation without
#                       GPUs (sbatch --gpus-per-node=0 on a CPU partition) trains on the CPUs,
#                       ACCELERATE_USE_CPU=true (gloo), OMP_NUM_THREADS = its CPUs / processes
#   MAIN_PROCESS_PORT   rendezvous port on node 0      (default 20000 + SLURM_JOB_ID % 20000)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher waits for the workers to save after
#                                   SIGTERM before SIGKILL (default here 90; torch's own is 30)
#   SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_JOB_ID, SLURM_GPUS_ON_NODE

# Print this node's launch command, one argument per line (no trailing training overrides).
slurm_accelerate_cmd() {
    local nnodes=${SLURM_NNODES:-1}
    local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-0}}
    local processes=$gpus
    local -a launcher=(accelerate launch)
    if ((gpus == 0)); then  # no GPU in the allocation: processes on the CPUs (platform: ACCELERATE_USE_CPU)
        processes=${PROCESSES_PER_NODE:-1}
        local threads=$((${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-1}} / processes))
        launcher=(env ACCELERATE_USE_CPU=true OMP_NUM_THREADS=$((threads > 0 ? threads : 1)) accelerate launch)
        echo "[node ${SLURM_NODEID:-0}] no GPU in this allocation (--gpus-per-node, GPUS_PER_NODE): $processes process(es) on the CPUs" >&2
    fi
    local port=${MAIN_PROCESS_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
    local accelerate_config
    if ((nnodes > 1)); then
        accelerate_config=${ACCELERATE_CONFIG:-configs/accelerate/multi_node.yaml}
        local main_host
        main_host=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?}" | head -n 1)
        if [[ -z $main_host ]]; then
            echo "accelerate_cmd.sh: no host from 'scontrol show hostnames $SLURM_JOB_NODELIST'" >&2
            return 2
        fi
        printf '%s\n' "${launcher[@]}" --config_file "$accelerate_config" \
            --num_machines "$nnodes" --machine_rank "${SLURM_NODEID:?}" \
            --main_process_ip "$main_host" --main_process_port "$port" \
            --num_processes "$((nnodes * processes))"
    else
        accelerate_config=${ACCELERATE_CONFIG:-configs/accelerate/multi_gpu.yaml}
        printf '%s\n' "${launcher[@]}" --config_file "$accelerate_config" \
            --num_processes "$processes" --main_process_port "$port"
    fi
}

# Run this node's share of the training; see the top of the file.
run_node() {
    local -a cmd
    mapfile -t cmd < <(slurm_accelerate_cmd) && ((${#cmd[@]})) || return 2
    cmd+=(launch/train.py --config "${CONFIG:-configs/default.yaml}" "$@" train.resume=true)
    export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-90}
    echo "[node ${SLURM_NODEID:-0} $(hostname)] $(printf '%q ' "${cmd[@]}")"
    (trap '' USR1 && exec "${cmd[@]}") &
    local launcher=$! status
    # shellcheck disable=SC2064  # the pid is fixed now
    trap "echo '[node ${SLURM_NODEID:-0}] signal received: SIGTERM to the training processes of accelerate launch (pid $launcher)'; pkill -TERM -P $launcher" USR1 TERM
    _wait_for "$launcher"
    status=$_waited_status
    trap - USR1 TERM
    return "$status"
}

# Wait until process $1 has exited, also when a trapped signal interrupts `wait`;
# leaves its exit status in _waited_status.
_wait_for() {
    wait "$1"
    _waited_status=$?
    while kill -0 "$1" 2>/dev/null; do
        wait "$1"
        _waited_status=$?
    done
}

_requeue_requested=0

run_and_requeue() {
    export SDDECC_STOP_FILE="${TMPDIR:-/tmp}/sddecc-stop-${SLURM_JOB_ID:-0}-$$"
    rm -f "$SDDECC_STOP_FILE"
    "$@" &
    local child=$!
    _requeue_requested=0
    # shellcheck disable=SC2064  # the pid is fixed now
    trap "_requeue_requested=1; echo '[batch] SIGUSR1 (time limit near or pre-emption): asking the training to save'; kill -USR1 $child 2>/dev/null" USR1
    # shellcheck disable=SC2064
    trap "echo '[batch] SIGTERM: asking the training to save; no requeue'; kill -USR1 $child 2>/dev/null" TERM
    _wait_for "$child"
    local status=$_waited_status
    trap - USR1 TERM
    if [[ -s $SDDECC_STOP_FILE ]]; then
        status=$(<"$SDDECC_STOP_FILE")
        echo "[batch] the training saved a checkpoint and stopped on a signal: exit status $status"
    else
        echo "[batch] training exited with status $status"
    fi
    rm -f "$SDDECC_STOP_FILE"
    if ((_requeue_requested && status != 0)); then
        echo "[batch] requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint (train.resume=true)"
        scontrol requeue "$SLURM_JOB_ID"
    elif ((status > 128)); then
        echo "[batch] not requeued: submit the same command again (same output_dir) to resume"
    fi
    return "$status"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -uo pipefail
    cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2 # repository root: launch/, configs/
    run_node "$@"
    exit $?
fi
