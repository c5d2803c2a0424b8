"""Bearer API keys. Keys are stored hashed; every job and file belongs to the key that made it,
and another key gets 404 for it (not 403, so ids do not leak). The key is checked by the request
guard (`service.guard`) before any body is read; routes get the owner from `current_owner`. A
response that lasts (an event stream, a download) checks it again as it goes (`KeyWatch`), so a
revoked key loses what it has open within seconds, not when the job or the download ends."""

from __future__ import annotations

import time

from fastapi import Request, Security
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers

from service.errors import storage_fault
from service.settings import LOOPBACK, Settings

LOCAL_OWNER = "local"


class AuthError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def authenticate(headers: Headers, client_host: str, settings: Settings, store) -> str:
    """The key id a request acts for; raises AuthError. Blocking (database): run it in a thread."""
    scheme, _, token = headers.get("authorization", "").partition(" ")
    if token.strip() and scheme.lower() == "bearer":
        owner = store.key_owner(token.strip())
        if owner is None:
            raise AuthError("invalid API key")
        return owner
    if settings.no_auth:
        # The no-auth mode is for a local demo: refuse anyone not on this machine.
        if client_host in LOOPBACK or client_host == "testclient":
            return LOCAL_OWNER
        raise AuthError("this server accepts unauthenticated requests from localhost only")
    raise AuthError("missing API key: send 'Authorization: Bearer <key>' (create one with `llm-prune keys create`)")


RECHECK_SECONDS = 2.0  # how often an open event stream or download checks its key again


class KeyRevoked(Exception):
    """Raised from a download's body once its key no longer authenticates: the guard then ends
    the response (the connection is closed; a resumed download gets the 401)."""


class KeyWatch:
    """The key a long response was authorised with, checked again at most every RECHECK_SECONDS
    (one indexed lookup): `still_valid` is False once the key is revoked. A store that cannot
    answer just then does not end the response (the next check asks again)."""

    def __init__(self, request: Request):
        state = request.scope.get("state", {})
        self.headers, self.owner = request.headers, state.get("owner")
        self.client = (request.scope.get("client") or ("", 0))[0]
        self.settings, self.store = request.app.state.settings, request.app.state.store
        self.checked = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.checked >= RECHECK_SECONDS

    def still_valid(self) -> bool:
        """Blocking (database): run it in a thread from async code."""
        self.checked = time.monotonic()
        try:
            return authenticate(self.headers, self.client, self.settings, self.store) == self.owner
        except AuthError:
            return False
        except Exception as exc:  # noqa: BLE001 - the key store failing is not a revocation
            if storage_fault(exc) is None:
                raise
            return True

    def check(self) -> None:
        """Between the chunks of a download (a thread): raises KeyRevoked once the key is revoked."""
        if self.due() and not self.still_valid():
            raise KeyRevoked("the API key was revoked during the download")


# Names the scheme in the OpenAPI schema, so generated clients send the key; the guard has
# already checked it by the time a route runs.
BEARER = HTTPBearer(auto_error=False, scheme_name="APIKey",
                    description="An API key from `llm-prune keys create`, as `Authorization: Bearer <key>`.")


def current_owner(request: Request, _key=Security(BEARER)) -> str:
    """FastAPI dependency: the key id the guard authenticated (every `/v1/` route is guarded)."""
    owner = request.scope.get("state", {}).get("owner")
    if owner is None:  # a route outside the guard's prefix asked for an owner: a wiring bug
        raise RuntimeError(f"{request.url.path} is not behind the request guard")
    return owner
