#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the end-to-end test of `--launcher slurm`
# (tests/test_slurm.py): slurm-wlm and munge from Debian packages, slurmctld and slurmd as root.
#   sudo bash scripts/slurm_cluster.sh start    # install if needed, configure, start, check srun
#   sudo bash scripts/slurm_cluster.sh status
#   sudo bash scripts/slurm_cluster.sh stop     # stops the daemons this script started
# On failure `start` prints one line "SLURM cluster could not start: <reason>" and exits 1.
# State, logs and pid files live in $FISHERTUNE_SLURM_STATE (default /tmp/fishertune-slurm); the
# configuration is written to /etc/slurm/slurm.conf (where sbatch/squeue look for it) only when
# that file is absent or was written by this script.
set -uo pipefail

STATE=${FISHERTUNE_SLURM_STATE:-/tmp/fishertune-slurm}
CONF=/etc/slurm/slurm.conf
MARKER="# written by fishertune scripts/slurm_cluster.sh"
HOST=$(hostname -s)

fail() {
    echo "SLURM cluster could not start: $*" >&2
    exit 1
}

# a live process of that name (zombies left by a daemon's double fork do not count)
alive() { ps -C "$1" -o stat= 2>/dev/null | grep -qv '^Z'; }

node_state() { sinfo -h -n "$HOST" -o %t 2>/dev/null | head -1; }

install() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged \
        >/dev/null && return 0
    command -v apt-get >/dev/null || fail "slurmctld/slurmd/munged not installed and no apt-get"
    echo "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >"$STATE/apt.log" 2>&1 || fail "apt-get update failed (see $STATE/apt.log)"
    apt-get install -y -qq slurm-wlm munge >>"$STATE/apt.log" 2>&1 \
        || fail "apt-get install slurm-wlm munge failed (see $STATE/apt.log)"
}

start_munge() {
    if [ ! -s /etc/munge/munge.key ]; then
        mkdir -p /etc/munge
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /etc/munge/munge.key /run/munge /var/log/munge /var/lib/munge
    chmod 400 /etc/munge/munge.key
    if ! alive munged; then
        runuser -u munge -- /usr/sbin/munged || fail "munged did not start"
        touch "$STATE/started-munged"
    fi
    munge -n | unmunge >/dev/null 2>&1 || fail "munge -n | unmunge fails (munged not working)"
}

write_conf() {
    if [ -f "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
        fail "$CONF exists and was not written by this script; not touching it"
    fi
    local cpus mem
    cpus=$(nproc)
    mem=$(($(free -m | awk '/^Mem:/ {print $2}') * 9 / 10))
    mkdir -p /etc/slurm "$STATE/ctld" "$STATE/d"
    cat >"$CONF" <<EOF
$MARKER
ClusterName=fishertune
SlurmctldHost=$HOST
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
KillWait=10
AuthInfo=cred_expire=10
MinJobAge=600
SchedulerParameters=sched_interval=2,bf_interval=2
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
}

start() {
    mkdir -p "$STATE"
    if [ "$(node_state)" = "idle" ] || [ "$(node_state)" = "mix" ] || [ "$(node_state)" = "alloc" ]; then
        echo "SLURM cluster already running (node $HOST: $(node_state))"
        return 0
    fi
    [ "$(id -u)" = 0 ] || fail "needs root (installs packages, writes $CONF, runs slurmd)"
    install
    start_munge
    write_conf
    alive slurmctld || slurmctld -f "$CONF" || fail "slurmctld did not start (see $STATE/slurmctld.log)"
    alive slurmd || slurmd -f "$CONF" || fail "slurmd did not start (see $STATE/slurmd.log)"
    for _ in $(seq 60); do
        case "$(node_state)" in
            idle | mix | alloc) break ;;
            down* | drain*) scontrol update nodename="$HOST" state=resume >/dev/null 2>&1 ;;
        esac
        sleep 0.5
    done
    case "$(node_state)" in
        idle | mix | alloc) ;;
        *) fail "node $HOST is '$(node_state)' after 30 s (see $STATE/slurmctld.log)" ;;
    esac
    timeout 60 srun -t 1 -N 1 hostname >/dev/null 2>"$STATE/srun.err" \
        || fail "srun hostname failed: $(head -1 "$STATE/srun.err")"
    echo "SLURM cluster running: node $HOST ($(nproc) CPUs), partition debug, state in $STATE"
}

stop() {
    for daemon in slurmd slurmctld; do
        if [ -f "$STATE/$daemon.pid" ]; then
            kill "$(cat "$STATE/$daemon.pid")" 2>/dev/null || true
            rm -f "$STATE/$daemon.pid"
        fi
    done
    if [ -f "$STATE/started-munged" ] && [ -f /run/munge/munged.pid ]; then
        kill "$(cat /run/munge/munged.pid)" 2>/dev/null || true
        rm -f "$STATE/started-munged"
    fi
    echo "SLURM cluster stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status)
        sinfo 2>/dev/null || { echo "SLURM cluster not running"; exit 1; }
        squeue 2>/dev/null
        ;;
    *)
        echo "usage: $0 start|stop|status" >&2
        exit 2
        ;;
esac
