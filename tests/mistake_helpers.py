"""Helpers of the user-mistake batteries: run an entry point as a user would, and prove that a
refused command changed nothing on disk."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def tree_digest(*roots) -> dict[str, str]:
    """sha256 of every file below `roots` (a file root counts as itself), keyed by path."""
    digest = {}
    for root in map(Path, roots):
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in files:
            digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def run_entry(args, timeout=300, env=None, stdin=None) -> subprocess.CompletedProcess:
    """`python <args>` from the repository, as a user types it (one process)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def refused(proc: subprocess.CompletedProcess, *words: str, status: int = 2) -> bool:
    """The command exited with `status` and said so in exactly one line of its own naming `words`
    (library warnings printed before it do not count as its message)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    own = [line for line in lines if "Traceback" in line or not _is_library_noise(line)]
    message = own[-1] if own else ""
    return (
        proc.returncode == status
        and "Traceback" not in proc.stderr
        and len(own) == 1
        and all(word.lower() in message.lower() for word in words)
    )


def _is_library_noise(line: str) -> bool:
    """Lines that DeepSpeed, transformers or torch log on import, not the command's own output."""
    return any(
        marker in line
        for marker in ("[WARNING]", "[INFO]", "real_accelerator.py", "UserWarning", "warnings.warn", "FutureWarning")
    )
