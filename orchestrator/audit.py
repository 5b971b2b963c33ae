"""The audit log: who changed what, and from which address."""

import logging

from sqlalchemy import Engine, insert

from orchestrator import models
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
