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
#   LOCAL_SLURM_CPUS        CPUs advertised by the node (may exceed the cores) [cores of this machine]
#   LOCAL_SLURM_GPUS        fake GPUs (gres) so GPU-style scripts run on CPU  [2]
#   LOCAL_SLURM_CTLD_PORT   slurmctld port                                     [6817]
#   LOCAL_SLURM_SLURMD_PORT slurmd port                                        [6818]
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
NODE=localhost

CONF="$STATE_DIR/slurm.conf"
# munged runs as the munge user, which cannot enter a private (0700) state directory such
# as pytest's, and a socket path must stay under ~100 characters: keep its files in /run,
# named after the state directory so that two clusters never share them.
MUNGE_DIR="${LOCAL_SLURM_MUNGE_DIR:-/run/hycam-ds-munge-$(printf %s "$STATE_DIR" | cksum | cut -d' ' -f1)}"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket"
MUNGE_PID="$MUNGE_DIR/munged.pid"
CTLD_PID="$STATE_DIR/run/slurmctld.pid"
SLURMD_PID="$STATE_DIR/run/slurmd.pid"

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

check_int() {  # name value: settings are checked before anything is started
    [[ "$2" =~ ^[0-9]+$ ]] || die "$1 must be a non-negative integer, got '$2'"
}
check_int LOCAL_SLURM_GPUS "$GPUS"
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
    local hw_cpus cpus gres_line="" i
    # slurmd -C reports what slurmd will detect; advertising more than the hardware would
    # drain the node unless SlurmdParameters=config_overrides (set below) is present.
    hw_cpus="$(slurmd -C 2>/dev/null | sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' | head -n1)"
    cpus="${LOCAL_SLURM_CPUS:-${hw_cpus:-$(nproc)}}"
    mkdir -p "$STATE_DIR"/{state,spool,run,log,gpus}
    : >"$STATE_DIR/gres.conf"
    if ((GPUS > 0)); then
        # Fake GPUs: empty files named as devices let `--gres=gpu:N` jobs be scheduled on CPU.
        for ((i = 0; i < GPUS; i++)); do : >"$STATE_DIR/gpus/fakegpu$i"; done
        gres_line="Gres=gpu:$GPUS"
        {
            echo "AutoDetect=off"
            echo "NodeName=$NODE Name=gpu File=$STATE_DIR/gpus/fakegpu[0-$((GPUS - 1))]"
        } >"$STATE_DIR/gres.conf"
    fi
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
SlurmdSpoolDir=$STATE_DIR/spool
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$STATE_DIR/log/slurmctld.log
SlurmdLogFile=$STATE_DIR/log/slurmd.log
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus $gres_line State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
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
        --log-file="$MUNGE_DIR/munged.log" --seed-file="$MUNGE_DIR/munged.seed" \
        || die "munged did not start, see $MUNGE_DIR/munged.log"
    wait_for "$TIMEOUT" "munged" munge_ok || die "munged does not answer, see $MUNGE_DIR/munged.log"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1; }
node_usable() { [[ "$(node_state)" =~ ^(idle|mixed|allocated|completing)$ ]]; }
node_ready() {
    node_usable && return 0
    # A node left drained by an earlier run (e.g. killed daemons) comes back by hand.
    [[ "$(node_state)" =~ ^(drain|down) ]] && scontrol update NodeName="$NODE" State=RESUME
    return 1
}

start_daemons() {
    if ! pid_alive "$CTLD_PID" slurmctld; then
        /usr/sbin/slurmctld -f "$CONF" || die "slurmctld did not start, see $STATE_DIR/log/slurmctld.log"
    fi
    wait_for "$TIMEOUT" "slurmctld" scontrol ping \
        || die "slurmctld does not answer, see $STATE_DIR/log/slurmctld.log"
    # A second slurmd kills the running one: only start it when ours is not alive.
    if ! pid_alive "$SLURMD_PID" slurmd; then
        /usr/sbin/slurmd -f "$CONF" -N "$NODE" || die "slurmd did not start, see $STATE_DIR/log/slurmd.log"
    fi
    wait_for "$TIMEOUT" "node $NODE to become idle" node_ready \
        || die "node $NODE is '$(node_state)', see $STATE_DIR/log/slurmd.log and $STATE_DIR/log/slurmctld.log"
}

cmd_start() {
    ((EUID == 0)) || die "needs root (slurmd runs jobs as root here)"
    local t0=$SECONDS
    mkdir -p "$STATE_DIR"
    install_packages
    if pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; then
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
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    stop_daemon "$MUNGE_PID" munged
    [[ -d "$MUNGE_DIR" ]] && ! pid_alive "$MUNGE_PID" munged && rm -rf "$MUNGE_DIR"
    log "stopped"
}

cmd_status() {
    local ok=0
    pid_alive "$MUNGE_PID" munged && echo "munged: running" || { echo "munged: stopped"; ok=1; }
    pid_alive "$CTLD_PID" slurmctld && echo "slurmctld: running" || { echo "slurmctld: stopped"; ok=1; }
    pid_alive "$SLURMD_PID" slurmd && echo "slurmd: running" || { echo "slurmd: stopped"; ok=1; }
    if ((ok == 0)); then
        echo "node $NODE: $(node_state)"
        node_usable || ok=1
        echo "SLURM_CONF=$CONF"
    fi
    return "$ok"
}

# start and stop of one state directory never interleave (two test sessions, a developer).
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
