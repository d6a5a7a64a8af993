"""What every entry point does with a mistake: one line on stderr naming the file or field, exit 2.

The project's own error types (and OSError: a missing, unreadable or full file system) are a
user's mistake or the machine's state, never a bug: their message is the whole story. Anything
else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from data_pipeline import BuildError
from data_pipeline.examples import one_line
from data_pipeline.pretrained import PretrainedRefError

from ..modeling.adapter_io import AdapterError
from ..modeling.fileio import UnsafeOutputError
from .checkpointing import CheckpointError
from .packaged_backbones import FetchError
from .run_dir import RunDirError
from .train_config import ConfigError

USAGE_ERROR = 2
"""Exit status of a rejected command (argparse uses it too)."""


class UsageError(ValueError):
    """A command line that cannot work (a missing or contradictory option): the message says which."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line (the usage is one --help away)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ConfigError,
    CheckpointError,
    RunDirError,
    AdapterError,
    UnsafeOutputError,
    FetchError,
    BuildError,
    PretrainedRefError,
    OSError,
)


def run_main(prog: str, main: Callable[[], int]) -> int:
    """Runs `main`; a user error becomes `prog: message` on stderr and exit status 2."""
    try:
        return main()
    except USER_ERRORS as err:
        print(f"{prog}: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
