"""Job rows: states, transitions and queries."""

import asyncio
import logging
import secrets
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, or_, select, update
from sqlalchemy.exc import IntegrityError

from orchestrator import db, models
from orchestrator.exceptions import ConflictError, NotFoundError
from orchestrator.timeutil import isoformat, utcnow

logger = logging.getLogger(__name__)

WAITING = "waiting"
RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
KILLED = "killed"
TIMED_OUT = "timed_out"
LOST = "lost"
OCCUPIED = "occupied"
STATES = (WAITING, RUNNING, SUCCEEDED, FAILED, KILLED, TIMED_OUT, LOST, OCCUPIED)
FINAL_STATES = frozenset({SUCCEEDED, FAILED, KILLED, TIMED_OUT, LOST, OCCUPIED})
# Rows per insert transaction; a batch holds SQLite's write lock while it runs.
MAX_INSERT_BATCH = 200
SORTABLE = ("id", "state", "created_at", "started_at", "finished_at", "worker_id")
# A job row to insert, with the audit entry written in the same transaction.
NewJob = tuple[dict[str, Any], dict[str, Any] | None]


@dataclass
class JobSpec:
    """The fields the dispatcher needs to place and run one job."""

    id: int
    class_id: int
    command: str | None
    script_id: int | None
    params: list[str]
    watchdog: float | None
    user_id: int | None
    attempt: int = 1
    created_at: datetime = field(default_factory=utcnow)
    run_token: str = field(default_factory=lambda: secrets.token_hex(8))
    retries: int = 0
    retry_delay: float = 0.0
    retry_on: str = "infra"
    # Set when the server restarted while the job ran: the output already stored
    # as (stdout bytes, stderr bytes), so the job is attached to, not started.
    resume_offsets: tuple[int, int] | None = None
    # A worker the next attempt should avoid when another one is free.
    avoid_worker_id: int | None = None
    started_monotonic: float | None = None

    @property
    def run_id(self) -> str:
        """Return the name of this attempt's run folder on the worker."""
        return f"{self.id}-{self.attempt}-{self.run_token}"


def spec_from_row(row: Any) -> JobSpec:
    """Build a JobSpec from a jobs row."""
    return JobSpec(
        id=row.id,
        class_id=row.class_id,
        command=row.command,
        script_id=row.script_id,
        params=list(row.params or []),
        watchdog=row.watchdog,
        user_id=row.user_id,
        attempt=row.attempt,
        run_token=row.run_token or secrets.token_hex(8),
        retries=row.retries,
        retry_delay=row.retry_delay,
        retry_on=row.retry_on,
    )


def mark_retry(engine: Engine, spec: JobSpec, reason: str) -> None:
    """Record that a job waits for its next attempt."""
    with engine.begin() as conn:
        conn.execute(
            update(models.jobs)
            .where(models.jobs.c.id == spec.id)
            .values(
                state=WAITING,
                worker_id=None,
                started_at=None,
                attempt=spec.attempt,
                run_token=spec.run_token,
                reason=reason,
            )
        )


def insert_job(
    engine: Engine, values: dict[str, Any], audit_entry: dict[str, Any] | None = None
) -> int:
    """Insert a job row, and its audit entry in the same transaction."""
    return insert_jobs(engine, [(values, audit_entry)])[0]


def insert_jobs(engine: Engine, items: list[NewJob]) -> list[int]:
    """Insert job rows with their audit entries in one transaction."""
    now = utcnow()
    with engine.begin() as conn:
        job_ids = _insert_returning_ids(conn, [values for values, _ in items])
        entries = [
            dict(audit_entry, target=f"job {job_id}", at=now)
            for (_, audit_entry), job_id in zip(items, job_ids, strict=True)
            if audit_entry is not None
        ]
        for group in _same_keys(entries):
            conn.execute(insert(models.audit_log), group)
    return job_ids


