"""The one schema of a run directory: what launch/train.py writes there and every reader expects.

RUN/
    run.lock           held (fcntl.flock) by rank 0 of the training that owns RUN, while it runs
    config.json        the TrainConfig as resolved (rank 0, once every check has passed)
    ds_config.json     the DeepSpeed config as resolved for this world size
    run_info.json      what evaluation and generation need to rebuild the run (RunInfo)
    partition.json     per-rank frozen bytes under ZeRO, peak memory at the end
    metrics.jsonl      one JSON row per logged step (train and eval kinds)
    tensorboard/       event files
    plots/             routing heatmaps
    checkpoints/       step_XXXXXXXX/ and latest (hycam_ds.engine.checkpointing)
    tokenizer/         the run's own copy of its tokenizer
    adapter/           what the run trained, exported at the end
    archive/run-TIME/  earlier runs' files, moved here (never deleted) when RUN was started over

One run per directory. A training takes RUN/run.lock first: a second job on the same directory
is refused at once, naming the holder; a lock left by a process that died (the file is there,
nobody holds the flock) is taken over with a warning. A directory that already holds a run is
refused unless the job continues it (checkpoint.resume=auto or a checkpoint path) or starts it
over (checkpoint.overwrite=true: the previous run's files move to archive/). A resume=auto job
that finds a previous attempt's files but no checkpoint (it died before its first save) archives
them too and starts from step 0, so that metrics and TensorBoard never mix two runs.

run_info.json names what lies inside RUN relative to RUN (tokenizer/, adapter/), everything else
by absolute path: a run directory moved or copied elsewhere still evaluates and generates.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import json
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..modeling.fileio import write_json_atomic

log = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
ARCHIVE = "archive"
RUN_ENTRIES = (
    "config.json",
    "ds_config.json",
    "run_info.json",
    "partition.json",
    "metrics.jsonl",
    "tensorboard",
    "plots",
    "checkpoints",
    "tokenizer",
    "adapter",
)
"""What a training writes into its run directory: the files that make a directory "hold a run",
and what starting it over moves to archive/."""


class RunDirError(ValueError):
    """A run directory that cannot be read or used: the message names the file and what to do."""


@dataclass
class RunInfo:
    data_dir: str
    """The data build the run trained on: relative to the run directory when inside it, else absolute."""
    tokenizer: str
    """The tokenizer the run was given: an absolute directory, a .gguf file, or a hub id as written."""
    method: str = "hycam"
    model: dict[str, Any] = field(default_factory=dict)
    """The run's model section (TrainConfig.model as a dict: path, name, seed, ...)."""
    template: Optional[dict[str, Any]] = None
    """The data build's prompt template entry (name, system_prompt, end_of_turn_id)."""
    trainable_parameters: Optional[int] = None
    total_parameters: Optional[int] = None
    tokenizer_dir: Optional[str] = None
    """The run's own copy of the tokenizer, relative to the run directory ("tokenizer"); absent in
    run directories written before it existed."""
    adapter: Optional[str] = None
    """Where the run exports what it trained, relative to the run directory ("adapter")."""

    def tokenizer_source(self) -> str:
        """What to load the tokenizer from: the run's own copy when there is one, else the reference."""
        if self.tokenizer_dir is not None and Path(self.tokenizer_dir).is_dir():
            return self.tokenizer_dir
        return self.tokenizer


