#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, to try sdbuild's SLURM sweeps on a laptop or a single
# GPU box, and for the tests that need a real scheduler. Debian/Ubuntu, as root (it installs
# packages and starts daemons). Idempotent: run it again and it only starts what is not running.
#
#   scripts/slurm_cluster.sh            # install (apt), configure, start; then `srun hostname` answers
#   scripts/slurm_cluster.sh stop       # stop the daemons this script started
#   scripts/slurm_cluster.sh status
#
# The node is this host with the CPUs and memory `slurmd -C` reports, plus its NVIDIA GPUs as
# `gpu` GRES (so `--gpus-per-node=1` gives each job its own GPU through CUDA_VISIBLE_DEVICES).
# One partition, `debug` (SDBUILD_SLURM_PARTITION to rename). Cores are the consumable resource
# (select/cons_tres, CR_Core) and task/affinity binds each job to the cores it was given, so a job
# sees, and a row records, exactly the CPUs it had. There is no accounting database (slurmdbd needs
# MySQL); finished jobs are logged to /var/log/slurm/jobcomp.log instead.
set -euo pipefail

PARTITION=${SDBUILD_SLURM_PARTITION:-debug}
CONF=/etc/slurm/slurm.conf
MARK="# written by sdbuild scripts/slurm_cluster.sh"
PIDS=/run/sdbuild-slurm
STATE=/var/lib/slurm/sdbuild
LOG=/var/log/slurm

say() { echo "[slurm_cluster] $*"; }
die() { echo "[slurm_cluster] $*" >&2; exit 1; }

running() {  # running NAME PIDFILE: is the process in PIDFILE alive and called NAME?
    [[ -f $2 ]] && [[ "$(cat "/proc/$(cat "$2")/comm" 2>/dev/null)" == "$1" ]]
}

install_packages() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
            && command -v munged >/dev/null; then
        return
    fi
    command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu) to install slurmctld slurmd slurm-client munge"
    say "installing slurmctld slurmd slurm-client munge"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; }
}

start_munge() {
    install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
    install -d -o munge -g munge -m 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        mungekey --create --keyfile /etc/munge/munge.key 2>/dev/null \
            || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        say "starting munged (as the munge user)"
        runuser -u munge -- /usr/sbin/munged
        for _ in $(seq 50); do munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.1; done
        munge -n | unmunge >/dev/null || die "munged did not come up"
    fi
}

gpus() {  # how many NVIDIA GPUs this host has (0 without the driver)
    if command -v nvidia-smi >/dev/null; then nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true; else echo 0; fi
}

write_conf() {
    if [[ -f $CONF ]] && ! grep -qF "$MARK" "$CONF"; then
        die "$CONF exists and was not written by this script: not touching a real cluster's configuration"
    fi
    local host node n
    host=$(hostname -s)
    node=$(slurmd -C | head -1)  # NodeName=<host> CPUs=.. Boards=.. ... RealMemory=..
    n=$(gpus)
    install -d -m 0755 "$STATE/ctld" "$STATE/d" "$LOG" "$PIDS"
    {
        echo "$MARK"
        echo "ClusterName=sdbuild"
        echo "SlurmctldHost=$host"
        echo "SlurmUser=root"
        echo "AuthType=auth/munge"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/affinity"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core"
        echo "ReturnToService=2"
        echo "StateSaveLocation=$STATE/ctld"
        echo "SlurmdSpoolDir=$STATE/d"
        echo "SlurmctldPidFile=$PIDS/slurmctld.pid"
        echo "SlurmdPidFile=$PIDS/slurmd.pid"
        echo "SlurmctldLogFile=$LOG/slurmctld.log"
        echo "SlurmdLogFile=$LOG/slurmd.log"
        # No slurmdbd: sacct has nothing to read. Finished jobs (start/end time, node) go to a text log.
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "JobCompType=jobcomp/filetxt"
        echo "JobCompLoc=$LOG/jobcomp.log"
        echo "SchedulerType=sched/backfill"
        echo "MpiDefault=none"
        if (( n > 0 )); then
            echo "GresTypes=gpu"
            echo "$node Gres=gpu:$n State=UNKNOWN"
        else
            echo "$node State=UNKNOWN"
        fi
        echo "PartitionName=$PARTITION Nodes=$host Default=YES MaxTime=INFINITE State=UP"
    } >"$CONF.new"
    mv "$CONF.new" "$CONF"
    if (( n > 0 )); then
        echo "Name=gpu File=/dev/nvidia[0-$((n - 1))]" >/etc/slurm/gres.conf
    else
        rm -f /etc/slurm/gres.conf
    fi
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons); try: sudo $0"
    install_packages
    start_munge
    write_conf
    running slurmctld "$PIDS/slurmctld.pid" || { say "starting slurmctld"; slurmctld; }
    running slurmd "$PIDS/slurmd.pid" || { say "starting slurmd"; slurmd; }
    local host state
    host=$(hostname -s)
    for _ in $(seq 100); do
        state=$(sinfo -h -n "$host" -o %T 2>/dev/null | head -1 || true)
        case $state in
            idle|mixed|allocated|completing) break ;;
            down*|drain*) scontrol update NodeName="$host" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    [[ $state =~ ^(idle|mixed|allocated|completing)$ ]] || die "node $host is '${state:-not registered}'; see $LOG/slurmd.log and $LOG/slurmctld.log"
    say "up: partition $PARTITION, node $(sinfo -h -n "$host" -o '%n %c CPUs %m MB %G')"
}

stop() {
    local name
    for name in slurmd slurmctld; do
        if running "$name" "$PIDS/$name.pid"; then
            say "stopping $name"
            kill "$(cat "$PIDS/$name.pid")"
        fi
    done
    if [[ -f /run/munge/munged.pid ]] && running munged /run/munge/munged.pid; then
        say "stopping munged"
        kill "$(cat /run/munge/munged.pid)"
    fi
}

case ${1:-start} in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue ;;
    *) die "usage: $0 [start|stop|status]" ;;
esac
