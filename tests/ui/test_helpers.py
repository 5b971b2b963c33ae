"""The UI's pure helpers: login throttle, progress parsing, charts, pages."""

from datetime import UTC, datetime, timedelta

from markupsafe import Markup

from orchestrator.transports.base import STDERR, STDOUT
from orchestrator.ui import auth, charts, jobs, progress, scripts
from orchestrator.ui.dashboard import day_bars, worker_rates

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class FakeClock:
    """A monotonic clock that tests move by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_limits_user_then_expires() -> None:
    clock = FakeClock()
    throttle = auth.LoginThrottle(clock)
    for _ in range(auth.MAX_FAILURES_PER_USER):
        assert throttle.retry_after("Eve", "10.0.0.1") == 0
        throttle.record_failure("Eve", "10.0.0.1")
    assert throttle.retry_after("eve", "10.0.0.2") > 0
    assert throttle.retry_after("bob", "10.0.0.1") == 0
    clock.now += auth.FAILURE_WINDOW_SECONDS + 1
    assert throttle.retry_after("eve", "10.0.0.1") == 0


def test_throttle_limits_address_across_users() -> None:
    throttle = auth.LoginThrottle(FakeClock())
    for index in range(auth.MAX_FAILURES_PER_ADDRESS):
        throttle.record_failure(f"user{index}", "10.0.0.9")
    assert throttle.retry_after("someone-new", "10.0.0.9") > 0
    assert throttle.retry_after("someone-new", "10.0.0.10") == 0


def test_throttle_success_clears_user_only() -> None:
    throttle = auth.LoginThrottle(FakeClock())
    for _ in range(auth.MAX_FAILURES_PER_USER):
        throttle.record_failure("amy", "10.0.0.3")
    throttle.record_success("amy")
    assert throttle.retry_after("amy", "10.0.0.4") == 0


def test_safe_target_keeps_local_paths() -> None:
    assert auth.safe_target("/jobs?state=failed") == "/jobs?state=failed"
    assert auth.safe_target("//evil.example") == "/dashboard"
    assert auth.safe_target("/\\evil.example") == "/dashboard"
    assert auth.safe_target("https://evil.example/") == "/dashboard"


def test_percent_lines_give_progress_and_eta() -> None:
    tracker = progress.ProgressTracker()
    assert tracker.feed(STDOUT, "working\nprogress=2") is False
    assert tracker.feed(STDOUT, "5%\n") is True
    estimate = tracker.estimate(NOW - timedelta(seconds=30), NOW)
    assert estimate is not None
    assert estimate.fraction == 0.25
    assert estimate.eta_seconds == 90


def test_ffmpeg_lines_give_progress() -> None:
    tracker = progress.ProgressTracker()
    tracker.feed(STDERR, "Input #0, mov\n  Duration: 00:01:40.00, start: 0.0\n")
    tracker.feed(STDOUT, "frame=10\nout_time_us=25000000\nprogress=continue\n")
    assert tracker.fraction == 0.25
    tracker.feed(STDOUT, "out_time=00:00:50.000000\n")
    assert tracker.fraction == 0.5
    tracker.feed(STDOUT, "progress=end\n")
    assert tracker.fraction == 1.0


def test_progress_ignores_other_lines() -> None:
    tracker = progress.ProgressTracker()
    tracker.feed(STDOUT, "progress=continue\nout_time_us=5\nabout 40% done\n")
    assert tracker.fraction is None
    assert tracker.estimate(NOW, NOW) is None
    tracker.feed(STDOUT, "frame 1\rprogress=10%\r\n")
    assert tracker.fraction == 0.1


def test_nice_ceiling_steps() -> None:
    assert [charts.nice_ceiling(n) for n in (0, 1, 3, 7, 11, 180, 999)] == [
        1,
        1,
        5,
        10,
        20,
        200,
        1000,
    ]


def test_charts_escape_names() -> None:
    rates = worker_rates([("<b>w</b>", "succeeded", 3), ("<b>w</b>", "failed", 1)])
    chart = charts.rate_chart(rates)
    assert isinstance(chart, Markup)
    assert "&lt;b&gt;w&lt;/b&gt;" in chart
    assert "75% (3/4)" in chart


def test_day_bars_group_states() -> None:
    rows = [("2026-01-02", "succeeded", 4), ("2026-01-02", "lost", 1)]
    bars = day_bars(["2026-01-01", "2026-01-02"], rows)
    assert bars[0].total == 0
    assert bars[1].counts == {"ok": 4, "bad": 1}
    assert "seg-bad" in charts.day_chart(bars)


def test_page_numbers_mark_gaps() -> None:
    assert jobs.page_numbers(1, 1) == [1]
    assert jobs.page_numbers(5, 10) == [1, None, 4, 5, 6, None, 10]
    assert jobs.page_numbers(2, 3) == [1, 2, 3]


def test_list_query_falls_back_to_defaults() -> None:
    query = jobs.ListQuery.parse(
        {"sort": "command; drop", "per": "7", "page": "-3", "state": "bogus"}
    )
    assert query == jobs.ListQuery()
    assert query.url(page=2) == "/jobs?page=2"
    assert jobs.ListQuery(sort="id", order="desc").sort_url("id").endswith("order=asc")


def test_split_params_one_per_line() -> None:
    assert scripts.split_params("") == []
    assert scripts.split_params("a b\n\nc\n") == ["a b", "", "c"]
