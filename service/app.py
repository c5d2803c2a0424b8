"""FastAPI application factory. Every error a client can cause comes back as
`{"error": {"message", "type", "param", "code"}}` with a 4xx status; only bugs give a 500."""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from llm_prune.errors import NotFoundError, UserError, first_line
from service.errors import (RETRY_AFTER, STORAGE_ERRORS, ConflictError, GoneError, PayloadTooLarge, RangeError,
                            storage_fault)
from service.guard import RequestGuard
from service.settings import Settings
from service.store import LimitExceeded, Store

log = logging.getLogger("llm_prune.service")

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "conflict_error", 410: "server_error", 413: "invalid_request_error",
               416: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               503: "service_unavailable_error", 507: "service_unavailable_error"}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": _utf8(message), "type": ERROR_TYPES.get(status, "server_error"),
                      "param": _utf8(param), "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _utf8(text: str | None) -> str | None:
    """`text` as it can be sent: a message may quote what the client sent, unpaired surrogates included."""
    return text if text is None else text.encode("utf-8", "backslashreplace").decode("utf-8")


# What Starlette says when a body cannot be decoded at all (not UTF-8, nested too deep, ...).
_UNPARSABLE = "There was an error parsing the body"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None, str]:
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ()) if p not in ("body", "query", "path", "header")]
    # Drop pydantic's union/model tags (e.g. "function-after[...]") from the parameter path.
    loc = [p for p in loc if "[" not in p]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        return f"request body is not valid JSON: {err.get('ctx', {}).get('error', 'parse error')}", None, "json_invalid"
    msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif err.get("type") == "missing":
        msg = "required"
    return (f"{param}: {msg}" if param else msg), param, err.get("type", "invalid")


_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def _allowed_methods(request: Request) -> list[str]:
    """The methods a route fully matches for this path, asked of each route through `matches` (routes
    of included routers are nested, and how differs between FastAPI releases)."""
    return [m for m in _METHODS
            if any(route.matches({**request.scope, "method": m})[0] == Match.FULL for route in request.app.router.routes)]


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(UserError)
    async def _user_error(_request: Request, exc: UserError):
        status = (404 if isinstance(exc, NotFoundError) else 409 if isinstance(exc, ConflictError)
                  else 410 if isinstance(exc, GoneError) else 413 if isinstance(exc, PayloadTooLarge)
                  else 416 if isinstance(exc, RangeError) else 400)
        headers = {"Content-Range": f"bytes */{exc.size}"} if isinstance(exc, RangeError) and exc.size is not None \
            else None
        return error_response(status, exc.message, exc.param, exc.code, headers=headers)

    @app.exception_handler(LimitExceeded)
    async def _limit(_request: Request, exc: LimitExceeded):
        return error_response(429, str(exc), None, "too_many_active_jobs")

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError):
        message, param, code = _validation_message(exc)
        return error_response(400, message, param, code)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        code = getattr(exc, "code", None)
        if exc.status_code == 400 and detail == _UNPARSABLE:
            # FastAPI says this of anything that failed while reading the body, chained as the cause.
            if storage_fault(exc.__cause__) is not None:  # e.g. a full temp dir under an upload
                return await _storage(request, exc.__cause__)
            if request.headers.get("content-type", "").lower().startswith("multipart/"):
                detail, code = f"request body is not a readable multipart form: {first_line(exc.__cause__, 200)}", \
                    "invalid_multipart"
            else:
                detail, code = "request body is not valid JSON (it must be UTF-8 JSON nested at most a few " \
                               "hundred levels deep)", "json_invalid"
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            # Starlette names only the first route that matched the path in Allow; every method the
            # path takes belongs there (RFC 9110), e.g. GET and POST for /v1/jobs.
            allowed = _allowed_methods(request)
            detail, code = f"{request.method} is not allowed here; this path takes {', '.join(allowed)}", \
                "method_not_allowed"
            headers = {**(headers or {}), "Allow": ", ".join(allowed)}
        return error_response(exc.status_code, detail, getattr(exc, "param", None), code, headers=headers)

    async def _storage(_request: Request, exc: Exception):
        fault = storage_fault(exc)
        if fault is None:
            raise exc  # a bug after all: the 500 below
        # The server's storage, not the request: the client may retry it as it is.
        log.warning("storage unavailable: %s", first_line(exc, 300))
        status, message, code = fault
        return error_response(status, message, None, code, headers={"Retry-After": RETRY_AFTER})

    for kind in STORAGE_ERRORS:  # handled here, these are answered without a traceback in the log
        app.add_exception_handler(kind, _storage)

    @app.exception_handler(Exception)
    async def _bug(_request: Request, exc: Exception):
        log.exception("unhandled error")
        # Starlette raises the exception again once this answer is sent, and uvicorn then drops the
        # connection: said in the answer, a keep-alive client opens a new connection for its next
        # request (that request was reset instead).
        return error_response(500, "internal server error", None, "internal_error", headers={"Connection": "close"})


def _document_errors(app: FastAPI) -> None:
    """FastAPI lists a 422 with its own error shape on every route; this API answers invalid
    requests with 400 and the error object (`_invalid` above), so the schema says that alone."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            spec = build()
            for operations in spec["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
        return app.openapi_schema

    app.openapi = openapi


def create_app(settings: Settings | None = None, *, embedded_worker: bool | None = None) -> FastAPI:
    """The API; with `embedded_worker` (default: settings.worker_slots > 0) a worker runs jobs in
    child processes for the lifetime of the app."""
    from service.routes import files, health, jobs

    settings = settings or Settings()
    settings.prepare()
    store = Store(settings.db_url)
    try:
        store.check_data_dir(settings.data_dir)
    except UserError:
        store.close()
        raise
    run_worker = settings.worker_slots > 0 if embedded_worker is None else embedded_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        worker, thread = None, None
        if run_worker:
            from service.worker import Worker

            worker = Worker(settings, store)
            thread = threading.Thread(target=worker.run_forever, name="llm-prune-worker", daemon=True)
            thread.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop()
                thread.join(timeout=settings.cancel_grace_seconds + 10)
            store.close()

    app = FastAPI(title="llm-prune", version="0.1.0", lifespan=lifespan,
                  description="Structured pruning, recovery-data selection and retraining of LLMs as jobs.")
    _document_errors(app)
    app.state.settings = settings
    app.state.store = store
    _install_error_handlers(app)

    app.add_middleware(RequestGuard, settings=settings, store=store, error_response=error_response)
    app.include_router(health.router)
    app.include_router(files.router)
    app.include_router(jobs.router)
    return app
