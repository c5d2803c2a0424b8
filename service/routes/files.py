"""`/v1/files`: upload a recovery pool or an evaluation text; jobs refer to it by id."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool

from llm_prune.errors import NotFoundError, UserError
from service.auth import current_owner
from service.errors import PayloadTooLarge, StorageQuotaExceeded, shown
from service.schemas import API_ERRORS, Deleted, FileList, FileObject, error_responses
from service.store import FileRow, new_id
from service.uploads import validate_upload

router = APIRouter(prefix="/v1/files", tags=["files"], responses=API_ERRORS)


def file_object(row: FileRow) -> FileObject:
    return FileObject(id=row.id, filename=row.filename, purpose=row.purpose, bytes=row.bytes, sha256=row.sha256,
                      records=row.records, malformed=row.malformed or 0, created_at=int(row.created_at))


MAX_NAME_BYTES = 200  # file systems allow 255; the rest is headroom


def upload_name(name: str | None) -> str:
    """The name an upload is stored (and listed) under: the client's base name, as valid UTF-8,
    shortened to what a file system takes with its suffix kept (the suffix tells the pool's format)."""
    name = Path((name or "").replace("\\", "/")).name.encode("utf-8", "replace").decode()
    name = "".join(c if c.isprintable() else "_" for c in name)
    if name in ("", ".", ".."):
        return "upload"
    suffix = Path(name).suffix if len(Path(name).suffix.encode()) <= 16 else ""
    stem = name[:len(name) - len(suffix)] if suffix else name
    while len((stem + suffix).encode()) > MAX_NAME_BYTES:
        stem = stem[:-1]
    return stem + suffix


def _save(upload: UploadFile, target: Path, limit: int, used: int, quota: int) -> tuple[int, str]:
    """Copies the upload to `target`; stops as soon as it passes the upload limit or the room left
    in the key's storage quota (`used` of `quota`)."""
    h, size = hashlib.sha256(), 0
    with open(target, "wb") as out:
        while block := upload.file.read(1024 * 1024):
            size += len(block)
            if size > limit:
                raise PayloadTooLarge(f"upload exceeds the limit of {limit} bytes", param="file",
                                      code="file_too_large")
            if used + size > quota:
                raise StorageQuotaExceeded(used, size, quota)
            h.update(block)
            out.write(block)
    return size, h.hexdigest()


@router.post("", response_model=FileObject, responses=error_responses(507))
async def upload_file(request: Request, file: UploadFile = File(...), purpose: str = Form("recovery"),
                      owner: str = Depends(current_owner)) -> FileObject:
    settings, store = request.app.state.settings, request.app.state.store
    filename = upload_name(file.filename)
    file_id = new_id("file")
    folder = settings.uploads_dir / file_id
    target = folder / filename
    try:
        folder.mkdir(parents=True)
        used = await run_in_threadpool(store.stored_bytes, owner)
        size, digest = await run_in_threadpool(_save, file, target, settings.max_upload_bytes, used,
                                               settings.max_stored_bytes_per_key)
        if size == 0:
            raise UserError(f"{filename}: the file is empty", param="file")
        records, malformed = await run_in_threadpool(validate_upload, target, filename, purpose, size)
        # In a thread: a database busy for seconds must not hold up every other request.
        row = await run_in_threadpool(store.add_file, id=file_id, owner=owner, filename=filename, purpose=purpose,
                                      bytes=size, sha256=digest, records=records, malformed=malformed,
                                      path=str(target), quota=settings.max_stored_bytes_per_key)
    except BaseException:  # refused, broken or not recorded: no folder is left that no file id names
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return file_object(row)


@router.get("", response_model=FileList)
def list_files(request: Request, owner: str = Depends(current_owner)) -> FileList:
    return FileList(data=[file_object(r) for r in request.app.state.store.list_files(owner)])


@router.get("/{file_id}", response_model=FileObject)
def get_file(file_id: str, request: Request, owner: str = Depends(current_owner)) -> FileObject:
    row = request.app.state.store.get_file(owner, file_id)
    if row is None:
        raise NotFoundError(f"no file with id '{shown(file_id)}'", param="file_id")
    return file_object(row)


@router.delete("/{file_id}", response_model=Deleted)
def delete_file(file_id: str, request: Request, owner: str = Depends(current_owner)) -> Deleted:
    store = request.app.state.store
    row = store.get_file(owner, file_id)
    if row is None:
        raise NotFoundError(f"no file with id '{shown(file_id)}'", param="file_id")
    # Jobs already submitted hold the resolved path; deleting the upload removes it for good. Its
    # folder goes first, once no active job uses it (else 409): on a full disk the row's delete needs
    # the space. Should that delete still fail (507), the row names content that is gone, which a
    # submission or a retry refuses (file_not_found), and the DELETE may be sent again.
    if not store.delete_file(owner, file_id, before=lambda r: shutil.rmtree(Path(r.path).parent, ignore_errors=True)):
        raise NotFoundError(f"no file with id '{shown(file_id)}'", param="file_id")
    return Deleted(id=file_id, object="file")
