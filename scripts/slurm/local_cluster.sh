#!/bin/bash
# A real one-node Slurm on this machine (Debian's slurm-wlm and munge), to try the batch
# scripts and for tests/test_slurm_real.py. Needs root (the daemons run as root here).
#
#   bash scripts/slurm/local_cluster.sh start DIR   # DIR/slurm.conf, munged, slurmctld, slurmd
#   export SLURM_CONF=DIR/slurm.conf                # then sbatch, squeue, scontrol, sacct as usual
#   bash scripts/slurm/local_cluster.sh stop DIR
#
# The configuration is the smallest that runs jobs without cgroups: proctrack/linuxproc
# (processes found by parentage), task/none, one partition `debug` holding this host with
# every CPU and all memory that `slurmd -C` finds, no accounting. State, logs and spool stay
# under DIR. Missing packages: apt-get install slurm-wlm munge.
set -euo pipefail

usage() { echo "usage: $0 start|stop DIR" >&2; exit 2; }
(($# == 2)) || usage
action=$1
dir=$(mkdir -p "$2" && cd "$2" && pwd)

stop_daemons() {
    for name in slurmd slurmctld; do
        if [[ -f $dir/$name.pid ]]; then
            kill "$(<"$dir/$name.pid")" 2>/dev/null || true
        fi
    done
    # wait for them, so that a new start finds the ports free
    for _ in $(seq 50); do
        pgrep -f "slurm(ctld|d) .*-f $dir/slurm.conf" >/dev/null || break
        sleep 0.1
    done
}

case $action in
stop)
    stop_daemons
    exit 0
    ;;
start) ;;
*) usage ;;
esac

for tool in munged slurmctld slurmd sbatch; do
    command -v "$tool" >/dev/null || { echo "$0: no $tool: apt-get install slurm-wlm munge" >&2; exit 2; }
done
((EUID == 0)) || { echo "$0: the daemons need root here" >&2; exit 2; }

host=$(hostname -s)
node_line=$(slurmd -C | head -n 1)  # NodeName=HOST CPUs=... RealMemory=...
mkdir -p "$dir/state" "$dir/spool"
cat >"$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
SchedulerParameters=sched_interval=2
$node_line State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF

# munge: one key for this host (Debian's package makes one); its socket folder under /run
mkdir -p /run/munge && chown munge:munge /run/munge
if ! pgrep -x munged >/dev/null; then
    [[ -f /etc/munge/munge.key ]] || { mungekey --create 2>/dev/null || create-munge-key; chown munge:munge /etc/munge/munge.key; }
    runuser -u munge -- munged
fi

stop_daemons
export SLURM_CONF=$dir/slurm.conf
slurmctld -i -f "$dir/slurm.conf"
slurmd -f "$dir/slurm.conf"
for _ in $(seq 100); do  # until the node takes jobs
    if sinfo -h -N -o '%T' 2>/dev/null | grep -qx idle; then
        echo "slurm up: export SLURM_CONF=$dir/slurm.conf"
        exit 0
    fi
    sleep 0.2
done
echo "$0: the node did not come up; see $dir/slurmctld.log and $dir/slurmd.log" >&2
exit 1
