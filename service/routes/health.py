"""Liveness/readiness probe."""

from __future__ import annotations

from fastapi import APIRouter, Request
from sqlalchemy import text

from service.schemas import error_responses

router = APIRouter(tags=["health"])


@router.get("/healthz", responses=error_responses(503))
def healthz(request: Request) -> dict:
    store = request.app.state.store
    with store.engine.connect() as conn:
        conn.execute(text("SELECT 1"))
    return {"status": "ok", "database": store.engine.dialect.name}
