"""Stop every rank at the same step when the cluster warns of preemption, then requeue.

SLURM sends a warning signal before it ends a job (`#SBATCH --signal=B:USR1@300` in
launch/slurm/train.sbatch, forwarded to every rank). The signal reaches ranks at different
moments, so a rank must not act on it alone: the handler only sets a flag and
`should_stop()`, called by every rank once per step at the same point, reduces the flags
with MAX so all ranks see the same answer at the same step. The trainer then writes a
checkpoint on all ranks, calls `requeue()`, and exits 0; the requeued job starts the same
command with `checkpoint.resume=auto`.

SIGTERM also stops training at the next step with a checkpoint, but does not requeue:
it is what `scancel` sends (a user who cancels a job must not see it come back), and a
preemption with PreemptMode=REQUEUE is requeued by SLURM itself.

SIGINT (Ctrl-C) stops the same way, and `interrupted` tells the trainer so (launch/train.py then
exits 4, naming the checkpoint and the command that resumes). A second SIGINT aborts at once
(exit 130, no checkpoint). Only SIGINT counts as the second one: on Ctrl-C in a terminal the
deepspeed launcher (launcher/launch.py) also sends every rank SIGTERM, and SIGKILL 30 s later.

    guard = PreemptionGuard()
    for step in ...:
        train_step()
        if guard.should_stop():
            save_checkpoint(); guard.requeue(); return 0
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

from .distributed import launcher_rank, rank_and_world

log = logging.getLogger(__name__)

DEFAULT_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
DEFAULT_REQUEUE_SIGNALS = (signal.SIGUSR1,)
ABORT_STATUS = 130
"""Exit status of a second Ctrl-C: 128 + SIGINT, as a shell reports a process ended by it."""


class PreemptionGuard:
    """Turns a warning signal into a job-wide decision to stop, checkpoint and requeue.

    Args:
        signals: signals that mean "stop soon" (default SIGUSR1, SIGTERM and SIGINT).
        requeue_signals: those of `signals` after which the job is requeued (default SIGUSR1,
            the warning of an upcoming time limit or preemption); the others only stop.
        requeue_timeout_s: how long `scontrol requeue` may take before it is given up.
    """

    def __init__(
        self, signals=DEFAULT_SIGNALS, requeue_signals=DEFAULT_REQUEUE_SIGNALS, requeue_timeout_s: float = 60.0
    ):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be created in the main thread (signal handlers)")
        self._received: int | None = None  # set by the handler, read by should_stop()
        self._requeue_signals = frozenset(int(s) for s in requeue_signals)
        self._wants_requeue_local = False  # set by the handler for a requeue signal
        self._wants_requeue = False  # the job-wide decision, from should_stop()
        self._sigints = 0  # Ctrl-Cs this process received
        self._interrupted = False  # the job-wide decision: some rank received SIGINT
        self._stop = False
        self._checks = 0  # should_stop() calls: equal on all ranks at the same step
        self._requeue_timeout_s = requeue_timeout_s
        self._previous = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame):  # noqa: ARG002
        # Only flags: the step in progress must finish, and ranks agree in should_stop().
        if signum == signal.SIGINT:
            self._sigints += 1
            if self._sigints > 1:
                self._abort()
            self._say("Ctrl-C: stopping after this step with a checkpoint (press Ctrl-C again to abort without one)")
        self._received = signum
        if signum in self._requeue_signals:
            self._wants_requeue_local = True

    @staticmethod
    def _say(text: str) -> None:
        # os.write, not print: a handler may run while the main thread is inside a print of its own.
        if launcher_rank() == 0:
            os.write(2, f"train.py: {text}\n".encode())

    def _abort(self) -> None:
        self._say(
            "second Ctrl-C: aborted without a checkpoint; checkpoint.resume=auto continues from the last one saved"
        )
        os._exit(ABORT_STATUS)  # at once: no collective, no cleanup that could wait on another rank

    @property
    def signal_received(self) -> int | None:
        """The last warning signal this process received, or None."""
        return self._received

    @property
    def preempted(self) -> bool:
        """True once `should_stop()` has returned True (the same on every rank)."""
        return self._stop

    @property
    def interrupted(self) -> bool:
        """True when the decided stop came from a Ctrl-C (SIGINT) on some rank."""
        return self._interrupted

    @property
    def requeue_requested(self) -> bool:
        """True when the decided stop came from a requeue signal (SIGUSR1) on some rank."""
        return self._wants_requeue

    def should_stop(self) -> bool:
        """Collective: True on every rank if any rank has received one of the signals.

        Call once per step on every rank at the same point. Without torch.distributed
        (one process) it only looks at the local flag. Once True it stays True.
        """
        local = self._received is not None
        self._checks += 1
        flags = [int(local), int(self._wants_requeue_local), int(self._sigints > 0)]
        if rank_and_world()[1] > 1:
            device = torch.device("cpu")
            if "nccl" in str(dist.get_backend()).lower() and torch.cuda.is_available():
                device = torch.device("cuda", torch.cuda.current_device())
            tensor = torch.tensor(flags, dtype=torch.int32, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flags = tensor.tolist()
        decided = bool(flags[0])
        if decided and not self._stop:
            cause = signal.Signals(self._received).name if local else "a signal on another rank"
            log.warning(
                "rank %d: preemption warning (%s): stopping at step check %d of this process",
                launcher_rank(),
                cause,
                self._checks,
            )
        self._stop = self._stop or decided
        self._wants_requeue = self._wants_requeue or bool(flags[1])
        self._interrupted = self._interrupted or bool(flags[2])
        return self._stop

    def requeue(self) -> None:
        """Ask SLURM to requeue this job (rank 0 only; other ranks return at once).

        Call after the checkpoint is complete. It requeues only when `should_stop()` was
        decided by a requeue signal (SIGUSR1) on some rank: after SIGTERM alone (`scancel`,
        a preemption SLURM requeues itself) it only logs. Outside SLURM (no SLURM_JOB_ID)
        it logs that the run must be restarted with `checkpoint.resume=auto`. A failure of
        `scontrol` is logged as an error, not raised: the checkpoint is already safe.
        """
        if launcher_rank() != 0:
            return
        if not self._wants_requeue:
            log.info(
                "stopped without a requeue signal (%s): not requeued",
                "SIGTERM: cancelled, or preempted by SLURM" if self._stop else "no signal",
            )
            return
        job_id = os.environ.get("SLURM_JOB_ID")
        if not job_id:
            log.info(
                "not running under SLURM (SLURM_JOB_ID unset): no requeue; "
                "restart with checkpoint.resume=auto to continue"
            )
            return
        cmd = ["scontrol", "requeue", job_id]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=self._requeue_timeout_s)
        except (OSError, subprocess.TimeoutExpired) as err:
            log.error("requeue of SLURM job %s failed: %s", job_id, err)
            return
        if done.returncode != 0:
            log.error(
                "requeue of SLURM job %s failed (exit %d): %s",
                job_id,
                done.returncode,
                (done.stderr or done.stdout).strip(),
            )
            return
        # The job's processes are ended by SLURM from here on: the log line may be the last.
        log.warning("requeued SLURM job %s: it resumes from the latest checkpoint", job_id)

    def close(self) -> None:
        """Restore the signal handlers that were installed before this guard."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> "PreemptionGuard":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
