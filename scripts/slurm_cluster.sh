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
# sees, and a row records, exactly the CPUs it had. Accounting: slurmdbd on a local MariaDB (socket
# only, no network), so `sacct` answers and submitit can follow its jobs without a warning per poll;
# SDBUILD_SLURM_ACCOUNTING=0 leaves it out (two packages fewer; submitit then warns that sacct is
# unavailable, harmlessly). Finished jobs are also logged to /var/log/slurm/jobcomp.log.
set -euo pipefail

PARTITION=${SDBUILD_SLURM_PARTITION:-debug}
ACCOUNTING=${SDBUILD_SLURM_ACCOUNTING:-1}
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
    local wanted=(slurmctld slurmd slurm-client munge) missing=()
    (( ACCOUNTING )) && wanted+=(slurmdbd mariadb-server)
    local pkg
    for pkg in "${wanted[@]}"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    (( ${#missing[@]} )) || return 0
    command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu) to install ${missing[*]}"
    say "installing ${missing[*]}"
    local apt=(apt-get install -y -qq -o DPkg::Lock::Timeout=300 "${missing[@]}")
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${apt[@]}" >/dev/null; }
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
        if (( ACCOUNTING )); then
            echo "AccountingStorageType=accounting_storage/slurmdbd"
            echo "AccountingStorageHost=localhost"
            echo "JobAcctGatherType=jobacct_gather/linux"
        else  # sacct has nothing to read; submitit warns on each poll and follows jobs by their files
            echo "AccountingStorageType=accounting_storage/none"
            echo "JobAcctGatherType=jobacct_gather/none"
        fi
        # Finished jobs (start/end time, node) also go to a text log.
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

start_accounting() {  # MariaDB on a socket, the accounting database, slurmdbd
    if [[ -f /etc/slurm/slurmdbd.conf ]] && ! grep -qF "$MARK" /etc/slurm/slurmdbd.conf; then
        die "/etc/slurm/slurmdbd.conf exists and was not written by this script: not touching it"
    fi
    if ! mysqladmin ping --silent >/dev/null 2>&1; then
        install -d -o mysql -g mysql -m 0755 /run/mysqld
        [[ -d /var/lib/mysql/mysql ]] || mariadb-install-db --user=mysql >/dev/null
        say "starting mariadbd (socket only)"
        setsid mariadbd --user=mysql --skip-networking --pid-file=/run/mysqld/mariadbd.pid </dev/null >>"$LOG/mariadbd.log" 2>&1 &
        for _ in $(seq 100); do mysqladmin ping --silent >/dev/null 2>&1 && break; sleep 0.2; done
        mysqladmin ping --silent >/dev/null 2>&1 || die "mariadbd did not come up; see $LOG/mariadbd.log"
    fi
    mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
              CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'sdbuild-local';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';"
    {
        echo "$MARK"
        echo "AuthType=auth/munge"
        echo "DbdHost=localhost"
        echo "SlurmUser=root"
        echo "StorageType=accounting_storage/mysql"
        echo "StorageHost=localhost"
        echo "StorageUser=slurm"
        echo "StoragePass=sdbuild-local"
        echo "StorageLoc=slurm_acct_db"
        echo "PidFile=$PIDS/slurmdbd.pid"
        echo "LogFile=$LOG/slurmdbd.log"
    } >/etc/slurm/slurmdbd.conf
    chmod 0600 /etc/slurm/slurmdbd.conf
    if ! running slurmdbd "$PIDS/slurmdbd.pid"; then
        say "starting slurmdbd"
        slurmdbd
    fi
    for _ in $(seq 100); do sacctmgr -n show cluster >/dev/null 2>&1 && break; sleep 0.2; done
    sacctmgr -n show cluster format=cluster 2>/dev/null | grep -qw sdbuild || sacctmgr -i add cluster sdbuild >/dev/null
}

start() {
    [[ $(id -u) == 0 ]] || die "must run as root (it installs packages and starts daemons); try: sudo $0"
    install_packages
    start_munge
    install -d -m 0755 "$STATE/ctld" "$STATE/d" "$LOG" "$PIDS"
    local before
    before=$(cat "$CONF" 2>/dev/null || true)
    write_conf
    if [[ "$(cat "$CONF")" != "$before" ]]; then  # a changed configuration needs fresh daemons
        stop_daemons slurmd slurmctld
    fi
    if (( ACCOUNTING )); then start_accounting; fi
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

stop_daemons() {  # stop_daemons NAME...: daemons this script started, by their pid files; waits until gone
    local name pid file
    for name in "$@"; do
        file=$PIDS/$name.pid
        [[ $name == mariadbd ]] && file=/run/mysqld/mariadbd.pid
        if running "$name" "$file"; then
            pid=$(cat "$file")
            say "stopping $name"
            kill "$pid"
            for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
}

stop() {
    stop_daemons slurmd slurmctld slurmdbd mariadbd
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