class RunDir:
    """Paths of one run directory, and its JSON files read and written atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.json")
    ds_config = property(lambda self: self.path / "ds_config.json")
    run_info = property(lambda self: self.path / "run_info.json")
    partition = property(lambda self: self.path / "partition.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    tensorboard = property(lambda self: self.path / "tensorboard")
    plots = property(lambda self: self.path / "plots")
    checkpoints = property(lambda self: self.path / "checkpoints")
    tokenizer = property(lambda self: self.path / "tokenizer")
    adapter = property(lambda self: self.path / "adapter")
    lock_file = property(lambda self: self.path / LOCK_FILE)
    archive = property(lambda self: self.path / ARCHIVE)

    # ------------------------------------------------------------------ run_info.json
    def relative(self, path: str | Path) -> str:
        """How run_info.json names `path`: relative to the run directory when inside it, else absolute."""
        absolute = Path(path).absolute()
        try:
            return str(absolute.relative_to(self.path.absolute()))
        except ValueError:
            return str(absolute)

    def resolve(self, recorded: str) -> str:
        """A path as run_info.json records it, made usable from anywhere (relative = inside the run)."""
        return recorded if Path(recorded).is_absolute() else str(self.path.absolute() / recorded)

    def write_info(self, info: RunInfo) -> None:
        write_json_atomic(self.run_info, dataclasses.asdict(info))

    def read_info(self) -> RunInfo:
        """run_info.json with the paths it records inside the run resolved against where the run
        directory is now (older files with absolute paths read as they are)."""
        path = self.run_info
        if not path.is_file():
            raise RunDirError(
                f"{path}: no such file: {self.path} is not a launch/train.py run directory, or its set-up "
                "did not finish; name the backbone, adapter and data explicitly instead (see --help)"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunDirError(f"{path}: unreadable ({err})") from None
        if not isinstance(raw, dict):
            raise RunDirError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        known = {f.name for f in dataclasses.fields(RunInfo)}
        missing = [name for name in ("data_dir", "tokenizer") if name not in raw]
        if missing:
            raise RunDirError(f"{path}: field {missing[0]!r} is missing")
        info = RunInfo(**{k: v for k, v in raw.items() if k in known})
        for name in ("data_dir", "tokenizer_dir", "adapter"):
            value = getattr(info, name)
            if isinstance(value, str) and value:
                setattr(info, name, self.resolve(value))
        return info

    def update_partition(self, **fields: Any) -> None:
        """Merge `fields` into partition.json (rank 0 only)."""
        current = json.loads(self.partition.read_text()) if self.partition.is_file() else {}
        write_json_atomic(self.partition, {**current, **fields})

    def metric_rows(self) -> list[dict]:
        """metrics.jsonl as a list of rows (empty before the first logged step)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]

    # ------------------------------------------------------------------ one run per directory
    def previous_run(self) -> list[str]:
        """The entries of RUN_ENTRIES present: what an earlier training left here."""
        return [name for name in RUN_ENTRIES if (self.path / name).exists() or (self.path / name).is_symlink()]

    def has_checkpoints(self) -> bool:
        """A `latest` pointer or any step_XXXXXXXX directory (complete or not: resume decides)."""
        root = self.checkpoints
        return root.is_dir() and any(p.name == "latest" or p.name.startswith("step_") for p in root.iterdir())

    def describe_previous(self) -> str:
        """What an earlier run left, for messages ("config.json, metrics.jsonl to step 15, ...")."""
        parts = []
        for name in self.previous_run():
            if name == "metrics.jsonl":
                last = _last_step(self.metrics)
                parts.append(f"metrics.jsonl to step {last}" if last is not None else name)
            elif name == "checkpoints":
                pointer = self.checkpoints / "latest"
                latest = pointer.read_text().strip() if pointer.is_file() else None
                parts.append(f"checkpoints (latest {latest})" if latest else "checkpoints/")
            else:
                parts.append(name + ("/" if (self.path / name).is_dir() else ""))
        return ", ".join(parts)

    def archive_previous(self) -> Path:
        """Move every run entry present into archive/run-TIME/ (a rename: cheap, never a copy) and return it."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        destination = self.archive / f"run-{stamp}"
        suffix = 1
        while destination.exists():
            suffix += 1
            destination = self.archive / f"run-{stamp}-{suffix}"
        destination.mkdir(parents=True)
        for name in self.previous_run():
            os.replace(self.path / name, destination / name)
        return destination


def _last_step(metrics: Path) -> Optional[int]:
    """The step of metrics.jsonl's last row, read from its tail (the file grows with the run)."""
    try:
        with open(metrics, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - (1 << 16)))
            lines = [line for line in f.read().decode(errors="replace").splitlines() if line.strip()]
        return int(json.loads(lines[-1])["step"]) if lines else None
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None


# ---------------------------------------------------------------------- the lock
class RunDirBusy(RunDirError):
    """Another live process holds the run directory's lock."""


def _holder_text(holder: Optional[dict]) -> str:
    if not holder:
        return "a process that recorded nothing"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('started', '?')}" + (
        f" ({holder['command']})" if holder.get("command") else ""
    )


