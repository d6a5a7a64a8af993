"""One rank of the small multi-process checks in test_helpers.py (gloo on CPU, env rendezvous).

python dist_worker.py preflight_ok|preflight_missing|guard_agree
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import torch.distributed as dist

from hycam_ds.engine.distributed import init_timeout, preflight
from hycam_ds.engine.preemption import PreemptionGuard


def main(mode: str) -> int:
    dist.init_process_group("gloo", timeout=init_timeout())
    rank = dist.get_rank()
    if mode == "preflight_ok":
        preflight(timeout_s=30)
        preflight(timeout_s=30)  # a second call uses fresh keys
    elif mode == "preflight_missing":
        if rank == 1:
            time.sleep(6)  # reaches the rendezvous long after rank 0 gave up
            return 0
        try:
            preflight(timeout_s=1.5)
        except RuntimeError as err:
            print(f"PREFLIGHT_ERROR {err}", flush=True)
            return 3
    elif mode == "guard_agree":
        guard = PreemptionGuard()
        stopped_at = None
        for step in range(1, 50):
            time.sleep(0.02 * (rank + 1))  # ranks run at different speeds
            if rank == 1 and step == 5:
                os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is warned
            if guard.should_stop():
                stopped_at = step
                break
        print(json.dumps({"rank": rank, "stopped_at": stopped_at, "preempted": guard.preempted}), flush=True)
        guard.requeue()
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
