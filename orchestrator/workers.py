"""The worker inventory: worker classes and workers."""

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, delete, func, insert, select, update

from orchestrator import models
from orchestrator.exceptions import ConflictError, InvalidInputError, NotFoundError
from orchestrator.timeutil import as_utc, isoformat, utcnow

logger = logging.getLogger(__name__)

DEFAULT_CLASS = "default"
LOCAL_WORKER = "local"
TRANSPORTS = ("ssh", "local", "agent")
DEFAULT_MAX_JOBS = 4


@dataclass
class WorkerRecord:
    """One row of the workers table with its class resolved."""

    id: int
    name: str
    transport: str
    host: str
    port: int
    username: str
    key_path: str | None
    class_id: int
    class_name: str
    max_jobs: int
    max_sessions: int
    enabled: bool
    draining: bool
    state: str
    reason: str | None
    last_seen_at: datetime | None
    host_key: str | None
    # The stored SSH key assigned to this worker, and the default stored key.
    key_id: int | None = None
    default_key_id: int | None = None

    def client_key_id(self) -> int | None:
        """Return the stored key this worker logs in with, or None.

        An assigned key wins, then a key file (key_path), then the default key.
        """
        if self.key_id is not None:
            return self.key_id
        if self.key_path:
            return None
        return self.default_key_id

    def connection_fields(self) -> tuple[Any, ...]:
        """Return the fields whose change requires new connections.

        host_key stays last: the dispatcher compares the others on their own.
        """
        return (
            self.transport,
            self.host,
            self.port,
            self.username,
            self.key_path,
            self.client_key_id(),
            self.max_sessions,
            self.host_key,
        )


def _record(row: Any) -> WorkerRecord:
    max_jobs = row.max_jobs if row.max_jobs is not None else row.default_max_jobs
    return WorkerRecord(
        id=row.id,
        name=row.name,
        transport=row.transport,
        host=row.host,
        port=row.port,
        username=row.username,
        key_path=row.key_path,
        class_id=row.class_id,
        class_name=row.class_name,
        max_jobs=max_jobs,
        max_sessions=row.max_sessions,
        enabled=row.enabled,
        draining=row.draining,
        state=row.state,
        reason=row.reason,
        last_seen_at=as_utc(row.last_seen_at),
        host_key=row.host_key,
        key_id=row.key_id,
        default_key_id=row.default_key_id,
    )


def _worker_select() -> Any:
    w, c, k = models.workers, models.worker_classes, models.ssh_keys
    default_key = (
        select(k.c.id)
        .where(k.c.is_default.is_(True))
        .order_by(k.c.id)
        .limit(1)
        .scalar_subquery()
    )
    return select(
        w,
        c.c.name.label("class_name"),
        c.c.default_max_jobs,
        default_key.label("default_key_id"),
    ).join(c, c.c.id == w.c.class_id)


def list_workers(engine: Engine) -> list[WorkerRecord]:
    """Return every worker ordered by id."""
    with engine.connect() as conn:
        rows = conn.execute(_worker_select().order_by(models.workers.c.id)).all()
    return [_record(row) for row in rows]


def get_worker(engine: Engine, name_or_id: str | int) -> WorkerRecord:
    """Load a worker by name or numeric id."""
    w = models.workers
    query = _worker_select()
    if isinstance(name_or_id, int) or str(name_or_id).isdigit():
        query = query.where((w.c.id == int(name_or_id)) | (w.c.name == str(name_or_id)))
    else:
        query = query.where(w.c.name == name_or_id)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        raise NotFoundError(f"worker {name_or_id!r} not found")
    return _record(row)


def ensure_class(
    conn: Connection, name: str, default_max_jobs: int = DEFAULT_MAX_JOBS
) -> int:
    """Return the id of a worker class, creating it when missing."""
    c = models.worker_classes
    row = conn.execute(select(c.c.id).where(c.c.name == name)).first()
    if row is not None:
        return int(row[0])
    result = conn.execute(
        insert(c).values(
            name=name, default_max_jobs=default_max_jobs, created_at=utcnow()
        )
    )
    return int(result.inserted_primary_key[0])