class RunLock:
    """The run directory's lock file, held with fcntl.flock for the lifetime of one training.

    The kernel drops a flock when its process dies, whatever the cause, so a file whose flock
    nobody holds was left by a dead process: it is taken over. The holder's pid, host, start time
    and command are written into the file for the message a refused job prints. On release the
    file is removed while still locked; an acquirer checks that the file it locked is still the
    one at the path (else it locked a removed file, and tries again).
    (flock works across the clients of a shared file system on NFS; on Lustre only when it is
    mounted with -o flock.)
    """

    def __init__(self, path: Path, fd: int, stale: Optional[dict]):
        self.path, self._fd, self.stale = path, fd, stale

    @classmethod
    def acquire(cls, path: Path) -> "RunLock":
        """Lock `path` (created if absent) or raise RunDirBusy naming the holder; OSError if it
        cannot be created (a read-only or foreign directory)."""
        for _ in range(20):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise RunDirBusy(
                    f"run_dir {path.parent}: in use by another training ({_holder_text(holder)}; lock file {path}): "
                    "wait for it to end or stop it, or choose another run_dir"
                ) from None
            except OSError as err:
                os.close(fd)
                raise RunDirError(
                    f"{path}: cannot lock ({err.strerror}): this file system does not support flock; "
                    "choose a run_dir on one that does"
                ) from None
            try:
                here, ours = os.stat(path), os.fstat(fd)
                same = (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino)
            except FileNotFoundError:
                same = False
            if same:
                return cls(path, fd, _read_holder(fd))
            os.close(fd)  # the holder released (and removed) it between our open and our flock
        raise RunDirError(f"{path}: could not take the lock (it kept being replaced)")

    def record(self, command: str = "") -> None:
        """Write this process as the holder."""
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": command,
        }
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the file (still locked, so no other process can hold it meanwhile) and unlock."""
        if self._fd is None:
            return
        try:
            here, ours = os.stat(self.path), os.fstat(self._fd)
            if (here.st_dev, here.st_ino) == (ours.st_dev, ours.st_ino):
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None


def _read_holder(fd: int) -> Optional[dict]:
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(raw) if raw else None
    except (OSError, ValueError):
        return {"pid": "?", "host": "?", "started": "?"}


@dataclass
class Claim:
    """Rank 0's hold on a run directory for one training, and what it must do there before writing."""

    layout: RunDir
    lock: RunLock
    archive_reason: Optional[str] = None
    """Why the previous run's files are moved to archive/ at commit (None: nothing to move)."""

    def commit(self) -> Optional[Path]:
        """Once every check has passed, before the first write: archive what must be; returns where."""
        if self.archive_reason is None:
            return None
        destination = self.layout.archive_previous()
        log.warning(
            "run_dir %s: %s: moved the previous run's files to %s", self.layout.path, self.archive_reason, destination
        )
        return destination

    def release(self) -> None:
        self.lock.release()


def claim_run_dir(layout: RunDir, resume: str, overwrite: bool) -> Claim:
    """Rank 0, before anything is written: take RUN/run.lock and decide whether this training may
    use RUN. Raises RunDirError and leaves RUN as it was (validate() refuses overwrite with resume)."""
    path = layout.path
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {path}: is a file, not a directory; choose a directory for the run")
    try:
        path.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(layout.lock_file)
    except RunDirError:
        raise
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if err.errno == errno.ENOTDIR:
            reason = f"{err.filename} is not a directory"
        raise RunDirError(f"run_dir {path}: cannot write there ({reason}); choose a writable directory") from None
    try:
        claim = Claim(layout, lock)
        previous = layout.previous_run()
        if previous:
            if overwrite:
                claim.archive_reason = "checkpoint.overwrite=true"
            elif resume == "auto" and not layout.has_checkpoints():
                claim.archive_reason = (
                    "checkpoint.resume=auto but no checkpoint (the previous attempt ended before its first save): "
                    "starting from step 0"
                )
            elif resume == "none":
                raise RunDirError(
                    f"run_dir {path} already holds a run ({layout.describe_previous()}): continue it with "
                    "checkpoint.resume=auto, start it over with checkpoint.overwrite=true (its files move to "
                    f"{layout.archive}/), or choose another run_dir"
                )
        if lock.stale:
            log.warning(
                "run_dir %s: took over the lock left by %s, which is no longer running", path, _holder_text(lock.stale)
            )
        lock.record(" ".join(os.path.basename(a) if i == 0 else a for i, a in enumerate(sys.argv))[:500])
        return claim
    except BaseException:
        lock.release()
        raise