def _insert_returning_ids(conn: Connection, rows: list[dict[str, Any]]) -> list[int]:
    """Insert job rows, as one multi-row statement per set of columns when the
    database returns the new ids in order (SQLite 3.35+, MariaDB 10.5+)."""
    ordered = conn.dialect.insert_executemany_returning_sort_by_parameter_order
    job_ids: list[int] = []
    for group in _same_keys(rows):
        if len(group) > 1 and ordered:
            statement = insert(models.jobs).returning(
                models.jobs.c.id, sort_by_parameter_order=True
            )
            job_ids.extend(int(row[0]) for row in conn.execute(statement, group))
            continue
        for values in group:
            result = conn.execute(insert(models.jobs).values(**values))
            job_ids.append(int(result.inserted_primary_key[0]))
    return job_ids


def _same_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split rows, in order, into runs that set the same columns."""
    groups: list[list[dict[str, Any]]] = []
    for row in rows:
        if groups and groups[-1][0].keys() == row.keys():
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


class JobInserter:
    """Insert the rows of concurrent submissions in shared transactions.

    Rows that arrive while one batch is being written go into the next, so a
    burst costs SQLite one write lock, and MariaDB one commit, per batch rather
    than per job. A single submission waits for no one.
    """

    def __init__(self, engine: Engine):
        self._engine = engine
        self._pending: list[tuple[NewJob, asyncio.Future[int]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def insert(
        self, values: dict[str, Any], audit_entry: dict[str, Any] | None = None
    ) -> int:
        """Insert one job row and return its id."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(((values, audit_entry), future))
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write_batches())
        return await future

    async def _write_batches(self) -> None:
        while self._pending:
            batch = self._pending[:MAX_INSERT_BATCH]
            del self._pending[:MAX_INSERT_BATCH]
            try:
                job_ids = await db.retrying(
                    insert_jobs, self._engine, [item for item, _ in batch]
                )
            except IntegrityError as exc:
                # A repeated idempotency key fails its own row, not the batch.
                if len(batch) == 1:
                    _settle(batch[0][1], exc)
                else:
                    await self._write_one_by_one(batch)
                continue
            except Exception as exc:
                for _, future in batch:
                    _settle(future, exc)
                continue
            for (_, future), job_id in zip(batch, job_ids, strict=True):
                _settle(future, job_id)

    async def _write_one_by_one(
        self, batch: list[tuple[NewJob, asyncio.Future[int]]]
    ) -> None:
        for item, future in batch:
            try:
                job_ids = await db.retrying(insert_jobs, self._engine, [item])
            except Exception as exc:
                _settle(future, exc)
            else:
                _settle(future, job_ids[0])


def _settle(future: asyncio.Future[int], outcome: int | BaseException) -> None:
    # The request behind a future may have been cancelled (client gone).
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def find_by_idempotency_key(
    engine: Engine, user_id: int, key: str
) -> tuple[int, str, tuple[Any, ...]] | None:
    """Return (id, state, request) of the user's job created with this key.

    ``request`` is (command, script_id, params), to tell a repeated request
    from a different one that reuses the key.
    """
    j = models.jobs
    with engine.connect() as conn:
        row = conn.execute(
            select(j.c.id, j.c.state, j.c.command, j.c.script_id, j.c.params).where(
                j.c.user_id == user_id, j.c.idempotency_key == key
            )
        ).first()
    if row is None:
        return None
    return int(row.id), str(row.state), (row.command, row.script_id, row.params)


def mark_running(
    engine: Engine, job_id: int, worker_id: int, run_token: str | None = None
) -> None:
    """Record that a waiting job was placed on a worker."""
    values: dict[str, Any] = {
        "state": RUNNING,
        "worker_id": worker_id,
        "started_at": utcnow(),
    }
    if run_token is not None:
        values["run_token"] = run_token
    with engine.begin() as conn:
        conn.execute(
            update(models.jobs).where(models.jobs.c.id == job_id).values(**values)
        )


def mark_waiting(engine: Engine, job_id: int, reason: str | None) -> None:
    """Put a job back in the queue after it could not start."""
    with engine.begin() as conn:
        conn.execute(
            update(models.jobs)
            .where(models.jobs.c.id == job_id)
            .values(state=WAITING, worker_id=None, started_at=None, reason=reason)
        )


