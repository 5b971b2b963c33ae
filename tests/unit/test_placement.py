"""Placement rules of the dispatcher, without workers or a database."""

from pathlib import Path
from typing import Any

from orchestrator import workers
from orchestrator.config import Settings
from orchestrator.dispatch import Dispatcher, WorkerRuntime


def record(
    worker_id: int, class_id: int = 1, max_jobs: int = 2
) -> workers.WorkerRecord:
    return workers.WorkerRecord(
        id=worker_id,
        name=f"w{worker_id}",
        transport="ssh",
        host="h",
        port=22,
        username="u",
        key_path=None,
        class_id=class_id,
        class_name="c",
        max_jobs=max_jobs,
        max_sessions=10,
        enabled=True,
        draining=False,
        state="online",
        reason=None,
        last_seen_at=None,
        host_key=None,
    )


def dispatcher_with(
    strategy: str, runtimes: list[WorkerRuntime], tmp: Path
) -> Dispatcher:
    settings = Settings(strategy=strategy, data_dir=tmp)
    dispatcher = Dispatcher(engine=None, settings=settings)  # type: ignore[arg-type]
    dispatcher.workers = {r.record.id: r for r in runtimes}
    return dispatcher


def online(worker_id: int, **kwargs: Any) -> WorkerRuntime:
    runtime = WorkerRuntime(record(worker_id, **kwargs), transport=None)  # type: ignore[arg-type]
    runtime.state = "online"
    return runtime


def test_round_robin_cycles_workers(tmp_path: Path) -> None:
    dispatcher = dispatcher_with(
        "round_robin", [online(1), online(2), online(3)], tmp_path
    )
    picks = [dispatcher._choose_worker(1).record.id for _ in range(6)]  # type: ignore[union-attr]
    assert picks == [1, 2, 3, 1, 2, 3]


def test_full_worker_is_skipped(tmp_path: Path) -> None:
    busy, idle = online(1, max_jobs=1), online(2, max_jobs=1)
    busy.running.add(99)
    dispatcher = dispatcher_with("round_robin", [busy, idle], tmp_path)
    assert dispatcher._choose_worker(1) is idle
    idle.reserved = 1
    assert dispatcher._choose_worker(1) is None


def test_offline_disabled_draining_skipped(tmp_path: Path) -> None:
    offline, disabled, draining = online(1), online(2), online(3)
    offline.state = "offline"
    disabled.record.enabled = False
    draining.record.draining = True
    dispatcher = dispatcher_with("round_robin", [offline, disabled, draining], tmp_path)
    assert dispatcher._choose_worker(1) is None
    assert draining.public_state() == "draining"
    assert disabled.public_state() == "disabled"


def test_least_loaded_prefers_free_share(tmp_path: Path) -> None:
    small, large = online(1, max_jobs=2), online(2, max_jobs=8)
    small.running.add(1)
    large.running.update({2, 3})
    dispatcher = dispatcher_with("least_loaded", [small, large], tmp_path)
    assert dispatcher._choose_worker(1) is large


def test_class_and_retry_avoidance(tmp_path: Path) -> None:
    first, second, other_class = online(1), online(2), online(3, class_id=2)
    dispatcher = dispatcher_with("random", [first, second, other_class], tmp_path)
    for _ in range(20):
        assert dispatcher._choose_worker(1, avoid=1) is second
        assert dispatcher._choose_worker(2, avoid=3) is other_class
