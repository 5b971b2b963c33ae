"""Charts drawn on the server as inline SVG; colours come from the stylesheet."""

import math
from dataclasses import dataclass

from markupsafe import Markup, escape

# Outcome groups of the jobs-per-day chart: (css class, label, states).
OUTCOMES = (
    ("ok", "Succeeded", ("succeeded",)),
    ("bad", "Failed, timed out or lost", ("failed", "timed_out", "lost")),
    ("stopped", "Killed or rejected", ("killed", "occupied")),
    ("active", "Waiting or running", ("waiting", "running")),
)
DAY_CHART_WIDTH = 640
DAY_CHART_HEIGHT = 220
RATE_CHART_WIDTH = 480
RATE_ROW_HEIGHT = 30
RATE_LABEL_WIDTH = 130
RATE_TEXT_WIDTH = 120
GOOD_RATE = 0.9
FAIR_RATE = 0.7


@dataclass(frozen=True)
class DayBar:
    """One day's job counts by outcome group."""

    day: str
    counts: dict[str, int]

    @property
    def total(self) -> int:
        """Return the day's job count."""
        return sum(self.counts.values())


@dataclass(frozen=True)
class WorkerRate:
    """Jobs that ended on one worker, and how many of them succeeded."""

    name: str
    succeeded: int
    ended: int

    @property
    def rate(self) -> float:
        """Return the share of succeeded jobs, from 0 to 1."""
        return self.succeeded / self.ended if self.ended else 0.0


def nice_ceiling(value: int) -> int:
    """Round up to 1, 2 or 5 times a power of ten, for an axis maximum."""
    if value <= 1:
        return 1
    power = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if value <= step * power:
            return step * power
    return 10 * power


def day_chart(bars: list[DayBar]) -> Markup:
    """Draw jobs per day as stacked bars, one colour per outcome group."""
    if not any(bar.total for bar in bars):
        return Markup('<p class="empty">No jobs in the last 30 days.</p>')
    left, right, top, bottom = 40, 8, 12, 26
    width = DAY_CHART_WIDTH - left - right
    height = DAY_CHART_HEIGHT - top - bottom
    maximum = nice_ceiling(max(bar.total for bar in bars))
    slot = width / len(bars)

    parts = [_svg_open(DAY_CHART_WIDTH, DAY_CHART_HEIGHT, "Jobs per day", "days")]
    ticks = _tick_count(maximum)
    for tick in range(ticks + 1):
        value = maximum * tick // ticks
        y = top + height - height * tick / ticks
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + width}" '
            f'y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{left - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{value:g}</text>'
        )

    for index, bar in enumerate(bars):
        x = left + index * slot + slot * 0.15
        parts.append(_day_bar(bar, x, slot * 0.7, top + height, height / maximum))
        if index % 5 == 0 or index == len(bars) - 1:
            parts.append(
                f'<text class="axis" x="{x + slot * 0.35:.1f}" '
                f'y="{DAY_CHART_HEIGHT - 8}" text-anchor="middle">'
                f"{escape(bar.day[5:])}</text>"
            )
    parts.append("</svg>")
    return Markup("".join(parts))


def _tick_count(maximum: int) -> int:
    """Return how many steps divide the axis into whole numbers."""
    for count in (4, 5, 2):
        if maximum % count == 0:
            return count
    return 1


def _day_bar(bar: DayBar, x: float, width: float, base: float, scale: float) -> str:
    parts = []
    y = base
    for css, label, _states in OUTCOMES:
        count = bar.counts.get(css, 0)
        if not count:
            continue
        h = count * scale
        y -= h
        title = escape(f"{bar.day}: {count} {label.lower()}")
        parts.append(
            f'<rect class="seg-{css}" x="{x:.1f}" y="{y:.1f}" '
            f'width="{width:.1f}" height="{h:.1f}"><title>{title}</title></rect>'
        )
    return "".join(parts)


def rate_chart(rates: list[WorkerRate]) -> Markup:
    """Draw each worker's success rate as a horizontal bar."""
    if not rates:
        return Markup('<p class="empty">No jobs ended in the last 24 hours.</p>')
    track = RATE_CHART_WIDTH - RATE_LABEL_WIDTH - RATE_TEXT_WIDTH
    height = RATE_ROW_HEIGHT * len(rates) + 8
    parts = [_svg_open(RATE_CHART_WIDTH, height, "Success rate per worker", "rates")]
    for index, item in enumerate(rates):
        y = 4 + index * RATE_ROW_HEIGHT
        fill = track * item.rate
        grade = _grade(item.rate)
        name = escape(item.name)
        summary = escape(f"{item.rate:.0%} ({item.succeeded}/{item.ended})")
        parts.append(
            f'<text class="label" x="{RATE_LABEL_WIDTH - 10}" y="{y + 19}" '
            f'text-anchor="end">{name}</text>'
            f'<rect class="track" x="{RATE_LABEL_WIDTH}" y="{y + 6}" '
            f'width="{track}" height="16" rx="4"/>'
            f'<rect class="rate-{grade}" x="{RATE_LABEL_WIDTH}" y="{y + 6}" '
            f'width="{fill:.1f}" height="16" rx="4">'
            f"<title>{name}: {summary} succeeded</title></rect>"
            f'<text class="value" x="{RATE_LABEL_WIDTH + track + 10}" '
            f'y="{y + 19}">{summary}</text>'
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _grade(rate: float) -> str:
    if rate >= GOOD_RATE:
        return "good"
    if rate >= FAIR_RATE:
        return "fair"
    return "poor"


def _svg_open(width: int, height: int, label: str, kind: str) -> str:
    return (
        f'<svg class="chart-svg {kind}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
    )