def finish_job(
    engine: Engine,
    job_id: int,
    state: str,
    *,
    exit_code: int | None = None,
    signal: str | None = None,
    reason: str | None = None,
    log_truncated: bool = False,
) -> None:
    """Record a job's final state."""
    assert state in FINAL_STATES, state
    with engine.begin() as conn:
        conn.execute(
            update(models.jobs)
            .where(models.jobs.c.id == job_id)
            .values(
                state=state,
                exit_code=exit_code,
                signal=signal,
                reason=reason,
                finished_at=utcnow(),
                log_truncated=log_truncated,
            )
        )


def get_job_row(engine: Engine, job_id: int) -> Any:
    """Load a job with its worker, class, user and script names."""
    with engine.connect() as conn:
        row = conn.execute(_job_select().where(models.jobs.c.id == job_id)).first()
    if row is None:
        raise NotFoundError(f"job {job_id} not found")
    return row


def _job_select() -> Any:
    j, w, c, u = models.jobs, models.workers, models.worker_classes, models.users
    return (
        select(
            j,
            w.c.name.label("worker_name"),
            c.c.name.label("class_name"),
            u.c.name.label("user_name"),
        )
        .outerjoin(w, w.c.id == j.c.worker_id)
        .outerjoin(c, c.c.id == j.c.class_id)
        .outerjoin(u, u.c.id == j.c.user_id)
    )


def public_job(row: Any) -> dict[str, Any]:
    """Build the JSON form of a job row."""
    return {
        "id": row.id,
        "state": row.state,
        "command": row.command,
        "script_id": row.script_id,
        "params": row.params,
        "worker": row.worker_name,
        "worker_class": row.class_name,
        "user": row.user_name,
        "exit_code": row.exit_code,
        "signal": row.signal,
        "reason": row.reason,
        "watchdog": row.watchdog,
        "need_realtime": row.need_realtime,
        "created_at": isoformat(row.created_at),
        "started_at": isoformat(row.started_at),
        "finished_at": isoformat(row.finished_at),
        "attempt": row.attempt,
        "log_bytes": row.log_bytes,
        "log_truncated": row.log_truncated,
        "restarted_from": row.restarted_from,
        "url": f"/api/v1/jobs/{row.id}",
    }


def list_jobs(
    engine: Engine,
    *,
    limit: int = 50,
    offset: int = 0,
    state: str | None = None,
    user_id: int | None = None,
    search: str | None = None,
    sort: str = "id",
    descending: bool = True,
) -> tuple[list[Any], int]:
    """Return one page of jobs and the total that match the filters."""
    j = models.jobs
    conditions = []
    if state:
        conditions.append(j.c.state == state)
    if user_id is not None:
        conditions.append(j.c.user_id == user_id)
    if search:
        like = f"%{db.escape_like(search)}%"
        search_terms = [
            j.c.command.like(like, escape="\\"),
            models.workers.c.name.like(like, escape="\\"),
            models.users.c.name.like(like, escape="\\"),
            j.c.state == search,
        ]
        if search.isdigit():
            search_terms.append(j.c.id == int(search))
        conditions.append(or_(*search_terms))
    column = j.c[sort] if sort in SORTABLE else j.c.id
    order = column.desc() if descending else column.asc()
    query = _job_select().where(*conditions).order_by(order, j.c.id.desc())
    # Each job joins at most one worker and one user, so the joins change the
    # count only through the search terms, and counting without them is faster.
    counted: Any = j
    if search:
        counted = j.outerjoin(
            models.workers, models.workers.c.id == j.c.worker_id
        ).outerjoin(models.users, models.users.c.id == j.c.user_id)
    count_query = select(func.count()).select_from(counted)

    with engine.connect() as conn:
        rows = conn.execute(query.limit(limit).offset(offset)).all()
        total = conn.execute(count_query.where(*conditions)).scalar_one()
    return list(rows), int(total)


def delete_job(engine: Engine, job_id: int) -> None:
    """Delete a job that has ended, with its output."""
    row = get_job_row(engine, job_id)
    if row.state not in FINAL_STATES:
        raise ConflictError(
            f"job {job_id} is {row.state}: kill it before deleting it", field="id"
        )
    with engine.begin() as conn:
        conn.execute(
            delete(models.job_output).where(models.job_output.c.job_id == job_id)
        )
        conn.execute(delete(models.jobs).where(models.jobs.c.id == job_id))


