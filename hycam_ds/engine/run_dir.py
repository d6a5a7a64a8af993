"""The one schema of a run directory: what launch/train.py writes there and every reader expects.

RUN/
    config.json        the TrainConfig as resolved (rank 0, before anything is loaded)
    ds_config.json     the DeepSpeed config as resolved for this world size
    run_info.json      what evaluation and generation need to rebuild the run (RunInfo)
    partition.json     per-rank frozen bytes under ZeRO, peak memory at the end
    metrics.jsonl      one JSON row per logged step (train and eval kinds)
    tensorboard/       event files
    plots/             routing heatmaps
    checkpoints/       step_XXXXXXXX/ and latest (hycam_ds.engine.checkpointing)
    adapter/           what the run trained, exported at the end
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..modeling.fileio import write_json_atomic


class RunDirError(ValueError):
    """A run directory that cannot be read: the message names the file and field."""


@dataclass
class RunInfo:
    data_dir: str
    """Absolute path of the data build the run trained on."""
    tokenizer: str
    """The tokenizer: an absolute directory, a .gguf file, or a hub id as written."""
    method: str = "hycam"
    model: dict[str, Any] = field(default_factory=dict)
    """The run's model section (TrainConfig.model as a dict: path, name, seed, ...)."""
    template: Optional[dict[str, Any]] = None
    """The data build's prompt template entry (name, system_prompt, end_of_turn_id)."""
    trainable_parameters: Optional[int] = None
    total_parameters: Optional[int] = None


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
    adapter = property(lambda self: self.path / "adapter")

    def write_info(self, info: RunInfo) -> None:
        write_json_atomic(self.run_info, dataclasses.asdict(info))

    def read_info(self) -> RunInfo:
        path = self.run_info
        if not path.is_file():
            raise RunDirError(
                f"{path}: no such file: {self.path} is not a launch/train.py run directory, "
                "or its set-up did not finish"
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
        return RunInfo(**{k: v for k, v in raw.items() if k in known})

    def update_partition(self, **fields: Any) -> None:
        """Merge `fields` into partition.json (rank 0 only)."""
        current = json.loads(self.partition.read_text()) if self.partition.is_file() else {}
        write_json_atomic(self.partition, {**current, **fields})

    def metric_rows(self) -> list[dict]:
        """metrics.jsonl as a list of rows (empty before the first logged step)."""
        if not self.metrics.is_file():
            return []
        return [json.loads(line) for line in self.metrics.read_text().splitlines() if line.strip()]
