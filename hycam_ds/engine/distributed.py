"""Distributed start-up and the few collectives the engine and evaluation use.

Training and evaluation both start with `init_process_group()`, which runs, in this order::

    ensure_env()                                          # a single process without a launcher
    deepspeed.init_distributed(timeout=init_timeout())   # reads RANK, WORLD_SIZE, MASTER_ADDR, ...
    preflight(timeout_s=...)                              # before the model is loaded

`init_timeout()` bounds every collective (torch's default is 30 minutes), so when one rank
dies the others raise instead of hanging; under SLURM `srun --kill-on-bad-exit=1` ends the
whole step as soon as any rank exits non-zero. `preflight()` proves that every rank reached
the rendezvous and that the backend moves data between all of them, and names the ranks that
did not, instead of a bare timeout deep inside the first collective of the model load.
"""

from __future__ import annotations

import contextlib
import datetime
import glob
import logging
import os
import socket
import time
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


class ReportedElsewhere(Exception):
    """This rank stops because of an error another rank reports (rank 0's run-directory checks, a
    checkpoint write that failed there): the entry point exits without printing it again."""


#: Seconds before a collective (and the process group init) gives up; overridable per run.
TIMEOUT_ENV = "HYCAM_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 600.0

_KEY_PREFIX = "hycam_preflight"
_preflight_calls = 0  # each call uses fresh store keys; every rank calls preflight equally often


def init_timeout(default_s: float = DEFAULT_TIMEOUT_S) -> datetime.timedelta:
    """Timeout to pass to `deepspeed.init_distributed(timeout=...)` (and so to every collective).

    Read from the environment variable HYCAM_DIST_TIMEOUT_S when set, else `default_s`.
    """
    raw = os.environ.get(TIMEOUT_ENV)
    seconds = default_s
    if raw is not None and raw != "":
        try:
            seconds = float(raw)
        except ValueError:
            raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {seconds}")
    return datetime.timedelta(seconds=seconds)


#: A torch extension build lock older than this was left by a killed process, not a running build.
STALE_BUILD_LOCK_S = 600.0


def stale_extension_locks(max_age_s: float = STALE_BUILD_LOCK_S) -> list[str]:
    """Build locks of torch C++ extensions (DeepSpeed's ops) left behind by killed processes.

    torch's FileBaton takes a plain lock file while it checks or builds an op (DeepSpeed's CPU
    all-reduce op on every init_distributed here). A process killed while holding it leaves the
    file, and every later job waits for it forever inside init_distributed, with no message.
    """
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    now = time.time()
    stale = []
    for pattern in ("*/lock", "*/*/lock"):
        for path in glob.glob(os.path.join(root, pattern)):
            try:
                if now - os.path.getmtime(path) > max_age_s:
                    stale.append(path)
            except OSError:
                continue
    return sorted(stale)


def warn_stale_extension_locks() -> None:
    """Say which lock file a hanging init_distributed would wait on (called before it)."""
    for path in stale_extension_locks():
        log.warning(
            "%s is older than %.0f s: a process killed while building or loading a DeepSpeed op left it, "
            "and this job will wait for it forever. Remove it if no build is running (rm %s).",
            path,
            STALE_BUILD_LOCK_S,
            path,
        )


def _collective_device() -> torch.device:
    # NCCL only reduces CUDA tensors; gloo (and DeepSpeed's CPU backends) reduce CPU tensors.
    if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _store() -> dist.Store:
    """The key-value store the process group was initialised with (env:// -> TCPStore)."""
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # noqa: BLE001 - private API; fall back to our own client of the same server
        return dist.TCPStore(
            os.environ["MASTER_ADDR"],
            int(os.environ["MASTER_PORT"]),
            is_master=False,
            timeout=datetime.timedelta(seconds=60),
        )


def _rendezvous_name() -> str:
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    return f"{addr}:{port}" if addr and port else "the default store"


