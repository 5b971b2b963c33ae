"""HTML pages: the browser UI, served by the same app as the JSON API."""

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from orchestrator.config import Settings
from orchestrator.ui import (
    audit,
    auth,
    classes,
    common,
    dashboard,
    job_detail,
    jobs,
    keys,
    scripts,
    session,
    settings,
    users,
    workers,
)


def install(app: FastAPI, config: Settings) -> None:
    """Add the pages, their static files and the session middleware to ``app``."""
    app.state.login_throttle = auth.LoginThrottle()
    app.state.dashboard_cache = {}
    # The list router comes first so /jobs/status is not read as a job id.
    for module in (
        auth,
        dashboard,
        jobs,
        job_detail,
        keys,
        workers,
        classes,
        users,
        scripts,
        settings,
        audit,
    ):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=common.STATIC_DIR), name="static")
    session.add_middleware(app, config)
