"""Progress that suits where it is shown: a live tqdm bar in a terminal, log lines in a batch job.

A carriage-return bar redrawn in a file (`slurm-1234.out`, a CI log, `nohup` output) becomes one
very long line of overwritten updates. When the stream is not a terminal, the same tqdm object
prints a plain, timestamped line every `every` updates instead (about 20 lines over a known total;
every 30 s when the total is unknown), each with the position, rate and ETA:

    2026-11-30 18:40:02 train hycam: 40/160 (25%) [09:44<29:12, 14.61s/step, loss=1.6863]

The objects returned are ordinary tqdm instances: callers use update(), set_postfix(), close().
"""

from __future__ import annotations

import math
import sys
import time
from typing import IO, Any, Iterable, Optional

from tqdm import tqdm

LINES_OVER_A_RUN = 20
"""Lines a job with a known total prints (one per 5%): enough to see the rate, few enough to read."""

UNKNOWN_TOTAL_INTERVAL_S = 30.0
"""Without a total there is no 5%: a line every this many seconds."""

LINE_FORMAT = "{desc}: {n_fmt}/{total_fmt} ({percentage:.0f}%) [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
LINE_FORMAT_NO_TOTAL = "{desc}: {n_fmt} [{elapsed}, {rate_fmt}{postfix}]"


class _TimestampedLines:
    """A file for tqdm that turns each redraw ("\\r" + text) into one timestamped line."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last_position = ""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        position = text.split(" [", 1)[0]
        if text and position != self.last_position:  # close() redraws the last position once more
            self.stream.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
            self.stream.flush()
            self.last_position = position

    def flush(self) -> None:
        self.stream.flush()


class _LineBar(tqdm):
    """tqdm whose postfix and description changes wait for the next line instead of redrawing."""

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        super().set_description(desc, refresh=False)


def is_terminal(stream: IO[str]) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(
    iterable: Optional[Iterable] = None,
    *,
    desc: str,
    total: Optional[int] = None,
    unit: str = "it",
    initial: int = 0,
    disable: bool = False,
    every: Optional[int] = None,
    stream: Optional[IO[str]] = None,
    **kwargs: Any,
) -> tqdm:
    """A tqdm bar on a terminal; otherwise a line every `every` updates (default: 1/20 of the total)."""
    stream = sys.stderr if stream is None else stream
    if iterable is not None and total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    common = dict(desc=desc, total=total, unit=unit, initial=initial, disable=disable, **kwargs)
    if is_terminal(stream):
        return tqdm(iterable, file=stream, dynamic_ncols=True, **common)
    for redraw_setting in ("leave", "mininterval", "maxinterval", "miniters", "dynamic_ncols"):
        common.pop(redraw_setting, None)  # the pace of lines is this function's
    if total:
        every = every or max(1, math.ceil((total - initial) / LINES_OVER_A_RUN))
        # miniters given = fixed (tqdm adapts it otherwise); maxinterval inf = its monitor thread
        # never forces a redraw between two lines.
        paced = dict(miniters=every, mininterval=0.0, maxinterval=math.inf, bar_format=LINE_FORMAT)
    elif every:
        paced = dict(miniters=every, mininterval=0.0, maxinterval=math.inf, bar_format=LINE_FORMAT_NO_TOTAL)
    else:
        paced = dict(mininterval=UNKNOWN_TOTAL_INTERVAL_S, maxinterval=math.inf, bar_format=LINE_FORMAT_NO_TOTAL)
    return _LineBar(iterable, file=_TimestampedLines(stream), leave=True, **paced, **common)
