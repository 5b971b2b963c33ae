"""Progress and time left of running jobs, read from their output.

Two kinds of output carry progress:

- any job that prints lines like ``progress=42%`` or ``progress=42.5%``;
- ffmpeg run with ``-progress pipe:1``, which prints ``out_time_us=``,
  ``out_time_ms=`` and ``out_time=`` lines and ``progress=continue|end`` to
  stdout, while its stderr names each input's length as ``Duration: HH:MM:SS.cc``.
"""

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine

from orchestrator import outputs
from orchestrator.timeutil import as_utc
from orchestrator.transports.base import STDERR, STDOUT

PERCENT_LINE = re.compile(r"progress=(\d{1,3}(?:\.\d+)?)\s*%")
DURATION = re.compile(r"Duration: (\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
# ffmpeg writes microseconds to out_time_ms as well as to out_time_us (seen
# with ffmpeg 5.1), so both keys are read as microseconds.
OUT_TIME_US = re.compile(r"out_time_(?:us|ms)=(\d+)")
OUT_TIME = re.compile(r"out_time=(\d+):(\d{2}):(\d{2}(?:\.\d+)?)")
LINE_BREAK = re.compile(r"[\r\n]")
HEAD_BYTES = 64 * 1024
TAIL_BYTES = 32 * 1024
MAX_PARTIAL_CHARS = 4096
# Below this fraction the time left swings too much to be worth showing.
MIN_FRACTION_FOR_ESTIMATE = 0.01


@dataclass(frozen=True)
class Progress:
    """How far a job is, from 0 to 1, and the estimated seconds left."""

    fraction: float
    eta_seconds: float | None

    def public(self) -> dict[str, Any]:
        """Build the JSON form that the pages' scripts read."""
        return {
            "percent": round(self.fraction * 100, 1),
            "eta_seconds": None
            if self.eta_seconds is None
            else round(self.eta_seconds),
        }


class ProgressTracker:
    """Read progress lines from output as it arrives, per stream."""

    def __init__(self) -> None:
        self.duration: float | None = None
        self.fraction: float | None = None
        self._partial = {STDOUT: "", STDERR: ""}

    def feed(self, stream: int, text: str) -> bool:
        """Read the complete lines in ``text``; return whether progress changed."""
        lines = LINE_BREAK.split(self._partial.get(stream, "") + text)
        self._partial[stream] = lines.pop()[-MAX_PARTIAL_CHARS:]
        before = self.fraction
        for line in lines:
            self._read_line(line.strip())
        return self.fraction != before

    def find_duration(self, text: str) -> None:
        """Take the first ffmpeg input duration found in ``text``."""
        if self.duration is None:
            match = DURATION.search(text)
            if match:
                self.duration = _seconds(match) or None

    def _read_line(self, line: str) -> None:
        if not line:
            return
        percent = PERCENT_LINE.fullmatch(line)
        if percent:
            self.fraction = min(float(percent.group(1)) / 100, 1.0)
            return
        if line == "progress=end" and self.fraction is not None:
            self.fraction = 1.0
            return
        if self.duration is None:
            self.find_duration(line)
            return
        micros = OUT_TIME_US.fullmatch(line)
        clock = OUT_TIME.fullmatch(line)
        if micros:
            position = int(micros.group(1)) / 1_000_000
        elif clock:
            position = _seconds(clock)
        else:
            return
        self.fraction = max(0.0, min(position / self.duration, 1.0))

    def estimate(self, started_at: datetime | None, now: datetime) -> Progress | None:
        """Return the progress with the time left, or None when none was seen."""
        if self.fraction is None:
            return None
        started = as_utc(started_at)
        eta = None
        if self.fraction >= 1:
            eta = 0.0
        elif started is not None and self.fraction >= MIN_FRACTION_FOR_ESTIMATE:
            elapsed = max(0.0, (now - started).total_seconds())
            eta = elapsed * (1 - self.fraction) / self.fraction
        return Progress(self.fraction, eta)


def _seconds(match: re.Match[str]) -> float:
    hours, minutes, seconds = match.groups()
    return int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def seed_tracker(engine: Engine, job_id: int) -> ProgressTracker:
    """Start a tracker with the ffmpeg duration from the start of stderr."""
    tracker = ProgressTracker()
    head = outputs.read_head(engine, job_id, STDERR, HEAD_BYTES)
    tracker.find_duration(head.decode(errors="replace"))
    return tracker


def read_progress(
    engine: Engine, job_id: int, started_at: datetime | None, now: datetime
) -> Progress | None:
    """Return a running job's progress from the end of its stored output."""
    tracker = seed_tracker(engine, job_id)
    for stream, data in outputs.read_tail(engine, job_id, TAIL_BYTES):
        tracker.feed(stream, data.decode(errors="replace"))
    return tracker.estimate(started_at, now)
