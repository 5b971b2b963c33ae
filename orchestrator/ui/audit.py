"""The audit log page: who did what to which object, and from where."""

import asyncio

from fastapi import APIRouter, Query, Request, Response

from orchestrator import audit
from orchestrator.api import deps
from orchestrator.ui import common

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

PAGE_SIZE = 50


@router.get("/audit")
async def audit_page(
    request: Request,
    user: common.AdminUser,
    engine: deps.EngineDep,
    page: int = Query(1, ge=1, le=1_000_000),
    who: str = Query("", max_length=64),
    action: str = Query("", max_length=64),
) -> Response:
    """List audit entries, newest first, filtered by user and action."""
    rows, total = await asyncio.to_thread(
        audit.list_entries,
        engine,
        limit=PAGE_SIZE,
        offset=(page - 1) * PAGE_SIZE,
        user_name=who or None,
        action=action or None,
    )
    pages = max(1, (total + PAGE_SIZE - 1) // PAGE_SIZE)
    context = {
        "title": "Audit log",
        "entries": rows,
        "total": total,
        "page": page,
        "pages": pages,
        "who": who,
        "action": action,
    }
    return common.render(request, "audit.html", context)
