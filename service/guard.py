"""The request guard, a pure ASGI middleware in front of every route: the API key is checked
before a single byte of the body is read, and the body is counted as it streams in (chunked or
not), so neither an anonymous client nor a keyed one can make the server read or spool more than
the limit. Streamed responses pass through untouched. Without API keys (`no_auth`, loopback only) it also
refuses a Host that is not a loopback name and an Origin that is not a loopback origin (DNS
rebinding, cross-site requests from a web page)."""

from __future__ import annotations

import logging

from anyio import to_thread
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

from service.auth import AuthError, KeyRevoked, authenticate
from service.errors import RETRY_AFTER, StorageQuotaExceeded, storage_fault
from service.settings import Settings

log = logging.getLogger("llm_prune.service")

UPLOAD_PATH = "/v1/files"
MULTIPART_FRAMING = 64 * 1024  # boundaries and part headers around the file


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]")


def _loopback_authority(authority: str) -> bool:
    """Whether `host[:port]` names this machine by a loopback name or address, with any port."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        host, _, rest = authority.partition("]")
        host, port = host + "]", rest.removeprefix(":") if rest.startswith(":") else (None if rest else "")
    else:
        host, _, port = authority.partition(":")
    return host in LOOPBACK_HOSTS and port is not None and (port == "" or port.isdigit())


def loopback_refusal(headers: Headers) -> tuple[int, str, str, str] | None:
    """The no-auth mode trusts whoever can reach the loopback port; a web page can too, through its
    browser: by DNS rebinding (its own name, resolved to 127.0.0.1, so the request's Host is that
    name) or a cross-site "simple" request (a form POST, which carries the page's Origin). Refused
    here unless the Host is a loopback name and any Origin a loopback origin: (status, message,
    param, code), or None."""
    host = headers.get("host")
    if host is not None and not _loopback_authority(host):
        return (400, f"Host {host[:100]!r} is not this machine: without API keys (--no-auth) the server answers "
                     "only requests for localhost, 127.0.0.1 or [::1]", "Host", "invalid_host")
    origin = headers.get("origin")
    if origin is not None:
        scheme, sep, authority = origin.partition("://")
        if not (sep and scheme.lower() in ("http", "https") and "/" not in authority
                and _loopback_authority(authority)):
            return (403, f"cross-origin request from {origin[:100]!r} refused: without API keys (--no-auth) only "
                         "pages served from localhost may call this server", "Origin", "cross_origin_refused")
    return None


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes the limit; an HTTPException, so FastAPI's body
    parsing lets it through to the error handler (413 with the error object)."""

    def __init__(self, limit: int, param: str | None, code: str):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes", headers={"Connection": "close"})
        self.param, self.code = param, code


class RequestGuard:
    """Authenticates `/v1/...` requests (the owner goes to `scope["state"]["owner"]`) and caps
    every request body: `max_upload_bytes` (+ multipart framing) for uploads, `max_json_bytes`
    for anything else. A refusal carries `Connection: close`, so the rest of the body is never
    read."""

    def __init__(self, app, settings: Settings, store, error_response):
        self.app, self.settings, self.store, self.error_response = app, settings, store, error_response

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        has_body = "content-length" in headers or "transfer-encoding" in headers
        close = {"Connection": "close"} if has_body else {}
        if "\x00" in scope["path"] or b"%00" in scope.get("query_string", b""):
            # No id, cursor or name holds one, and PostgreSQL refuses it in a query's parameters.
            response = self.error_response(400, "the request's path or query has a NUL character (%00)", None,
                                           "invalid_characters", headers=close)
            return await response(scope, receive, send)
        if self.settings.no_auth:
            refused = loopback_refusal(headers)
            if refused is not None:
                status, message, param, code = refused
                response = self.error_response(status, message, param, code, headers=close)
                return await response(scope, receive, send)
        if scope["path"].startswith("/v1/"):
            client = scope.get("client") or ("", 0)
            try:
                owner = await to_thread.run_sync(authenticate, headers, client[0], self.settings, self.store)
            except AuthError as exc:
                response = self.error_response(401, exc.message, None, "invalid_api_key",
                                               headers={"WWW-Authenticate": "Bearer", **close})
                return await response(scope, receive, send)
            except Exception as exc:  # noqa: BLE001 - the key store itself failing
                fault = storage_fault(exc)
                if fault is None:
                    raise
                status, message, code = fault
                response = self.error_response(status, message, None, code, headers={"Retry-After": RETRY_AFTER,
                                                                                      **close})
                return await response(scope, receive, send)
            scope.setdefault("state", {})["owner"] = owner
        upload = scope["path"].rstrip("/") == UPLOAD_PATH and scope["method"] == "POST"
        limit = self.settings.max_upload_bytes + MULTIPART_FRAMING if upload else self.settings.max_json_bytes
        param = "file" if upload else None
        code = "file_too_large" if upload else "body_too_large"
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            response = self.error_response(413, f"request body is {int(declared)} bytes; the limit is {limit} bytes",
                                           param, code, headers=close)
            return await response(scope, receive, send)
        if upload and declared.isdigit() and "owner" in scope.get("state", {}):
            # The key's storage quota, before a byte is read: the file is at least the body less its framing.
            quota, owner = self.settings.max_stored_bytes_per_key, scope["state"]["owner"]
            try:
                used = await to_thread.run_sync(self.store.stored_bytes, owner)
            except Exception as exc:  # noqa: BLE001 - the store failing: the route answers for it
                if storage_fault(exc) is None:
                    raise
                used = 0
            if used + int(declared) - MULTIPART_FRAMING > quota:
                exc = StorageQuotaExceeded(used, int(declared), quota, declared=True)
                response = self.error_response(413, exc.message, exc.param, exc.code, headers=close)
                return await response(scope, receive, send)

        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit, param, code)
            return message

        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched_send)
        except KeyRevoked:
            # Mid-download, the body already started: the connection is closed short of its length
            # (a client sees it cut off; resuming with Range gets the 401).
            log.info("%s %s: the API key was revoked; response ended", scope["method"], scope["path"])
            if not started:
                response = self.error_response(401, "the API key was revoked", None, "invalid_api_key",
                                               headers={"WWW-Authenticate": "Bearer", "Connection": "close"})
                await response(scope, receive, send)
        except BodyTooLarge as exc:
            if started:
                raise
            response = self.error_response(413, exc.detail, exc.param, code, headers={"Connection": "close"})
            await response(scope, receive, send)
