"""Stored scripts that jobs run with separate parameters."""

from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, delete, func, insert, select, update

from orchestrator import models
from orchestrator.exceptions import ConflictError, InvalidInputError, NotFoundError
from orchestrator.timeutil import isoformat, utcnow

MAX_SCRIPT_BYTES = 1 << 20


@dataclass(frozen=True)
class Script:
    """A stored script."""

    id: int
    name: str
    interpreter: str
    body: str
    retries: int = 0
    retry_delay: float = 0.0
    retry_on: str = "infra"

    def public(self, with_body: bool = True) -> dict[str, Any]:
        """Build the JSON form of the script."""
        data: dict[str, Any] = {
            "id": self.id,
            "name": self.name,
            "interpreter": self.interpreter,
        }
        if with_body:
            data["body"] = self.body
        return data


def add_script(engine: Engine, name: str, interpreter: str, body: str) -> Script:
    """Store a new script."""
    _validate_script(name, interpreter, body)
    now = utcnow()
    with engine.begin() as conn:
        exists = conn.execute(
            select(models.scripts.c.id).where(models.scripts.c.name == name)
        ).first()
        if exists:
            raise ConflictError(f"script {name!r} already exists", field="name")
        result = conn.execute(
            insert(models.scripts).values(
                name=name,
                interpreter=interpreter,
                body=body,
                created_at=now,
                updated_at=now,
            )
        )
        script_id = int(result.inserted_primary_key[0])
    return get_script(engine, script_id)


def get_script(engine: Engine, script_id: int) -> Script:
    """Load a script by id."""
    with engine.connect() as conn:
        row = conn.execute(
            select(models.scripts).where(models.scripts.c.id == script_id)
        ).first()
    if row is None:
        raise NotFoundError(f"script {script_id} not found")
    return Script(
        row.id,
        row.name,
        row.interpreter,
        row.body,
        retries=row.retries,
        retry_delay=row.retry_delay,
        retry_on=row.retry_on,
    )


def list_scripts(engine: Engine) -> list[dict[str, Any]]:
    """Return every script without its body."""
    s = models.scripts
    with engine.connect() as conn:
        rows = conn.execute(
            select(s.c.id, s.c.name, s.c.interpreter, s.c.updated_at).order_by(s.c.id)
        ).all()
    return [
        {
            "id": r.id,
            "name": r.name,
            "interpreter": r.interpreter,
            "updated_at": isoformat(r.updated_at),
        }
        for r in rows
    ]


def _validate_script(name: str, interpreter: str, body: str) -> None:
    if not name or len(name) > 128:
        raise InvalidInputError("name must be 1 to 128 characters", field="name")
    if not interpreter.strip():
        raise InvalidInputError(
            "interpreter is required, for example /bin/sh or python3",
            field="interpreter",
        )
    if len(body.encode()) > MAX_SCRIPT_BYTES:
        raise InvalidInputError(
            f"body is larger than {MAX_SCRIPT_BYTES} bytes", field="body"
        )


def update_script(
    engine: Engine, script_id: int, name: str, interpreter: str, body: str
) -> Script:
    """Rename a script or change its interpreter or body.

    Waiting jobs run the new version, because workers receive the body when a
    job starts.
    """
    _validate_script(name, interpreter, body)
    get_script(engine, script_id)
    s = models.scripts
    with engine.begin() as conn:
        taken = conn.execute(
            select(s.c.id).where(s.c.name == name, s.c.id != script_id)
        ).first()
        if taken:
            raise ConflictError(f"script {name!r} already exists", field="name")
        conn.execute(
            update(s)
            .where(s.c.id == script_id)
            .values(name=name, interpreter=interpreter, body=body, updated_at=utcnow())
        )
    return get_script(engine, script_id)


def delete_script(engine: Engine, script_id: int) -> None:
    """Delete a script that no waiting or running job uses.

    Finished jobs of the script keep their params but lose the script link.
    """
    script = get_script(engine, script_id)
    j = models.jobs
    with engine.begin() as conn:
        active = conn.execute(
            select(func.count())
            .select_from(j)
            .where(j.c.script_id == script_id, j.c.state.in_(("waiting", "running")))
        ).scalar_one()
        if active:
            raise ConflictError(
                f"script {script.name!r} has {active} waiting or running jobs: "
                "wait for them or kill them first"
            )
        conn.execute(update(j).where(j.c.script_id == script_id).values(script_id=None))
        conn.execute(delete(models.scripts).where(models.scripts.c.id == script_id))
