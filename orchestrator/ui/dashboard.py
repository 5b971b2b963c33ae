"""The dashboard: job counts, jobs per day, success per worker, worker states."""

import asyncio
import time
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request, Response
from sqlalchemy import Engine

from orchestrator import jobs
from orchestrator.api import deps
from orchestrator.timeutil import utcnow
from orchestrator.ui import charts, common

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

DAYS = 30
RATE_HOURS = 24
# Success rates leave out jobs that ran longer than this, so the query can use
# the created_at index instead of scanning every job.
RATE_SCAN_DAYS = 7
# Killed jobs were stopped by a user, so they count for no worker either way.
RATE_STATES = ("succeeded", "failed", "timed_out", "lost")
WORKER_STATES = ("online", "draining", "offline", "disabled")
# Counts of days before today change only when old jobs end or are deleted, so
# they are cached this long. Today's counts are read on every load. On SQLite
# with 500,000 jobs in the window, the uncached query took about 2 s (2 CPUs).
PAST_DAYS_CACHE_SECONDS = 300


@router.get("/dashboard")
async def dashboard(
    request: Request,
    user: common.PageUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
) -> Response:
    """Show job counts and charts, and which workers are up."""
    own = None if user.is_admin else user.id
    cache = request.app.state.dashboard_cache
    counts, bars, rates = await asyncio.to_thread(
        _load_stats, engine, own, utcnow(), cache
    )
    worker_view = dispatcher.worker_view()
    by_state = Counter(state for _, state, _, _ in worker_view)
    context = {
        "title": "Dashboard",
        "counts": counts,
        "total": sum(counts.values()),
        "day_chart": charts.day_chart(bars),
        "rate_chart": charts.rate_chart(rates),
        "outcomes": charts.OUTCOMES,
        "workers": worker_view,
        "worker_counts": [(s, by_state.get(s, 0)) for s in WORKER_STATES],
        "own_jobs": own is not None,
        "days": DAYS,
    }
    return common.render(request, "dashboard.html", context)


def _load_stats(
    engine: Engine,
    user_id: int | None,
    now: datetime,
    cache: dict[Any, Any] | None = None,
) -> tuple[dict[str, int], list[charts.DayBar], list[charts.WorkerRate]]:
    if user_id is None:
        counts = jobs.count_by_state(engine)
    else:
        counts = jobs.count_by_state_for_user(engine, user_id)
    first_day = (now - timedelta(days=DAYS - 1)).date()
    per_day = _per_day(engine, user_id, now, cache if cache is not None else {})
    outcomes = jobs.worker_outcomes(
        engine,
        now - timedelta(hours=RATE_HOURS),
        now - timedelta(days=RATE_SCAN_DAYS),
        user_id,
    )
    days = [str(first_day + timedelta(days=n)) for n in range(DAYS)]
    return counts, day_bars(days, per_day), worker_rates(outcomes)


def _per_day(
    engine: Engine, user_id: int | None, now: datetime, cache: dict[Any, Any]
) -> list[tuple[str, str, int]]:
    first_day = (now - timedelta(days=DAYS - 1)).date()
    since = datetime.combine(first_day, datetime.min.time(), tzinfo=now.tzinfo)
    today = datetime.combine(now.date(), datetime.min.time(), tzinfo=now.tzinfo)
    key = (user_id, first_day)
    cached = cache.get(key)
    if cached is None or cached[0] < time.monotonic():
        past = jobs.jobs_per_day(engine, since, user_id, until=today)
        # Entries of earlier windows are dropped as the days move on.
        for old in [k for k in cache if k[1] != first_day]:
            cache.pop(old, None)
        cache[key] = cached = (time.monotonic() + PAST_DAYS_CACHE_SECONDS, past)
    return cached[1] + jobs.jobs_per_day(engine, today, user_id)


def day_bars(days: list[str], rows: list[tuple[str, str, int]]) -> list[charts.DayBar]:
    """Group (day, state, count) rows into one bar per day."""
    group_of = {
        state: css for css, _label, states in charts.OUTCOMES for state in states
    }
    counts: dict[str, Counter[str]] = {day: Counter() for day in days}
    for day, state, count in rows:
        # MariaDB returns a date and SQLite a string; both print as YYYY-MM-DD.
        key = day[:10]
        if key in counts:
            counts[key][group_of.get(state, "active")] += count
    return [charts.DayBar(day, dict(counts[day])) for day in days]


def worker_rates(rows: list[tuple[str, str, int]]) -> list[charts.WorkerRate]:
    """Turn (worker, state, count) rows into success rates, by worker name."""
    ended: Counter[str] = Counter()
    succeeded: Counter[str] = Counter()
    for name, state, count in rows:
        if state in RATE_STATES:
            ended[name] += count
        if state == jobs.SUCCEEDED:
            succeeded[name] += count
    return [
        charts.WorkerRate(name, succeeded[name], ended[name])
        for name in sorted(ended)
        if ended[name]
    ]
