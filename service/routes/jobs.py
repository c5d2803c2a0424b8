"""`/v1/jobs`: submit, list, inspect, cancel and delete jobs; their events (paginated or as
Server-Sent Events) and their checkpoints (per-file with Range, or one streamed .tar)."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from llm_prune.errors import NotFoundError, UserError
from service import artifacts
from service.auth import KeyWatch, current_owner
from service.errors import ConflictError, GoneError, shown
from service.ranges import file_chunks, ranged_response
from service.schemas import (API_ERRORS, Checkpoint, CheckpointFile, CheckpointList, Deleted, ErrorResponse, EventList,
                             EventObject, JobCreate, JobList, JobObject, error_responses)
from service.store import TERMINAL, EventRow, JobRow
from service.submission import build_recipe
from service.uploads import FILE_FIELDS, missing_uploads

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=API_ERRORS)

MAX_EVENT_ID = 2**63 - 1  # the largest cursor taken (the store reads one past its column as "after all")


def job_object(row: JobRow) -> JobObject:
    return JobObject(id=row.id, model=row.model, status=row.status, stage=row.stage, progress=round(row.progress, 4),
                     eta_seconds=eta_seconds(row), metrics=row.metrics or {}, result=row.result, error=row.error,
                     created_at=int(row.created_at), started_at=int(row.started_at) if row.started_at else None,
                     finished_at=int(row.finished_at) if row.finished_at else None, attempts=row.attempts,
                     device=row.device, cancel_requested=row.cancel_requested,
                     recipe=public_recipe(row.recipe or {}, row.request or {}),
                     metadata=(row.recipe or {}).get("metadata", {}))


def eta_seconds(row: JobRow) -> float | None:
    """The worker's estimate (remaining work over the current stage's measured throughput), less
    the time since it was made."""
    snap = (row.metrics or {}).get("progress") or {}
    if row.status != "running" or snap.get("eta_s") is None:
        return None
    return round(max(0.0, snap["eta_s"] - (time.time() - snap.get("at", time.time()))), 1)


def public_recipe(recipe: dict, request: dict) -> dict:
    """The job's recipe as a client may see it: uploads named by file id, not by their path on
    the server; `metadata` is shown once, beside it."""
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe.items() if k != "metadata"}
    for (section, key), (req_section, req_key) in FILE_FIELDS:
        if isinstance(out.get(section), dict) and key in out[section]:
            del out[section][key]
            out[section][req_key] = (request.get(req_section) or {}).get(req_key)
    return out


def event_object(row: EventRow) -> EventObject:
    parent, _, stage = row.stage.rpartition("/")
    return EventObject(id=row.id, created_at=row.created_at, kind=row.kind, stage=stage, parent=parent or None,
                       step=row.step, total=row.total, message=row.message, metrics=row.metrics or {})


def _job(request: Request, job_id: str, owner: str) -> JobRow:
    row = request.app.state.store.get_job(job_id, owner)
    if row is None:
        raise NotFoundError(f"no job with id '{shown(job_id)}'", param="job_id")
    return row


@router.post("", response_model=JobObject, responses=error_responses(507))
def create_job(body: JobCreate, request: Request, owner: str = Depends(current_owner),
               idempotency_key: str | None = Header(None, description="a retried POST with the same key and body "
                                                    "returns the job the first one made")) -> JobObject:
    settings, store = request.app.state.settings, request.app.state.store
    if idempotency_key is not None and not (0 < len(idempotency_key) <= 255 and idempotency_key.isascii()
                                            and idempotency_key.isprintable()):
        raise UserError("Idempotency-Key must be 1 to 255 printable ASCII characters (e.g. a UUID)",
                        param="Idempotency-Key", code="invalid_idempotency_key")
    recipe = build_recipe(body, owner, store, settings)
    files = {param: value for param, value in (("data.file_id", body.data and body.data.file_id),
                                               ("evaluation.ppl", body.evaluation and body.evaluation.ppl),
                                               ("pruning.calibration", body.pruning and body.pruning.calibration))
             if value}
    row = store.create_job(owner, recipe.model, body.model_dump(mode="json", exclude_none=True),
                           recipe.model_dump(mode="json"), max_attempts=settings.max_attempts,
                           max_active=settings.max_active_jobs_per_key, files=files,
                           idempotency_key=idempotency_key)
    return job_object(row)


@router.get("", response_model=JobList)
def list_jobs(request: Request, after: str | None = Query(None, max_length=64, description="last id of the previous page"),
              limit: int = Query(20, ge=1, le=100), owner: str = Depends(current_owner)) -> JobList:
    page = request.app.state.store.list_jobs(owner, after, limit)
    if page is None:
        raise UserError(f"after: no job with id '{after}' to continue from", param="after", code="invalid_cursor")
    rows, has_more = page
    return JobList(data=[job_object(r) for r in rows], has_more=has_more,
                   first_id=rows[0].id if rows else None, last_id=rows[-1].id if rows else None)


@router.get("/{job_id}", response_model=JobObject)
def get_job(job_id: str, request: Request, owner: str = Depends(current_owner)) -> JobObject:
    return job_object(_job(request, job_id, owner))


@router.post("/{job_id}/cancel", response_model=JobObject)
def cancel_job(job_id: str, request: Request, owner: str = Depends(current_owner)) -> JobObject:
    _job(request, job_id, owner)
    row, accepted = request.app.state.store.request_cancel(owner, job_id)
    if row is None:
        raise NotFoundError(f"no job with id '{shown(job_id)}'", param="job_id")
    if not accepted:  # decided in the same transaction as the update: no window for a late finish
        raise ConflictError(f"job {job_id} already {row.status}; nothing to cancel", param="job_id",
                            code="job_not_cancellable")
    return job_object(row)


@router.post("/{job_id}/retry", response_model=JobObject)
def retry_job(job_id: str, request: Request, owner: str = Depends(current_owner)) -> JobObject:
    """Queue a failed job again; it resumes after its last finished stage."""
    settings, store = request.app.state.settings, request.app.state.store
    row = _job(request, job_id, owner)
    if row.status != "failed":
        raise ConflictError(f"job {job_id} is {row.status}; only a failed job can be retried", param="job_id",
                            code="job_not_retryable")
    missing = missing_uploads(row.recipe, row.request)
    if missing:  # an upload deleted since would fail it again
        param, file_id = missing[0]
        raise ConflictError(f"job {job_id} cannot run again: its upload '{file_id}' ({param}) was deleted; submit a "
                            "new job with a new upload", param=param, code="file_not_found")
    retried = store.retry_job(owner, job_id, settings.max_active_jobs_per_key)
    if retried is None:
        raise ConflictError(f"job {job_id} is no longer failed", param="job_id", code="job_not_retryable")
    return job_object(retried)


@router.delete("/{job_id}", response_model=Deleted)
def delete_job(job_id: str, request: Request, owner: str = Depends(current_owner)) -> Deleted:
    settings, store = request.app.state.settings, request.app.state.store
    row = _job(request, job_id, owner)
    # The job's folder goes before its row is committed: on a full disk that write needs the space.
    # Should it still fail (507), a checkpoint the job published answers 410 (removed on the server),
    # and the DELETE may be sent again.
    if row.status == "running" or not store.delete_job(
            owner, job_id, before=lambda: shutil.rmtree(settings.job_dir(job_id), ignore_errors=True)):
        current = store.get_job(job_id, owner) or row
        hint = "it is stopping (cancel accepted); delete it once it ends" if current.cancel_requested \
            else "cancel it first"
        raise ConflictError(f"job {job_id} is running; {hint}", param="job_id", code="job_running")
    return Deleted(id=job_id, object="job")


@router.get("/{job_id}/events", response_model=EventList,
            responses={200: {"content": {"text/event-stream": {}}}})
async def job_events(job_id: str, request: Request,
                     after: int | None = Query(None, ge=0, le=MAX_EVENT_ID, description="last event id seen"),
                     limit: int = Query(100, ge=1, le=1000), stream: bool = False,
                     owner: str = Depends(current_owner)):
    store = request.app.state.store
    await run_in_threadpool(_job, request, job_id, owner)
    if not stream:
        rows, has_more = await run_in_threadpool(store.list_events, job_id, after, limit)
        return EventList(data=[event_object(r) for r in rows], has_more=has_more,
                         last_id=rows[-1].id if rows else None)
    last = request.headers.get("last-event-id")
    cursor = _event_cursor(last) if last is not None else after
    return StreamingResponse(_sse(request, job_id, cursor), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


REVOKED = {"error": {"message": "the API key was revoked; this stream has ended", "type": "authentication_error",
                     "param": None, "code": "invalid_api_key"}}


def _event_cursor(value: str) -> int:
    """`Last-Event-ID` (a reconnecting SSE client sends it): an event id, checked like `after`."""
    value = value.strip()
    if not (value.isascii() and value.isdigit()) or len(value) > 19 or int(value) > MAX_EVENT_ID:
        raise UserError(f"Last-Event-ID must be an event id (0 to {MAX_EVENT_ID}), got {value[:40]!r}",
                        param="Last-Event-ID", code="invalid_cursor")
    return int(value)


async def _sse(request: Request, job_id: str, cursor: int | None):
    """Events as they are recorded; ends with an `end` event once the job is finished, or with an
    `error` event (the 401's error object) within seconds of its key being revoked."""
    store = request.app.state.store
    key = KeyWatch(request)
    idle = 0.0
    while not await request.is_disconnected():
        if key.due() and not await run_in_threadpool(key.still_valid):
            yield f"event: error\ndata: {json.dumps(REVOKED)}\n\n"
            return
        rows, _ = await run_in_threadpool(store.list_events, job_id, cursor, 500)
        for row in rows:
            cursor = row.id
            yield f"id: {row.id}\nevent: {row.kind}\ndata: {event_object(row).model_dump_json()}\n\n"
        if rows:
            idle = 0.0
            continue
        job = await run_in_threadpool(store.get_job, job_id)
        if job is None or job.status in TERMINAL:
            # The last events commit with the terminal status: between the two reads above they can
            # have landed, and must go out before the end.
            if job is not None and (await run_in_threadpool(store.list_events, job_id, cursor, 1))[0]:
                continue
            status = job.status if job else "deleted"
            yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
            return
        if idle >= 15:
            yield ": keep-alive\n\n"
            idle = 0.0
        await asyncio.sleep(0.5)
        idle += 0.5


def _checkpoint(request: Request, job_id: str, owner: str, name: str) -> dict:
    row = _job(request, job_id, owner)
    job_dir = request.app.state.settings.job_dir(job_id)
    manifest = artifacts.build_manifest(job_dir, name) if name in artifacts.CHECKPOINTS else None
    if manifest is None:
        _check_not_removed(row, job_dir, [name], param="checkpoint")
        raise NotFoundError(f"job {shown(job_id)} has no checkpoint '{shown(name)}' (yet)", param="checkpoint")
    return manifest


def _check_not_removed(row: JobRow, job_dir: Path, missing: list[str], param: str) -> None:
    """410 Gone when a checkpoint the job published (its result names it) is no longer on the
    server: its files were removed there. Said as such, not as a checkpoint that does not exist
    (yet), nor as an empty list."""
    removed = [name for name in missing if name in ((row.result or {}).get("checkpoints") or {})]
    if not removed:
        return
    names = ", ".join(f"'{name}'" for name in removed)
    what = f"checkpoint {names} was" if len(removed) == 1 else f"checkpoints {names} were"
    where = "with all of the job's files" if not job_dir.is_dir() else "on the server"
    raise GoneError(f"job {row.id}'s {what} removed {where}", param=param, code="checkpoint_removed")


def checkpoint_object(job_id: str, m: dict) -> Checkpoint:
    base = f"/v1/jobs/{job_id}/checkpoints/{m['name']}"
    return Checkpoint(name=m["name"], bytes=m["bytes"], metrics=m["metrics"], archive_url=f"{base}/archive",
                      archive_bytes=m["archive_bytes"], archive_sha256=m["archive_sha256"],
                      files=[CheckpointFile(url=f"{base}/files/{f['name']}", **f) for f in m["files"]])


@router.get("/{job_id}/checkpoints", response_model=CheckpointList, responses=error_responses(410))
def list_checkpoints(job_id: str, request: Request, owner: str = Depends(current_owner)) -> CheckpointList:
    """Checkpoints of the stages finished so far: `pruned` is published while recovery still runs."""
    row = _job(request, job_id, owner)
    job_dir = request.app.state.settings.job_dir(job_id)
    found = artifacts.manifests(job_dir)
    _check_not_removed(row, job_dir, [n for n in artifacts.CHECKPOINTS if n not in {m["name"] for m in found}],
                       param="job_id")
    return CheckpointList(data=[checkpoint_object(job_id, m) for m in found])


def _watched(request: Request, chunks: Callable[[int, int], Iterator[bytes]]) -> Callable[[int, int], Iterator[bytes]]:
    """A download's chunks with its key checked again between them (at most every few seconds): a
    key revoked mid-download ends the response there (`KeyRevoked`, which the guard turns into a
    closed connection); resuming it with `Range` gets the 401."""
    key = KeyWatch(request)

    def read(first: int, last: int) -> Iterator[bytes]:
        for chunk in chunks(first, last):
            key.check()
            yield chunk
    return read


@router.get("/{job_id}/checkpoints/{name}/files/{path:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 206: {"description": "the range"},
                       410: {"model": ErrorResponse}, 416: {"model": ErrorResponse}})
