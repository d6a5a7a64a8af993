"""Progress output: a redrawn bar on a terminal, plain timestamped lines with rate and ETA elsewhere."""

import io
import re

from data_pipeline.progress import LINES_OVER_A_RUN, progress

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train hycam: (\d+)/160 \(\d+%\) \[[\d:]+<[\d:?]+, [^\]]*step[^\]]*\]$"
)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _run(stream, steps=160, initial=0, **kwargs):
    bar = progress(desc="train hycam", total=steps, initial=initial, unit="step", stream=stream, **kwargs)
    for _ in range(steps - initial):
        bar.update()
        bar.set_postfix(loss=1.25)  # as the trainer does every step: must not add lines
    bar.close()
    return stream.getvalue()


def test_a_batch_job_gets_one_line_per_twentieth_without_carriage_returns():
    out = _run(io.StringIO())
    lines = out.splitlines()
    assert "\r" not in out
    assert all(LINE.match(line) for line in lines), lines
    positions = [int(LINE.match(line).group(1)) for line in lines]
    assert positions == sorted(set(positions)) and positions[0] == 0 and positions[-1] == 160
    assert len(lines) == LINES_OVER_A_RUN + 1  # the start, then every 8 steps
    assert "loss=1.25" in lines[-1] and ("s/step" in lines[-1] or "step/s" in lines[-1])


def test_a_resumed_job_paces_its_lines_over_what_is_left():
    lines = _run(io.StringIO(), initial=120).splitlines()
    assert [int(LINE.match(line).group(1)) for line in lines] == list(range(120, 161, 2))


def test_a_terminal_gets_a_redrawn_bar():
    out = _run(Terminal())
    assert "\r" in out and "160/160" in out


def test_without_a_total_lines_come_by_time_not_by_count():
    stream = io.StringIO()
    bar = progress(desc="read", unit="ex", stream=stream)
    for _ in range(10_000):
        bar.update()
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2 and lines[-1].endswith("]") and "read: 10000" in lines[-1]


def test_disabled_prints_nothing():
    assert _run(io.StringIO(), disable=True) == ""
