#!/usr/bin/env bash
# A single-machine SLURM cluster (one controller + one node) for development and tests.
#
#   launch/slurm/local_cluster.sh start    # install when missing, configure, start, wait until idle
#   launch/slurm/local_cluster.sh status   # exit 0 when every daemon is up and the node answers
#   launch/slurm/local_cluster.sh env      # prints `export SLURM_CONF=...` for `eval`
#   launch/slurm/local_cluster.sh stop     # cancels this cluster's jobs, ends only our daemons
#
# Needs root (it installs Debian's slurm-wlm and munge, and runs slurmd as root).
# No cgroups, no accounting daemon, no systemd: the daemons are started by hand and
# tracked by pidfiles under the state directory, so `stop` never touches a munged or a
# slurmctld that somebody else started on the same machine.
#
# Settings (environment variables):
#   LOCAL_SLURM_DIR         state directory (config, spool, logs, pidfiles)   [${TMPDIR:-/tmp}/hycam-ds-slurm]
#   LOCAL_SLURM_NODES       nodes, each its own slurmd on this machine         [1]
#                           (1: node "localhost"; more: node1..nodeN, to try multi-node jobs)
#   LOCAL_SLURM_CPUS        CPUs advertised per node (may exceed the cores)    [cores of this machine]
#   LOCAL_SLURM_GPUS        fake GPUs (gres) per node, so GPU-style scripts run on CPU [2]
#   LOCAL_SLURM_CTLD_PORT   slurmctld port                                     [6817]
#   LOCAL_SLURM_SLURMD_PORT slurmd port (node i listens on this + i - 1)       [6818]
#   LOCAL_SLURM_TIMEOUT     seconds to wait for each daemon / the node         [60]
#   LOCAL_SLURM_APT_TIMEOUT seconds allowed for the apt install                [600]
#   LOCAL_SLURM_CRED_EXPIRE seconds a requeued job waits before it may restart [10]
#   LOCAL_SLURM_MUNGE_DIR   munged socket/pid/log directory       [/run/hycam-ds-munge-<hash of state dir>]
set -euo pipefail

STATE_DIR="${LOCAL_SLURM_DIR:-${TMPDIR:-/tmp}/hycam-ds-slurm}"
GPUS="${LOCAL_SLURM_GPUS:-2}"
CTLD_PORT="${LOCAL_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${LOCAL_SLURM_SLURMD_PORT:-6818}"
TIMEOUT="${LOCAL_SLURM_TIMEOUT:-60}"
APT_TIMEOUT="${LOCAL_SLURM_APT_TIMEOUT:-600}"
CRED_EXPIRE="${LOCAL_SLURM_CRED_EXPIRE:-10}"
NODES_COUNT="${LOCAL_SLURM_NODES:-1}"

CONF="$STATE_DIR/slurm.conf"
# munged runs as the munge user, which cannot enter a private (0700) state directory such
# as pytest's, and a socket path must stay under ~100 characters: keep its files in /run,
# named after the state directory so that two clusters never share them.
MUNGE_DIR="${LOCAL_SLURM_MUNGE_DIR:-/run/hycam-ds-munge-$(printf %s "$STATE_DIR" | cksum | cut -d' ' -f1)}"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_PID="$MUNGE_DIR/munged.pid"
CTLD_PID="$STATE_DIR/run/slurmctld.pid"

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

check_int() {  # name value: settings are checked before anything is started
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}
check_int LOCAL_SLURM_GPUS "$GPUS"
check_int LOCAL_SLURM_NODES "$NODES_COUNT"
((NODES_COUNT >= 1)) || die "LOCAL_SLURM_NODES must be at least 1"
if ((NODES_COUNT == 1)); then
    NODES=(localhost)
else
    NODES=()
    for ((i = 1; i <= NODES_COUNT; i++)); do NODES+=("node$i"); done