def load_unfinished(engine: Engine) -> list[Any]:
    """Return jobs that are waiting or running, oldest first."""
    j = models.jobs
    with engine.connect() as conn:
        return list(
            conn.execute(
                select(j).where(j.c.state.in_((WAITING, RUNNING))).order_by(j.c.id)
            ).all()
        )


def count_by_state(engine: Engine) -> dict[str, int]:
    """Return the number of jobs in each state."""
    j = models.jobs
    with engine.connect() as conn:
        rows = conn.execute(select(j.c.state, func.count()).group_by(j.c.state)).all()
    counts = dict.fromkeys(STATES, 0)
    counts.update({state: int(n) for state, n in rows})
    return counts


def jobs_per_day(
    engine: Engine,
    since: datetime,
    user_id: int | None = None,
    until: datetime | None = None,
) -> list[tuple[str, str, int]]:
    """Return (UTC day as YYYY-MM-DD, state, count) for jobs created in a range."""
    j = models.jobs
    # DATE() exists on SQLite, MariaDB/MySQL and PostgreSQL; SQLite returns text
    # and the others a date, so the caller gets str() of either.
    day = func.date(j.c.created_at).label("day")
    conditions = [j.c.created_at >= since]
    if until is not None:
        conditions.append(j.c.created_at < until)
    if user_id is not None:
        conditions.append(j.c.user_id == user_id)
    query = (
        select(day, j.c.state, func.count().label("n"))
        .where(*conditions)
        .group_by(day, j.c.state)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [(str(r.day), r.state, int(r.n)) for r in rows]


def worker_outcomes(
    engine: Engine,
    finished_since: datetime,
    created_since: datetime,
    user_id: int | None = None,
) -> list[tuple[str, str, int]]:
    """Return (worker name, state, count) for jobs that ended since a time.

    ``created_since`` bounds the scan through the created_at index, because
    finished_at has no index; jobs that ran longer than that window are left out.
    """
    j, w = models.jobs, models.workers
    conditions = [
        j.c.created_at >= created_since,
        j.c.finished_at >= finished_since,
        j.c.worker_id.is_not(None),
    ]
    if user_id is not None:
        conditions.append(j.c.user_id == user_id)
    query = (
        select(w.c.name, j.c.state, func.count().label("n"))
        .join(w, w.c.id == j.c.worker_id)
        .where(*conditions)
        .group_by(w.c.name, j.c.state)
    )
    with engine.connect() as conn:
        rows = conn.execute(query).all()
    return [(r.name, r.state, int(r.n)) for r in rows]


def count_by_state_for_user(engine: Engine, user_id: int) -> dict[str, int]:
    """Return the number of one user's jobs in each state."""
    j = models.jobs
    with engine.connect() as conn:
        rows = conn.execute(
            select(j.c.state, func.count())
            .where(j.c.user_id == user_id)
            .group_by(j.c.state)
        ).all()
    counts = dict.fromkeys(STATES, 0)
    counts.update({state: int(n) for state, n in rows})
    return counts


def count_active_by_class(engine: Engine) -> dict[int, int]:
    """Return the number of waiting or running jobs per worker class id."""
    j = models.jobs
    with engine.connect() as conn:
        rows = conn.execute(
            select(j.c.class_id, func.count())
            .where(j.c.state.in_((WAITING, RUNNING)))
            .group_by(j.c.class_id)
        ).all()
    return {int(class_id): int(n) for class_id, n in rows}


def get_job_rows(
    engine: Engine, job_ids: list[int], user_id: int | None = None
) -> list[Any]:
    """Load several jobs by id, limited to one user's jobs when user_id is set."""
    if not job_ids:
        return []
    j = models.jobs
    query = _job_select().where(j.c.id.in_(job_ids))
    if user_id is not None:
        query = query.where(j.c.user_id == user_id)
    with engine.connect() as conn:
        return list(conn.execute(query.order_by(j.c.id)).all())