def list_classes(engine: Engine) -> list[dict[str, Any]]:
    """Return worker classes with their worker counts."""
    c, w = models.worker_classes, models.workers
    with engine.connect() as conn:
        rows = conn.execute(
            select(c, func.count(w.c.id).label("workers"))
            .outerjoin(w, w.c.class_id == c.c.id)
            .group_by(c.c.id)
            .order_by(c.c.id)
        ).all()
    return [
        {
            "id": r.id,
            "name": r.name,
            "default_max_jobs": r.default_max_jobs,
            "workers": r.workers,
        }
        for r in rows
    ]


def resolve_class(engine: Engine, ref: str | int | None) -> tuple[int, str]:
    """Resolve a class given by id or name (None means the default class)."""
    c = models.worker_classes
    with engine.connect() as conn:
        if ref is None or ref == "":
            row = conn.execute(
                select(c.c.id, c.c.name).where(c.c.name == DEFAULT_CLASS)
            ).first()
        elif isinstance(ref, int) or str(ref).isdigit():
            row = conn.execute(
                select(c.c.id, c.c.name).where(c.c.id == int(ref))
            ).first()
        else:
            row = conn.execute(
                select(c.c.id, c.c.name).where(c.c.name == str(ref))
            ).first()
    if row is None:
        raise InvalidInputError(
            f"unknown worker class {ref!r}: use an id or name from GET /api/v1/classes",
            field="workerClassId",
        )
    return int(row.id), str(row.name)


def ensure_defaults(engine: Engine) -> None:
    """Create the default class and the built-in local worker when missing."""
    with engine.begin() as conn:
        class_id = ensure_class(conn, DEFAULT_CLASS)
        exists = conn.execute(
            select(models.workers.c.id).where(models.workers.c.name == LOCAL_WORKER)
        ).first()
        if exists is None and not _has_local_marker(conn):
            now = utcnow()
            conn.execute(
                insert(models.workers).values(
                    name=LOCAL_WORKER,
                    transport="local",
                    host="",
                    port=0,
                    username="",
                    class_id=class_id,
                    max_jobs=None,
                    max_sessions=0,
                    enabled=True,
                    draining=False,
                    state="online",
                    created_at=now,
                    updated_at=now,
                )
            )
            conn.execute(
                insert(models.settings).values(name="local_worker_created", value=True)
            )


def _has_local_marker(conn: Connection) -> bool:
    # The local worker is created once; after "worker remove local" it stays gone.
    row = conn.execute(
        select(models.settings.c.name).where(
            models.settings.c.name == "local_worker_created"
        )
    ).first()
    return row is not None


def add_worker(
    engine: Engine,
    name: str,
    *,
    transport: str = "ssh",
    host: str = "",
    port: int = 22,
    username: str = "",
    key_path: str | None = None,
    class_name: str = DEFAULT_CLASS,
    max_jobs: int | None = None,
    max_sessions: int = 10,
    key_id: int | None = None,
    token_hash: str | None = None,
) -> WorkerRecord:
    """Insert a worker, creating its class when needed.

    ``key_id`` names a stored SSH key; without it and without ``key_path`` the
    worker logs in with the default stored key. ``token_hash`` is the SHA-256
    of an agent worker's token.
    """
    _validate_worker(name, transport, host, port, max_jobs, max_sessions)
    with engine.begin() as conn:
        if conn.execute(
            select(models.workers.c.id).where(models.workers.c.name == name)
        ).first():
            raise ConflictError(f"worker {name!r} already exists", field="name")
        class_id = ensure_class(conn, class_name)
        now = utcnow()
        conn.execute(
            insert(models.workers).values(
                name=name,
                transport=transport,
                host=host,
                port=port,
                username=username,
                key_path=key_path,
                key_id=key_id,
                token_hash=token_hash,
                class_id=class_id,
                max_jobs=max_jobs,
                max_sessions=max_sessions,
                enabled=True,
                draining=False,
                state="offline",
                reason="not checked yet",
                created_at=now,
                updated_at=now,
            )
        )
    logger.info(
        "Added worker %s (%s)", name, transport, extra={"event": "worker_added"}
    )
    return get_worker(engine, name)


