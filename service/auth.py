"""Bearer API keys. Keys are stored hashed; every job and file belongs to the key that made it,
and another key gets 404 for it (not 403, so ids do not leak). The key is checked by the request
guard (`service.guard`) before any body is read; routes get the owner from `current_owner`."""

from __future__ import annotations

from fastapi import Request, Security
from fastapi.security import HTTPBearer
from starlette.datastructures import Headers

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
