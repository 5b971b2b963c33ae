"""The jobs list: search, sort, pages, live state, and a form to run a command."""

import asyncio
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import Engine

from orchestrator import jobs, scripts, workers
from orchestrator.accounts import User
from orchestrator.api import deps
from orchestrator.api.submit import submit_job
from orchestrator.exceptions import JobBalancerError
from orchestrator.timeutil import utcnow
from orchestrator.ui import common, forms, logstream, progress

router = APIRouter(route_class=common.PageRoute, include_in_schema=False)

PAGE_SIZES = (25, 50, 100)
MAX_STATUS_IDS = 200
SORT_COLUMNS = {
    "id": "ID",
    "state": "State",
    "worker_id": "Worker",
    "created_at": "Created",
    "finished_at": "Finished",
}


@dataclass(frozen=True)
class ListQuery:
    """The list's filters, sort order and page, as read from the URL."""

    q: str = ""
    state: str = ""
    sort: str = "id"
    order: str = "desc"
    page: int = 1
    per: int = 50

    @classmethod
    def parse(cls, params: Any) -> "ListQuery":
        """Read the query string leniently; unknown values fall back to defaults."""
        sort = params.get("sort", "id")
        state = params.get("state", "")
        per = _to_int(params.get("per"), 50)
        return cls(
            q=params.get("q", "").strip()[:200],
            state=state if state in jobs.STATES else "",
            sort=sort if sort in jobs.SORTABLE else "id",
            order="asc" if params.get("order") == "asc" else "desc",
            page=max(1, _to_int(params.get("page"), 1)),
            per=per if per in PAGE_SIZES else 50,
        )

    def url(self, **changes: Any) -> str:
        """Return the list URL with some values changed."""
        values = {
            "q": self.q,
            "state": self.state,
            "sort": self.sort,
            "order": self.order,
            "page": self.page,
            "per": self.per,
        } | changes
        defaults = ListQuery()
        kept = {k: v for k, v in values.items() if v != getattr(defaults, k)}
        return "/jobs" + (f"?{urlencode(kept)}" if kept else "")

    def sort_url(self, column: str) -> str:
        """Return the URL that sorts by ``column``, flipping the order when set."""
        order = "asc" if self.sort == column and self.order == "desc" else "desc"
        return self.url(sort=column, order=order, page=1)


def _to_int(value: Any, default: int) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def page_numbers(page: int, pages: int) -> list[int | None]:
    """Return the page links to show; None marks a gap."""
    wanted = {1, pages, page - 1, page, page + 1}
    numbers = sorted(n for n in wanted if 1 <= n <= pages)
    result: list[int | None] = []
    for number in numbers:
        if result and number - (result[-1] or 0) > 1:
            result.append(None)
        result.append(number)
    return result


@router.get("/jobs")
async def jobs_page(
    request: Request, user: common.PageUser, engine: deps.EngineDep
) -> Response:
    """List jobs one page at a time; submitters see their own jobs only."""
    query = ListQuery.parse(request.query_params)
    return await _render_list(request, user, engine, query)


async def _render_list(
    request: Request,
    user: User,
    engine: Engine,
    query: ListQuery,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, str] | None = None,
    status_code: int = 200,
) -> Response:
    rows, total, names, progresses, classes = await asyncio.to_thread(
        _load_list, engine, user, query
    )
    pages = max(1, -(-total // query.per))
    context = {
        "title": "Jobs",
        "rows": rows,
        "total": total,
        "query": query,
        "pages": pages,
        "page_links": page_numbers(min(query.page, pages), pages),
        "sort_columns": SORT_COLUMNS,
        "script_names": names,
        "progress": progresses,
        "classes": _allowed(classes, user),
        "states": jobs.STATES,
        "form": form or {},
        "errors": errors or {},
    }
    return common.render(request, "jobs.html", context, status_code=status_code)


def _load_list(engine: Engine, user: User, query: ListQuery) -> tuple[Any, ...]:
    rows, total = jobs.list_jobs(
        engine,
        limit=query.per,
        offset=(query.page - 1) * query.per,
        state=query.state or None,
        user_id=None if user.is_admin else user.id,
        search=query.q or None,
        sort=query.sort,
        descending=query.order == "desc",
    )
    names = {s["id"]: s["name"] for s in scripts.list_scripts(engine)}
    now = utcnow()
    progresses = {
        row.id: progress.read_progress(engine, row.id, row.started_at, now)
        for row in rows
        if row.state == jobs.RUNNING
    }
    return rows, total, names, progresses, workers.list_classes(engine)


def _allowed(classes: list[dict[str, Any]], user: User) -> list[dict[str, Any]]:
    if user.allowed_classes is None:
        return classes
    return [c for c in classes if c["name"] in user.allowed_classes]


@router.get("/jobs/status")
async def jobs_status(
    request: Request, user: common.PageUser, engine: deps.EngineDep, ids: str = ""
) -> JSONResponse:
    """Return the state and progress of listed jobs, for the list's live update."""
    wanted = [int(part) for part in ids.split(",") if part.strip().isdigit()]
    rows = await asyncio.to_thread(
        jobs.get_job_rows,
        engine,
        wanted[:MAX_STATUS_IDS],
        None if user.is_admin else user.id,
    )
    now = utcnow()
    items = []
    for row in rows:
        item = logstream.job_summary(row)
        if row.state == jobs.RUNNING:
            found = await asyncio.to_thread(
                progress.read_progress, engine, row.id, row.started_at, now
            )
            item["progress"] = found.public() if found else None
        items.append(item)
    return JSONResponse({"jobs": items})


@router.post("/jobs")
async def run_command(
    request: Request,
    user: common.PageUser,
    engine: deps.EngineDep,
    dispatcher: deps.DispatcherDep,
    form: forms.CheckedForm,
) -> Response:
    """Submit a shell command as a job and open its page."""
    try:
        payload = forms.job_payload(
            command=form.raw("command"),
            watchdog=form.number("watchdog", minimum=0),
            workerClassId=form.text("workerClassId") or None,
        )
        job_id, state = await submit_job(
            engine, dispatcher, user, payload, address=forms.client_address(request)
        )
    except JobBalancerError as exc:
        query = ListQuery.parse(request.query_params)
        return await _render_list(
            request,
            user,
            engine,
            query,
            form=form.values(),
            errors=forms.form_errors(exc),
            status_code=exc.status_code,
        )
    message = f"Job {job_id} is {common.state_label(state).lower()}."
    return forms.action_done(request, message, f"/jobs/{job_id}")