def download_file(job_id: str, name: str, path: str, request: Request, owner: str = Depends(current_owner)):
    """One checkpoint file; honours `Range: bytes=a-b` (206 Partial Content) and `If-Range`."""
    manifest = _checkpoint(request, job_id, owner, name)
    entry = next((f for f in manifest["files"] if f["name"] == path), None)
    if entry is None:  # only names from the manifest: no path escapes
        raise NotFoundError(f"checkpoint '{name}' has no file '{shown(path)}'", param="path")
    root = artifacts.checkpoint_dir(request.app.state.settings.job_dir(job_id), name)
    disposition = f'attachment; filename="{quote(Path(path).name)}"'
    return ranged_response(request.headers, entry["bytes"], entry["sha256"], _watched(request, file_chunks(root / path)),
                           "application/octet-stream",
                           {"X-Content-SHA256": entry["sha256"], "Content-Disposition": disposition},
                           head=request.method == "HEAD")


@router.get("/{job_id}/checkpoints/{name}/archive", response_class=StreamingResponse,
            responses={200: {"content": {"application/x-tar": {}}}, 206: {"description": "the range"},
                       410: {"model": ErrorResponse}, 416: {"model": ErrorResponse}})
def download_archive(job_id: str, name: str, request: Request, owner: str = Depends(current_owner)):
    """The whole checkpoint as one uncompressed, byte-reproducible tar, streamed; sha256 in
    `X-Content-SHA256` (and the ETag). `Range` resumes a broken download."""
    manifest = _checkpoint(request, job_id, owner, name)
    root = artifacts.checkpoint_dir(request.app.state.settings.job_dir(job_id), name)
    files = [f["name"] for f in manifest["files"]]
    return ranged_response(request.headers, manifest["archive_bytes"], manifest["archive_sha256"],
                           _watched(request, lambda first, last: artifacts.stream_tar(root, name, files, first, last)),
                           "application/x-tar", {"X-Content-SHA256": manifest["archive_sha256"],
                                                 "Content-Disposition": f'attachment; filename="{job_id}-{name}.tar"'},
                           head=request.method == "HEAD")


# HEAD gives a download's size, ETag and checksum without its body (download managers and
# `curl -I` ask first); its own operation, since one route with two methods shares one operation id.
for _path, _handler in (("/{job_id}/checkpoints/{name}/files/{path:path}", download_file),
                        ("/{job_id}/checkpoints/{name}/archive", download_archive)):
    router.add_api_route(_path, _handler, methods=["HEAD"], name=f"{_handler.__name__}_head",
                         summary=f"{_handler.__name__.replace('_', ' ').capitalize()}: headers only",
                         responses={200: {"description": "the headers a GET would send, no body"},
                                    206: {"description": "the range's headers"}, 410: {"model": ErrorResponse},
                                    416: {"model": ErrorResponse}})
