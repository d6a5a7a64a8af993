"""Fault injection for the SLURM tests, loaded by every python started with this folder on
PYTHONPATH. On the rank named by HYCAM_TEST_FAIL_RANK it raises a RuntimeError in the main
thread once training is under way (RUN_DIR/metrics.jsonl has a line), whatever the trainer is.
HYCAM_TEST_FAIL_MODE=hang stops that rank instead (SIGSTOP): it neither exits nor answers."""

import os

_rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID"))
if _rank is not None and _rank == os.environ.get("HYCAM_TEST_FAIL_RANK"):
    import signal
    import threading
    import time

    def _raise(signum, frame):
        raise RuntimeError(f"injected failure on rank {_rank}")

    def _watch():
        marker = os.path.join(os.environ.get("HYCAM_RUN_DIR", "."), "metrics.jsonl")
        deadline = time.monotonic() + float(os.environ.get("HYCAM_TEST_FAIL_AFTER_S", "300"))
        while not (os.path.exists(marker) and os.path.getsize(marker) > 0) and time.monotonic() < deadline:
            time.sleep(0.1)
        if os.environ.get("HYCAM_TEST_FAIL_MODE", "raise") == "hang":
            print(f"injected hang on rank {_rank}", flush=True)
            os.kill(os.getpid(), signal.SIGSTOP)
        else:
            signal.pthread_kill(threading.main_thread().ident, signal.SIGUSR2)

    signal.signal(signal.SIGUSR2, _raise)
    threading.Thread(target=_watch, daemon=True).start()
