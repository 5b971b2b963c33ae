"""Build the FastAPI application."""

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import DataError, InterfaceError, OperationalError, StatementError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator import db, keys, metrics, stored_settings, ui, workers
from orchestrator.api import agent as agent_api
from orchestrator.api import deps, submit, v1
from orchestrator.api import inventory as inventory_api
from orchestrator.api import keys as keys_api
from orchestrator.api.schemas import ERROR_RESPONSES
from orchestrator.config import Settings
from orchestrator.dispatch import Dispatcher
from orchestrator.exceptions import (
    AuthenticationError,
    JobBalancerError,
    PermissionDeniedError,
)

logger = logging.getLogger(__name__)


def create_app(settings: Settings) -> FastAPI:
    """Create the application for ``settings``; the lifespan starts dispatching."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = db.create_db_engine(settings.resolved_database_url())
        db.upgrade_schema(engine)
        workers.ensure_defaults(engine)
        stored_settings.apply_stored(engine, settings)
        # Creates the master key file on first start, before any key is stored.
        keys.load_master_key(settings.data_path())
        dispatcher = Dispatcher(engine, settings)
        app.state.engine = engine
        app.state.dispatcher = dispatcher
        await dispatcher.start()
        logger.info("Dispatcher started with strategy %s", settings.strategy)
        try:
            yield
        finally:
            await dispatcher.stop()
            engine.dispose()

    app = FastAPI(
        title="Job Balancer",
        version="0.1.0",
        summary="Run shell jobs submitted over HTTP on SSH workers",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    _add_offline_docs(app)
    app.state.settings = settings
    app.state.key_cache = {}
    app.include_router(submit.router)
    app.include_router(v1.router)
    app.include_router(keys_api.router)
    app.include_router(inventory_api.router)
    app.include_router(agent_api.router)
    ui.install(app, settings)
    _add_error_handlers(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)

    @app.get("/healthz", tags=["server"])
    async def healthz() -> dict[str, str]:
        """Report that the server is up."""
        return {"status": "ok"}

    @app.get("/metrics", tags=["server"], response_class=Response)
    async def read_metrics(request: Request) -> Response:
        """Export Prometheus metrics; send metrics_token or an admin API key."""
        await _authorize_metrics(request, settings)
        body = await metrics.render(app.state.engine, app.state.dispatcher)
        return Response(body, media_type=metrics.CONTENT_TYPE)

    return app


def _add_offline_docs(app: FastAPI) -> None:
    """Serve the OpenAPI document and page to signed-in callers only.

    Swagger UI comes from a PyPI package, because FastAPI's own /docs page
    loads it from a CDN, which fails offline.
    """
    app.mount(
        "/docs-assets",
        StaticFiles(directory=swagger_ui_bundle.swagger_ui_path),
        name="docs-assets",
    )

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi_document(user: deps.UserDep) -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, response_model=None)
    async def swagger_ui(request: Request) -> HTMLResponse | RedirectResponse:
        if getattr(request.state, "session_user", None) is None:
            return RedirectResponse("/login?next=/docs", status_code=303)
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="Job Balancer API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
        )


async def _authorize_metrics(request: Request, settings: Settings) -> None:
    if metrics.is_public(settings):
        return
    key = deps.bearer_key(request)
    if key and metrics.token_matches(settings, key):
        return
    if not key:
        raise AuthenticationError(
            "missing credentials: send 'Authorization: Bearer TOKEN' with the "
            "metrics_token setting or an admin API key",
            field="Authorization",
        )
    user = await deps.authenticate_key(request, key, None)
    if not user.is_admin:
        raise PermissionDeniedError(
            "metrics need the metrics_token setting or an admin API key"
        )


def error_body(error: str, detail: str, field: str | None = None) -> dict[str, Any]:
    """Build the JSON error shape that every 4xx response uses."""
    body: dict[str, Any] = {"result": False, "error": error, "detail": detail}
    if field:
        body["field"] = field
    return body


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(JobBalancerError)
    async def domain_error(request: Request, exc: JobBalancerError) -> JSONResponse:
        return JSONResponse(
            error_body(exc.error, exc.detail, exc.field), status_code=exc.status_code
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(
        request: Request, exc: RequestValidationError
    ) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return JSONResponse(
                error_body(
                    "invalid_json",
                    "the request body is not valid JSON: send a JSON object with "
                    "Content-Type: application/json",
                ),
                status_code=400,
            )
        first = errors[0] if errors else {}
        location = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
        field = ".".join(location) or None
        message = first.get("msg", "invalid value")
        detail = f"{field}: {message}" if field else message
        if first.get("type") == "model_attributes_type" or (
            first.get("type") == "dict_type" and not location
        ):
            detail = "the request body must be a JSON object"
        return JSONResponse(
            error_body("invalid_input", detail, field)
            | {"errors": _plain_errors(errors)},
            status_code=422,
        )

    @app.exception_handler(OperationalError)
    @app.exception_handler(InterfaceError)
    async def database_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("Database unavailable for %s: %s", request.url.path, exc)
        return JSONResponse(
            error_body(
                "database_unavailable",
                "the database is not reachable right now; nothing was changed, "
                "so send the request again in a few seconds",
            ),
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(OverflowError)
    @app.exception_handler(DataError)
    @app.exception_handler(StatementError)
    async def out_of_range(request: Request, exc: Exception) -> JSONResponse:
        cause = getattr(exc, "orig", exc)
        if not isinstance(exc, (OverflowError, DataError)) and not isinstance(
            cause, OverflowError
        ):
            logger.error(
                "Database statement failed for %s", request.url.path, exc_info=exc
            )
            return JSONResponse(
                error_body("internal_error", "the request could not be stored"),
                status_code=500,
            )
        return JSONResponse(
            error_body(
                "invalid_input",
                "a number in the request is out of range: ids, offsets and "
                "limits must be below 2**63",
            ),
            status_code=422,
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body("http_error", str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )


def _plain_errors(errors: Any) -> list[dict[str, Any]]:
    return [
        {"loc": [str(p) for p in e.get("loc", ())], "msg": str(e.get("msg", ""))}
        for e in errors
    ]


class BodyLimitMiddleware:
    """Reject request bodies larger than ``max_bytes`` with a 413 JSON error."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send)
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLargeError
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLargeError:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Callable[[Message], Awaitable[None]]) -> None:
        response = JSONResponse(
            error_body(
                "body_too_large",
                f"the request body is larger than {self.max_bytes} bytes: send a "
                "shorter command or store it as a script",
            ),
            status_code=413,
        )
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": response.raw_headers,
            }
        )
        await send({"type": "http.response.body", "body": response.body})


class _BodyTooLargeError(Exception):
    pass