def _validate_worker(
    name: str,
    transport: str,
    host: str,
    port: int,
    max_jobs: int | None,
    max_sessions: int,
) -> None:
    if not name or len(name) > 64:
        raise InvalidInputError("name must be 1 to 64 characters", field="name")
    if transport not in TRANSPORTS:
        raise InvalidInputError(
            f"transport must be one of {', '.join(TRANSPORTS)}", field="transport"
        )
    if transport == "ssh" and not host:
        raise InvalidInputError("host is required for an SSH worker", field="host")
    if transport == "ssh" and not 1 <= port <= 65535:
        raise InvalidInputError("port must be between 1 and 65535", field="port")
    if max_jobs is not None and max_jobs < 1:
        raise InvalidInputError("max_jobs must be at least 1", field="max_jobs")
    if transport == "ssh" and max_sessions < 1:
        raise InvalidInputError("max_sessions must be at least 1", field="max_sessions")


def set_enabled(engine: Engine, name: str, enabled: bool) -> None:
    """Enable or disable a worker."""
    _update(engine, name, enabled=enabled, draining=False)


def set_draining(engine: Engine, name: str, draining: bool) -> None:
    """Let a worker finish its running jobs without taking new ones."""
    _update(engine, name, draining=draining)


def update_worker(engine: Engine, name: str, **values: Any) -> None:
    """Change worker fields by name."""
    _update(engine, name, **values)


def _update(engine: Engine, name: str, **values: Any) -> None:
    worker = get_worker(engine, name)
    values["updated_at"] = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(models.workers)
            .where(models.workers.c.id == worker.id)
            .values(**values)
        )


def remove_worker(engine: Engine, name: str) -> None:
    """Delete a worker; finished jobs keep their history without it."""
    worker = get_worker(engine, name)
    j = models.jobs
    with engine.begin() as conn:
        running = conn.execute(
            select(func.count())
            .select_from(j)
            .where(j.c.worker_id == worker.id, j.c.state == "running")
        ).scalar_one()
        if running:
            raise ConflictError(
                f"worker {name!r} runs {running} jobs: "
                "disable it and wait, or kill them"
            )
        conn.execute(update(j).where(j.c.worker_id == worker.id).values(worker_id=None))
        conn.execute(delete(models.workers).where(models.workers.c.id == worker.id))
    logger.info("Removed worker %s", name, extra={"event": "worker_removed"})


def record_state(
    engine: Engine, worker_id: int, state: str, reason: str | None, seen: bool
) -> None:
    """Store a worker's liveness state."""
    values: dict[str, Any] = {"state": state, "reason": reason}
    if seen:
        values["last_seen_at"] = utcnow()
    with engine.begin() as conn:
        conn.execute(
            update(models.workers)
            .where(models.workers.c.id == worker_id)
            .values(**values)
        )


def get_worker_by_token(engine: Engine, token_hash: str) -> WorkerRecord | None:
    """Load the worker whose pull agent authenticates with this token hash."""
    query = _worker_select().where(models.workers.c.token_hash == token_hash)
    with engine.connect() as conn:
        row = conn.execute(query).first()
    return _record(row) if row is not None else None


def set_token_hash(engine: Engine, name: str, token_hash: str) -> None:
    """Replace the token hash of an agent worker."""
    worker = get_worker(engine, name)
    if worker.transport != "agent":
        raise ConflictError(
            f"worker {name!r} uses the {worker.transport} transport: only agent "
            "workers have tokens",
            field="name",
        )
    _update(engine, name, token_hash=token_hash)


