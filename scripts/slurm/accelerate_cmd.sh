#!/bin/bash
# Shared part of the Slurm scripts (train_single_node.sbatch, train_multi_node.sbatch).
#
# Run on a node:   bash scripts/slurm/accelerate_cmd.sh [key=value ...]
#   Builds this node's `accelerate launch` line from the Slurm variables, prints it, and runs it.
#   A SIGUSR1 or SIGTERM it receives is passed on to `accelerate launch` as SIGTERM: the
#   launcher (torchrun's agent, for MULTI_GPU and DeepSpeed) handles SIGTERM by sending it to
#   every training process and waiting up to TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds for them to
#   save and exit; a SIGUSR1 would kill the launcher itself and orphan the workers, so the
#   launcher is started with SIGUSR1 ignored (the trainer may still install its own handler).
#   Exits with the launcher's status.
#
# Sourced by a batch script:   source scripts/slurm/accelerate_cmd.sh; run_and_requeue CMD ...
#   Runs CMD in the background and waits for it. SIGUSR1 (sbatch --signal=B:USR1@120) is
#   passed on to CMD as SIGUSR1 and, once CMD has exited with a non-zero status (it stopped
#   early, having saved), the job is put back in the queue: `scontrol requeue $SLURM_JOB_ID`.
#   SIGTERM is passed on the same way (as SIGUSR1: srun turns a SIGTERM it gets into SIGKILL of
#   its tasks) but the job is not requeued. Status 0 (training finished) never requeues.
#
# Environment (all optional except the Slurm ones, which Slurm sets):
#   CONFIG              training config                (default configs/default.yaml)
#   ACCELERATE_CONFIG   Accelerate config file         (default configs/accelerate/multi_gpu.yaml
#                                                       on one node, multi_node.yaml on several)
#   GPUS_PER_NODE       processes per node             (default $SLURM_GPUS_ON_NODE)
#   MAIN_PROCESS_PORT   rendezvous port on node 0      (default 20000 + SLURM_JOB_ID % 20000)
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds the launcher waits for the workers to save after
#                                   SIGTERM before SIGKILL (default here 90; torch's own is 30)
#   SLURM_NNODES, SLURM_NODEID, SLURM_JOB_NODELIST, SLURM_JOB_ID, SLURM_GPUS_ON_NODE

# Print this node's launch command, one argument per line (no trailing training overrides).
slurm_accelerate_cmd() {
    local nnodes=${SLURM_NNODES:-1}
    local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    if [[ -z $gpus ]]; then
        echo "accelerate_cmd.sh: no GPU count: submit with --gpus-per-node=N (Slurm then sets SLURM_GPUS_ON_NODE) or set GPUS_PER_NODE" >&2
        return 2
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
        printf '%s\n' accelerate launch --config_file "$accelerate_config" \
            --num_machines "$nnodes" --machine_rank "${SLURM_NODEID:?}" \
            --main_process_ip "$main_host" --main_process_port "$port" \
            --num_processes "$((nnodes * gpus))"
    else
        accelerate_config=${ACCELERATE_CONFIG:-configs/accelerate/multi_gpu.yaml}
        printf '%s\n' accelerate launch --config_file "$accelerate_config" \
            --num_processes "$gpus" --main_process_port "$port"
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
    trap "echo '[node ${SLURM_NODEID:-0}] signal received: SIGTERM to accelerate launch (pid $launcher)'; kill -TERM $launcher 2>/dev/null" USR1 TERM
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
    echo "[batch] training exited with status $status"
    if ((_requeue_requested && status != 0)); then
        echo "[batch] requeueing job $SLURM_JOB_ID; it resumes from the latest checkpoint (train.resume=true)"
        scontrol requeue "$SLURM_JOB_ID"
    fi
    return "$status"
}

if [[ ${BASH_SOURCE[0]} == "$0" ]]; then
    set -uo pipefail
    cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2 # repository root: launch/, configs/
    run_node "$@"
    exit $?
fi
