"""The audit log: who changed what, and from which address."""

import logging
from typing import Any

from sqlalchemy import Engine, func, insert, select

from orchestrator import db, models
from orchestrator.timeutil import utcnow

logger = logging.getLogger(__name__)

MAX_TARGET_CHARS = 255
MAX_ADDRESS_CHARS = 64


def record_action(
    engine: Engine,
    *,
    user_id: int | None,
    user_name: str | None,
    action: str,
    target: str | None = None,
    detail: str | None = None,
    address: str | None = None,
) -> None:
    """Insert one audit entry and log it."""
    with engine.begin() as conn:
        conn.execute(
            insert(models.audit_log).values(
                at=utcnow(),
                user_id=user_id,
                user_name=user_name,
                action=action,
                target=target[:MAX_TARGET_CHARS] if target else target,
                detail=detail,
                address=address[:MAX_ADDRESS_CHARS] if address else address,
            )
        )
    logger.info(
        "Audit: %s %s %s",
        user_name or "-",
        action,
        target or "",
        extra={"event": "audit", "action": action, "user": user_name},
    )


def list_entries(
    engine: Engine,
    *,
    limit: int = 50,
    offset: int = 0,
    user_name: str | None = None,
    action: str | None = None,
) -> tuple[list[Any], int]:
    """Return one page of audit entries, newest first, and the matching total."""
    a = models.audit_log
    conditions = []
    if user_name:
        conditions.append(a.c.user_name == user_name)
    if action:
        conditions.append(a.c.action.like(f"{db.escape_like(action)}%", escape="\\"))
    query = select(a).where(*conditions).order_by(a.c.id.desc())
    with engine.connect() as conn:
        rows = conn.execute(query.limit(limit).offset(offset)).all()
        total = conn.execute(
            select(func.count()).select_from(a).where(*conditions)
        ).scalar_one()
    return list(rows), int(total)