def record_host_key(engine: Engine, worker_id: int, host_key: str) -> None:
    """Store the host key a worker presented at first contact."""
    with engine.begin() as conn:
        conn.execute(
            update(models.workers)
            .where(models.workers.c.id == worker_id)
            .values(host_key=host_key)
        )


def public_worker(
    worker: WorkerRecord, state: str, reason: str | None, running: int
) -> dict[str, Any]:
    """Build the JSON form of a worker."""
    return {
        "id": worker.id,
        "name": worker.name,
        "transport": worker.transport,
        "host": worker.host,
        "port": worker.port,
        "user": worker.username,
        "worker_class": worker.class_name,
        "state": state,
        "reason": reason,
        "running": running,
        "max_jobs": worker.max_jobs,
        "max_sessions": worker.max_sessions,
        "enabled": worker.enabled,
        "draining": worker.draining,
        "last_seen_at": isoformat(worker.last_seen_at),
        # The stored SSH key assigned to the worker; None means the default key
        # or the key file.
        "key_id": worker.key_id,
    }


def get_class(engine: Engine, class_id: int) -> dict[str, Any]:
    """Load a worker class by id."""
    c = models.worker_classes
    with engine.connect() as conn:
        row = conn.execute(select(c).where(c.c.id == class_id)).first()
    if row is None:
        raise NotFoundError(f"worker class {class_id} not found")
    return {"id": row.id, "name": row.name, "default_max_jobs": row.default_max_jobs}


def create_class(engine: Engine, name: str, default_max_jobs: int) -> int:
    """Insert a worker class and return its id."""
    _validate_class(name, default_max_jobs)
    c = models.worker_classes
    with engine.begin() as conn:
        if conn.execute(select(c.c.id).where(c.c.name == name)).first():
            raise ConflictError(f"worker class {name!r} already exists", field="name")
        class_id = ensure_class(conn, name, default_max_jobs)
    logger.info("Created worker class %s", name, extra={"event": "class_created"})
    return class_id


def update_class(
    engine: Engine, class_id: int, name: str, default_max_jobs: int
) -> None:
    """Rename a worker class or change its default max jobs.

    Users limited to the class by name keep their access under the new name.
    """
    _validate_class(name, default_max_jobs)
    old = get_class(engine, class_id)
    if old["name"] == DEFAULT_CLASS and name != DEFAULT_CLASS:
        raise ConflictError(
            f"the {DEFAULT_CLASS!r} class takes jobs that name no class, so it "
            "keeps its name",
            field="name",
        )
    c = models.worker_classes
    with engine.begin() as conn:
        taken = conn.execute(
            select(c.c.id).where(c.c.name == name, c.c.id != class_id)
        ).first()
        if taken:
            raise ConflictError(f"worker class {name!r} already exists", field="name")
        conn.execute(
            update(c)
            .where(c.c.id == class_id)
            .values(name=name, default_max_jobs=default_max_jobs)
        )
        if old["name"] != name:
            _rename_allowed_class(conn, old["name"], name)


def delete_class(engine: Engine, class_id: int) -> int:
    """Delete a worker class that no worker and no waiting or running job uses.

    Finished jobs of the class move to the default class, because every job row
    needs a class. Returns how many finished jobs moved.
    """
    old = get_class(engine, class_id)
    if old["name"] == DEFAULT_CLASS:
        raise ConflictError(
            f"the {DEFAULT_CLASS!r} class takes jobs that name no class and "
            "cannot be deleted"
        )
    w, j = models.workers, models.jobs
    with engine.begin() as conn:
        used_by = conn.execute(
            select(func.count()).select_from(w).where(w.c.class_id == class_id)
        ).scalar_one()
        if used_by:
            raise ConflictError(
                f"worker class {old['name']!r} has {used_by} workers: move or "
                "delete them first"
            )
        active = conn.execute(
            select(func.count())
            .select_from(j)
            .where(j.c.class_id == class_id, j.c.state.in_(("waiting", "running")))
        ).scalar_one()
        if active:
            raise ConflictError(
                f"worker class {old['name']!r} has {active} waiting or running "
                "jobs: wait for them or kill them first"
            )
        default_id = ensure_class(conn, DEFAULT_CLASS)
        moved = conn.execute(
            update(j).where(j.c.class_id == class_id).values(class_id=default_id)
        ).rowcount
        conn.execute(
            delete(models.worker_classes).where(models.worker_classes.c.id == class_id)
        )
        _rename_allowed_class(conn, old["name"], None)
    logger.info(
        "Deleted worker class %s", old["name"], extra={"event": "class_deleted"}
    )
    return int(moved or 0)