fi
check_int LOCAL_SLURM_CTLD_PORT "$CTLD_PORT"
check_int LOCAL_SLURM_SLURMD_PORT "$SLURMD_PORT"
check_int LOCAL_SLURM_TIMEOUT "$TIMEOUT"
check_int LOCAL_SLURM_APT_TIMEOUT "$APT_TIMEOUT"
check_int LOCAL_SLURM_CRED_EXPIRE "$CRED_EXPIRE"
[[ -z "${LOCAL_SLURM_CPUS:-}" ]] || check_int LOCAL_SLURM_CPUS "$LOCAL_SLURM_CPUS"

# Every client command below must talk to *this* cluster, whatever the caller exported.
export SLURM_CONF="$CONF"

# proc_is PID COMM: PID is a running (not zombie) process named COMM. The name check keeps
# us from signalling an unrelated process that reused a stale pid.
proc_is() {
    [[ -n "$1" && -r "/proc/$1/comm" ]] || return 1
    [[ "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]] || return 1
    # An exited daemon nobody has reaped yet (a zombie) is not running.
    [[ "$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null)" != Z ]]
}

# pid_alive PIDFILE COMM: the pid in PIDFILE is a running COMM.
pid_alive() {
    [[ -s "$1" ]] || return 1
    proc_is "$(tr -dc '0-9' <"$1")" "$2"
}

# wait_for SECONDS DESCRIPTION COMMAND...: poll COMMAND until it succeeds or time runs out.
wait_for() {
    local secs="$1" what="$2"; shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || { log "timed out after ${secs}s waiting for $what"; return 1; }
        sleep 0.2
    done
}

install_packages() {
    local missing=0 bin
    for bin in slurmctld slurmd munged sbatch scontrol; do
        command -v "$bin" >/dev/null 2>&1 || missing=1
    done
    ((missing)) || return 0
    ((EUID == 0)) || die "slurm-wlm/munge are missing and installing them needs root"
    command -v apt-get >/dev/null 2>&1 || die "slurm-wlm/munge are missing and apt-get is not available"
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    # A fresh machine has no package lists yet: update only when the first try fails.
    if ! timeout "$APT_TIMEOUT" apt-get install -y --no-install-recommends slurm-wlm munge \
            >"$STATE_DIR/apt.log" 2>&1; then
        timeout "$APT_TIMEOUT" apt-get update >>"$STATE_DIR/apt.log" 2>&1 || true
        timeout "$APT_TIMEOUT" apt-get install -y --no-install-recommends slurm-wlm munge \
            >>"$STATE_DIR/apt.log" 2>&1 || die "apt-get install failed, see $STATE_DIR/apt.log"
    fi
    # "policy-rc.d denied execution of start" in that log is expected: we start the daemons ourselves.
}

write_config() {
    local hw_cpus cpus i n node node_lines="" gres_line=""
    # slurmd -C reports what slurmd will detect; advertising more than the hardware would
    # drain the node unless SlurmdParameters=config_overrides (set below) is present.
    hw_cpus="$(slurmd -C 2>/dev/null | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n1)"
    cpus="${LOCAL_SLURM_CPUS:-${hw_cpus:-$(nproc)}}"
    mkdir -p "$STATE_DIR"/{state,spool,run,log,gpus}
    : >"$STATE_DIR/gres.conf"
    ((GPUS > 0)) && echo "AutoDetect=off" >"$STATE_DIR/gres.conf"
    for ((n = 0; n < ${#NODES[@]}; n++)); do
        node="${NODES[n]}"
        if ((GPUS > 0)); then
            # Fake GPUs: empty files named as devices let `--gres=gpu:N` jobs be scheduled on CPU.
            mkdir -p "$STATE_DIR/gpus/$node"
            for ((i = 0; i < GPUS; i++)); do : >"$STATE_DIR/gpus/$node/fakegpu$i"; done
            gres_line="Gres=gpu:$GPUS"
            echo "NodeName=$node Name=gpu File=$STATE_DIR/gpus/$node/fakegpu[0-$((GPUS - 1))]" \
                >>"$STATE_DIR/gres.conf"
        fi
        # Several slurmd on one machine: each its own port; the host behind every name is this one.
        node_lines+="NodeName=$node NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((SLURMD_PORT + n))"
        node_lines+=" CPUs=$cpus $gres_line State=UNKNOWN"$'\n'
    done
    cat >"$CONF" <<EOF
# Generated by launch/slurm/local_cluster.sh: a single-machine development cluster.
ClusterName=hycamlocal
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (120 s by default).
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=$CRED_EXPIRE
CredType=cred/munge
MpiDefault=none
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE_DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
# Finished jobs stay visible to \`scontrol show job\` for 10 minutes (tests poll it).
MinJobAge=600
# Short kill wait: a job that ignores SIGTERM is killed 10 s later, not 30.
KillWait=10
InactiveLimit=0
JobRequeue=1
# Schedule often: a requeued job is only started by a periodic pass once its begin time is
# reached (default passes are 30-60 s apart, which would dominate the tests' run time).
SchedulerParameters=sched_interval=2,bf_interval=2
StateSaveLocation=$STATE_DIR/state
SlurmdSpoolDir=$STATE_DIR/spool/%n
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$STATE_DIR/run/slurmd-%n.pid
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd-%n.log
GresTypes=gpu
${node_lines}PartitionName=local Nodes=$(IFS=,; echo "${NODES[*]}") Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

munge_ok() { munge -S "$MUNGE_SOCKET" -n </dev/null | unmunge -S "$MUNGE_SOCKET" >/dev/null; }

start_munged() {
    pid_alive "$MUNGE_PID" munged && munge_ok 2>/dev/null && return 0
    [[ -s /etc/munge/munge.key ]] || die "/etc/munge/munge.key is missing (munge's postinst creates it)"
    # Our own munged on a private socket: independent of any system munged.
    install -d -o munge -g munge -m 0755 "$MUNGE_DIR"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    runuser -u munge -- /usr/sbin/munged --socket="$MUNGE_SOCKET" --pid-file="$MUNGE_PID" \
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" 9>&- \
        || die "munged did not start, see $MUNGE_DIR/munged.log"
    wait_for "$TIMEOUT" "munged" munge_ok || die "munged does not answer, see $MUNGE_DIR/munged.log"
}

slurmd_pid() { echo "$STATE_DIR/run/slurmd-$1.pid"; }
node_state() { sinfo -h -n "$1" -o %T 2>/dev/null | head -n1; }
node_usable() { [[ "$(node_state "$1")" =~ ^(idle|mixed|allocated|completing)$ ]]; }
nodes_ready() {
    local node ready=0
    for node in "${NODES[@]}"; do
        node_usable "$node" && continue
        ready=1
        # A node left drained by an earlier run (e.g. killed daemons) comes back by hand.
        [[ "$(node_state "$node")" =~ ^(drain|down) ]] && scontrol update NodeName="$node" State=RESUME
    done
    return "$ready"
}
any_slurmd_alive() {
    local node
    for node in "${NODES[@]}"; do pid_alive "$(slurmd_pid "$node")" slurmd && return 0; done
    return 1
}

start_daemons() {
    local node
    if ! pid_alive "$CTLD_PID" slurmctld; then
        /usr/sbin/slurmctld -f "$CONF" 9>&- || die "slurmctld did not start, see $STATE_DIR/log/slurmctld.log"
    fi
    wait_for "$TIMEOUT" "slurmctld" scontrol ping \
        || die "slurmctld does not answer, see $STATE_DIR/log/slurmctld.log"
    for node in "${NODES[@]}"; do
        # A second slurmd for the same node kills the running one: start only missing ones.
        if ! pid_alive "$(slurmd_pid "$node")" slurmd; then
            /usr/sbin/slurmd -f "$CONF" -N "$node" 9>&- \
                || die "slurmd for $node did not start, see $STATE_DIR/log/slurmd-$node.log"
        fi
    done
    wait_for "$TIMEOUT" "nodes ${NODES[*]} to become idle" nodes_ready \
        || die "nodes not usable: $(sinfo -h -o '%n=%T' | tr '\n' ' '); see $STATE_DIR/log/"
}

cmd_start() {
    ((EUID == 0)) || die "needs root (slurmd runs jobs as root here)"
    local t0=$SECONDS
    mkdir -p "$STATE_DIR"
    install_packages
    if pid_alive "$CTLD_PID" slurmctld || any_slurmd_alive; then
        log "already running: keeping the existing configuration $CONF"
    else
        write_config
    fi
    start_munged
    start_daemons
    log "up in $((SECONDS - t0))s; use: export SLURM_CONF=$CONF"
}

# stop_daemon PIDFILE COMM: SIGTERM, wait, then SIGKILL; only the pid our pidfile names.
stop_daemon() {
    local pid
    pid_alive "$1" "$2" || { rm -f "$1"; return 0; }
    pid="$(tr -dc '0-9' <"$1")"
    kill -TERM "$pid" 2>/dev/null || true
    local deadline=$((SECONDS + TIMEOUT))
    while proc_is "$pid" "$2"; do
        if ((SECONDS >= deadline)); then
            log "$2 (pid $pid) ignored SIGTERM for ${TIMEOUT}s: killing it"
            kill -KILL "$pid" 2>/dev/null || true
            break
        fi
        sleep 0.2
    done
    rm -f "$1"
}

cmd_stop() {
    if pid_alive "$CTLD_PID" slurmctld && scontrol ping >/dev/null 2>&1; then
        # Jobs of this cluster would outlive slurmd (slurmstepd keeps running): end them first.
        local jobs
        jobs="$(squeue -h -o %i 2>/dev/null | tr '\n' ' ')"
        if [[ -n "${jobs// /}" ]]; then
            # shellcheck disable=SC2086
            scancel $jobs 2>/dev/null || true
            wait_for "$TIMEOUT" "jobs to end" bash -c '[[ -z "$(squeue -h -t R,CG -o %i)" ]]' || true
        fi
    fi
    # Reverse order of start: the node, the controller, then the authentication daemon.
    local pidfile
    for pidfile in "$STATE_DIR"/run/slurmd-*.pid; do
        [[ -e "$pidfile" ]] && stop_daemon "$pidfile" slurmd
    done
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
    [[ -d "$MUNGE_DIR" ]] && ! pid_alive "$MUNGE_PID" munged && rm -rf "$MUNGE_DIR"
    log "stopped"
}

cmd_status() {
    local ok=0 node
    pid_alive "$MUNGE_PID" munged && echo "munged: running" || { echo "munged: stopped"; ok=1; }
    pid_alive "$CTLD_PID" slurmctld && echo "slurmctld: running" || { echo "slurmctld: stopped"; ok=1; }
    for node in "${NODES[@]}"; do
        if pid_alive "$(slurmd_pid "$node")" slurmd; then
            echo "slurmd $node: running"
        else
            echo "slurmd $node: stopped"; ok=1
        fi
    done
    if ((ok == 0)); then
        for node in "${NODES[@]}"; do
            echo "node $node: $(node_state "$node")"
            node_usable "$node" || ok=1
        done
        echo "SLURM_CONF=$CONF"
    fi
    return "$ok"
}

# start and stop of one state directory never interleave (two test sessions, a developer).
# The daemons are started with fd 9 closed: they must not inherit (and hold) the lock.
with_lock() {
    mkdir -p "$STATE_DIR"
    exec 9>"$STATE_DIR/.lock"
    flock -w "$TIMEOUT" 9 || die "another start/stop holds $STATE_DIR/.lock for over ${TIMEOUT}s"
    "$@"
}

case "${1:-}" in
    start) with_lock cmd_start ;;
    stop) with_lock cmd_stop ;;
    status) cmd_status ;;
    env) echo "export SLURM_CONF=$CONF" ;;
    *) echo "usage: $0 start|stop|status|env  (settings: see the header of this file)" >&2; exit 2 ;;
esac
