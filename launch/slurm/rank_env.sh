#!/usr/bin/env bash
# Per-task wrapper: maps SLURM's task variables to the torch.distributed rendezvous variables,
# then replaces itself with the command (so signals reach the trainer directly).
#
#   srun --kill-on-bad-exit=1 launch/slurm/rank_env.sh python launch/train.py ...
#
# DeepSpeed's init_distributed() reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
# MASTER_PORT but not SLURM's variables. A value already set (by torchrun, the deepspeed
# launcher, or the user) is kept: this wrapper only fills in what is missing.
#
# Settings (environment variables):
#   MASTER_PORT_BASE  lowest port of the range the rendezvous port is derived from  [20000]
#   MASTER_PORT_SPAN  size of that range                                             [20000]
set -euo pipefail

die() { echo "rank_env: error: $*" >&2; exit 2; }

(($# > 0)) || die "usage: $0 COMMAND [ARGS...]"
[[ -n "${SLURM_PROCID:-}" && -n "${SLURM_NTASKS:-}" ]] \
    || die "SLURM_PROCID/SLURM_NTASKS are not set: run this under srun inside an allocation"

export RANK="${RANK:-$SLURM_PROCID}"
export WORLD_SIZE="${WORLD_SIZE:-$SLURM_NTASKS}"
export LOCAL_RANK="${LOCAL_RANK:-${SLURM_LOCALID:-0}}"
# Tasks on this node, when SLURM says it uniformly ("4" or "4(x2)"); some libraries read it.
if [[ -z "${LOCAL_WORLD_SIZE:-}" && "${SLURM_STEP_TASKS_PER_NODE:-}" =~ ^([0-9]+)(\(x[0-9]+\))?$ ]]; then
    export LOCAL_WORLD_SIZE="${BASH_REMATCH[1]}"
fi

if [[ -z "${MASTER_ADDR:-}" ]]; then
    # Rank 0 runs on the first host of the allocation (block distribution, SLURM's default).
    nodelist="${SLURM_STEP_NODELIST:-${SLURM_JOB_NODELIST:-}}"
    [[ -n "$nodelist" ]] || die "SLURM_JOB_NODELIST is not set and MASTER_ADDR is empty"
    # No "| head -n1": head exits after the first line, scontrol still writing then dies of SIGPIPE,
    # and pipefail makes that the script's exit status (141).
    hosts="$(scontrol show hostnames "$nodelist")" || die "scontrol could not expand the node list '$nodelist'"
    first="${hosts%%$'\n'*}"
    [[ -n "$first" ]] || die "could not expand the node list '$nodelist'"
    MASTER_ADDR="$first"
    if ! getent hosts "$first" >/dev/null 2>&1; then
        # A node name that is not a host name (several slurmd on one machine, or a site that
        # names nodes apart from DNS): use the address SLURM itself reaches the node at.
        # Asked only in that case, so thousands of tasks do not all query the controller.
        addr="$(scontrol show node "$first" -o 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p')"
        [[ -n "$addr" ]] || die "node '$first' does not resolve and SLURM gives no NodeAddr for it"
        MASTER_ADDR="$addr"
    fi
    export MASTER_ADDR
fi

if [[ -z "${MASTER_PORT:-}" ]]; then
    # Derived from the job id: every task computes the same port without talking to the others,
    # two jobs sharing a node get different ports, and a requeued job (same id) keeps its port.
    base="${MASTER_PORT_BASE:-20000}"
    span="${MASTER_PORT_SPAN:-20000}"
    [[ "$base" =~ ^[0-9]+$ && "$span" =~ ^[1-9][0-9]*$ ]] || die "MASTER_PORT_BASE/SPAN must be integers"
    ((base + span <= 65536)) || die "MASTER_PORT_BASE + MASTER_PORT_SPAN exceeds 65536"
    export MASTER_PORT="$((base + ${SLURM_JOB_ID:-0} % span))"
fi

exec "$@"