def _validate_class(name: str, default_max_jobs: int) -> None:
    if not name or len(name) > 64:
        raise InvalidInputError("name must be 1 to 64 characters", field="name")
    if default_max_jobs < 1:
        raise InvalidInputError(
            "default_max_jobs must be at least 1", field="default_max_jobs"
        )


def _rename_allowed_class(conn: Connection, old: str, new: str | None) -> None:
    # allowed_classes is a JSON list of names, so it is rewritten row by row.
    u = models.users
    rows = conn.execute(
        select(u.c.id, u.c.allowed_classes).where(u.c.allowed_classes.is_not(None))
    ).all()
    for row in rows:
        names = list(row.allowed_classes or [])
        if old not in names:
            continue
        names = [n for n in names if n != old]
        if new is not None:
            names.append(new)
        conn.execute(update(u).where(u.c.id == row.id).values(allowed_classes=names))


def change_worker(
    engine: Engine,
    worker_id: int,
    *,
    name: str,
    transport: str,
    host: str,
    port: int,
    username: str,
    key_path: str | None,
    class_id: int,
    max_jobs: int | None,
    max_sessions: int,
) -> None:
    """Validate and store every editable field of a worker.

    A new host or port clears the recorded host key, so the next connection
    records the new host's key on first contact.
    """
    _validate_worker(name, transport, host, port, max_jobs, max_sessions)
    old = get_worker(engine, worker_id)
    w = models.workers
    values: dict[str, Any] = {
        "name": name,
        "transport": transport,
        "host": host,
        "port": port,
        "username": username,
        "key_path": key_path,
        "class_id": class_id,
        "max_jobs": max_jobs,
        "max_sessions": max_sessions,
        "updated_at": utcnow(),
    }
    if (old.host, old.port) != (host, port):
        values.update(host_key=None, pending_host_key=None)
    with engine.begin() as conn:
        if conn.execute(
            select(w.c.id).where(w.c.name == name, w.c.id != worker_id)
        ).first():
            raise ConflictError(f"worker {name!r} already exists", field="name")
        if not conn.execute(
            select(models.worker_classes.c.id).where(
                models.worker_classes.c.id == class_id
            )
        ).first():
            raise InvalidInputError(
                f"worker class {class_id} not found", field="class_id"
            )
        conn.execute(update(w).where(w.c.id == worker_id).values(**values))
    logger.info("Changed worker %s", name, extra={"event": "worker_changed"})


def list_pending_host_keys(engine: Engine) -> dict[int, str]:
    """Return changed host keys that wait for an admin, by worker id."""
    w = models.workers
    with engine.connect() as conn:
        rows = conn.execute(
            select(w.c.id, w.c.pending_host_key).where(
                w.c.pending_host_key.is_not(None)
            )
        ).all()
    return {int(row.id): str(row.pending_host_key) for row in rows}


def get_max_jobs_override(engine: Engine, worker_id: int) -> int | None:
    """Return a worker's own max jobs, or None when its class default applies."""
    w = models.workers
    with engine.connect() as conn:
        row = conn.execute(select(w.c.max_jobs).where(w.c.id == worker_id)).first()
    if row is None:
        raise NotFoundError(f"worker {worker_id} not found")
    return None if row.max_jobs is None else int(row.max_jobs)
