"""Bearer API keys. Keys are stored hashed; every job and file belongs to the key that made it,
and another key gets 404 for it (not 403, so ids do not leak)."""

from __future__ import annotations

from fastapi import Request

from service.settings import LOOPBACK

LOCAL_OWNER = "local"


class AuthError(Exception):
    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


def current_owner(request: Request) -> str:
    """FastAPI dependency: the key id the request acts for."""
    settings = request.app.state.settings
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if token and scheme.lower() == "bearer":
        owner = request.app.state.store.key_owner(token.strip())
        if owner is None:
            raise AuthError("invalid API key")
        return owner
    if settings.no_auth:
        # The no-auth mode is for a local demo: refuse anyone not on this machine.
        client = request.client.host if request.client else ""
        if client in LOOPBACK or client == "testclient":
            return LOCAL_OWNER
        raise AuthError("this server accepts unauthenticated requests from localhost only")
    raise AuthError("missing API key: send 'Authorization: Bearer <key>' (create one with `llm-prune keys create`)")
