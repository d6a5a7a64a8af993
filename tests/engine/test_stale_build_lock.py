"""A build lock left by a killed process is named before init_distributed would wait on it forever."""

import logging
import os
import time

from hycam_ds.engine.distributed import STALE_BUILD_LOCK_S, stale_extension_locks, warn_stale_extension_locks


def test_old_extension_lock_is_reported_and_a_fresh_one_is_not(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    stale = tmp_path / "deepspeed_shm_comm" / "lock"
    fresh = tmp_path / "py311_cpu" / "fused_adam" / "lock"
    for path in (stale, fresh):
        path.parent.mkdir(parents=True)
        path.touch()
    old = time.time() - STALE_BUILD_LOCK_S - 60
    os.utime(stale, (old, old))

    assert stale_extension_locks() == [str(stale)]
    with caplog.at_level(logging.WARNING, logger="hycam_ds.engine.distributed"):
        warn_stale_extension_locks()
    assert str(stale) in caplog.text and "forever" in caplog.text
    assert str(fresh) not in caplog.text