def preflight(timeout_s: float) -> None:
    """Check that every rank is reachable: a store key per rank, then an all_reduce.

    Call on every rank, after torch.distributed is initialised and before the model loads.
    Without an initialised process group (a single process) there is nothing to check.
    Raises RuntimeError naming the ranks that did not answer within `timeout_s` seconds.
    """
    global _preflight_calls
    if timeout_s <= 0:
        raise ValueError(f"preflight timeout must be positive, got {timeout_s}")
    if not (dist.is_available() and dist.is_initialized()):
        return
    world, rank = dist.get_world_size(), dist.get_rank()
    if world == 1:
        return
    _preflight_calls += 1
    prefix = f"{_KEY_PREFIX}/{_preflight_calls}"
    deadline = time.monotonic() + timeout_s
    here = f"rank {rank} on {socket.gethostname()}"

    # 1. The store: each rank announces itself; a rank that never arrives is named.
    store = _store()
    store.set(f"{prefix}/rank{rank}", f"{socket.gethostname()}:{os.getpid()}")
    missing = list(range(world))
    while True:
        missing = [r for r in missing if not store.check([f"{prefix}/rank{r}"])]
        if not missing:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"preflight: rank(s) {_ranks(missing)} of world size {world} did not reach the "
                f"rendezvous at {_rendezvous_name()} within {timeout_s:g}s (seen from {here}). "
                "Check that they started and that their node reaches MASTER_ADDR:MASTER_PORT."
            )
        time.sleep(0.05)

    # 2. The backend: a one-hot all_reduce proves data moves between every pair of ranks,
    # which the store alone does not (e.g. a wrong network interface for gloo or NCCL).
    flags = torch.zeros(world, dtype=torch.int32, device=_collective_device())
    flags[rank] = 1
    remaining = max(deadline - time.monotonic(), 1.0)
    try:
        work = dist.all_reduce(flags, async_op=True)
        work.wait(timeout=datetime.timedelta(seconds=remaining))
    except RuntimeError as err:
        raise RuntimeError(
            f"preflight: every rank reached the store, but an all_reduce over backend "
            f"{dist.get_backend()} did not complete within {timeout_s:g}s (seen from {here}): "
            f"{err}"
        ) from err
    absent = [r for r, flag in enumerate(flags.tolist()) if flag != 1]
    if absent:
        raise RuntimeError(
            f"preflight: all_reduce completed without a contribution from rank(s) "
            f"{_ranks(absent)} of world size {world} (seen from {here})"
        )
    if rank == 0:
        log.info("preflight: all %d ranks reachable (%s)", world, _rendezvous_name())


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks)


def ensure_env() -> None:
    """Let an entry point run as a single rank without a launcher (a free local port as rendezvous)."""
    if "RANK" in os.environ or "OMPI_COMM_WORLD_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def release_shm_buffers() -> None:
    """Unlink this rank's /dev/shm buffer of DeepSpeed's CPU all-reduce (never removed by DeepSpeed:
    each run leaked ~70 MB of RAM per rank). Called at exit, and at start for a restart on the same
    address and port (a requeued SLURM job), whose name cannot belong to a live job."""
    env = os.environ
    pattern = (
        "/dev/shm/deepspeed_allreduce_buffer_*"
        f"_{env.get('MASTER_ADDR', '')}_{env.get('MASTER_PORT', '')}_{env.get('RANK', '')}"
    )
    for path in glob.glob(pattern):
        with contextlib.suppress(OSError):
            os.unlink(path)


def init_process_group() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed with a bounded timeout and prove every rank is
    reachable; returns (rank, world size). The one start-up of training and evaluation."""
    import deepspeed

    ensure_env()
    release_shm_buffers()
    warn_stale_extension_locks()
    timeout = init_timeout()
    deepspeed.init_distributed(timeout=timeout)
    preflight(timeout_s=timeout.total_seconds())
    return dist.get_rank(), dist.get_world_size()


def leave_process_group(wait_for_all: bool = False) -> None:
    """End this rank's part of the process group before the interpreter exits. A process that exits
    with it still alive aborts now and then in its C++ teardown ("terminate called without an active
    exception", exit 134), turning a clean exit status into a crash. `wait_for_all` meets every rank
    first (a path every rank reaches); without it nothing waits on another rank, for exits every rank
    agreed on through an earlier collective but may reach at different times. Idempotent."""
    if not initialized():
        return
    release_shm_buffers()
    if wait_for_all:
        dist.barrier()
    dist.destroy_process_group()


@contextlib.contextmanager
def process_group_left_on_exit(agreed: tuple[type[BaseException], ...]):
    """Leave the process group when the block returns or raises one of `agreed` (errors every rank
    raises alike, or hears of from the rank that decided). Any other exception leaves it alone: a
    peer may still be inside a collective with this rank, and tearing down could wait on it."""
    try:
        yield
    except agreed:
        leave_process_group()
        raise
    leave_process_group()


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launcher_rank() -> int:
    """This process's rank, also before the process group exists (from the launcher's environment)."""
    if initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """A summed copy of `tensor` over all ranks, on `tensor`'s device. The reduction itself runs on
    the backend's device (a host tensor goes through the GPU under NCCL, which reduces CUDA only)."""
    if rank_and_world()[1] == 1:
        return tensor.clone()
    reduced = tensor.to(_collective_device(), copy=True)
    dist.all_reduce(reduced)
    return reduced.to(tensor.device)


def all_reduce_max(value: int) -> int:
    """The largest `value` over all ranks."""
    if rank_and_world()[1] == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor[0])


def gather_ints(value: int) -> list[int]:
    """Every rank's `value`, indexed by rank."""
    rank, world = rank_and_world()
    tensor = torch.zeros(world, dtype=torch.int64)
    tensor[rank] = value
    return all_reduce_sum(tensor).tolist()


def gather_to_rank0(value: Any) -> list[Any] | None:
    """Every rank's picklable `value`, indexed by rank, on rank 0; None on the other ranks."""
    rank, world = rank_and_world()
    if world == 1:
        return [value]
    gathered = [None] * world if rank == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered
