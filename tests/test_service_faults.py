"""The service when its own storage fails, not the client: a locked or full database, a full disk,
checkpoint files removed on the server, a download cut off, uploads gone from disk, settings that
would make healthy jobs lose their leases. None of these is a 500 or a traceback, and nothing a
refused request wrote is left behind."""

import errno
import logging
import sqlite3

import httpx
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

import service.store as store_mod
from llm_prune.errors import UserError
from service.app import create_app
from service.client import Client
from service.settings import Settings
from service.worker import StoreOutage
from tests.api_errors import assert_error as _err
from tests.test_service_api import MIN, _publish, _upload


@pytest.fixture
def env(tmp_path, tiny_llama, monkeypatch):
    # Locks are waited out for 0.2 s here instead of 30 s (read when each connection opens).
    monkeypatch.setattr(store_mod, "LOCK_TIMEOUT_MS", 200)
    settings = Settings(data_dir=tmp_path / "data", worker_slots=0, allowed_model_roots=str(tiny_llama.parent),
                        max_upload_bytes=4096)
    app = create_app(settings)
    with TestClient(app) as client:
        store = app.state.store
        yield client, store, settings, {"Authorization": f"Bearer {store.create_key('alice')[1]}"}


def test_a_locked_database_is_a_503_and_a_refused_upload_leaves_no_file(env):
    client, _, settings, alice = env
    holder = sqlite3.connect(settings.data_dir / "jobs.db")
    holder.execute("BEGIN EXCLUSIVE")
    try:
        r = client.post("/v1/jobs", headers=alice, json=MIN)
        _err(r, 503, code="store_unavailable")
        assert r.headers["retry-after"].isdigit()
        _err(_upload(client, alice, "pool.jsonl", b'{"instruction": "a", "output": "b"}\n'), 503,
             code="store_unavailable")
    finally:
        holder.rollback()
        holder.close()
    assert list(settings.uploads_dir.iterdir()) == []  # the upload's folder went with its refusal
    assert client.post("/v1/jobs", headers=alice, json=MIN).status_code == 200  # and all is well after


def test_a_full_disk_is_a_507(env, monkeypatch):
    client, _, settings, alice = env

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("service.routes.files._save", full)
    _err(_upload(client, alice, "pool.jsonl", b'{"instruction": "a", "output": "b"}\n'), 507,
         code="insufficient_storage")
    assert list(settings.uploads_dir.iterdir()) == []


def test_a_full_disk_can_be_cleared_through_the_api(env, monkeypatch):
    """On a full disk SQLite cannot write the delete of a file's or a job's row: DELETE answered 507
    and nothing could be freed through the API. The folder now goes first (once nothing active uses
    it), which frees the space the row's delete needs; a delete refused all the same leaves a row
    whose content is refused as gone, and the DELETE sent again succeeds."""
    client, store, settings, alice = env
    pool = b'{"instruction": "a", "output": "b"}\n'
    dialect, real_commit, full_while = store.engine.dialect, store.engine.dialect.do_commit, []

    def commit(dbapi_conn):  # SQLite on the full disk: no write while these folders hold the space
        if any(path.exists() for path in full_while):
            raise sqlite3.OperationalError("database or disk is full")
        real_commit(dbapi_conn)

    def succeeded_job():
        job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
        root = settings.job_dir(job_id) / "run" / "final"
        root.mkdir(parents=True)
        (root / "config.json").write_text('{"model_type": "llama"}')
        (root / ".done").write_text("")
        store.claim("w", "cpu", 60)
        store.finish(job_id, "w", "succeeded", result={"checkpoints": {"final": "final"}})
        return job_id

    monkeypatch.setattr(dialect, "do_commit", commit)
    file_id, job_id = _upload(client, alice, "pool.jsonl", pool).json()["id"], succeeded_job()
    full_while[:] = [settings.uploads_dir / file_id]
    assert client.delete(f"/v1/files/{file_id}", headers=alice).status_code == 200
    full_while[:] = [settings.job_dir(job_id)]
    assert client.delete(f"/v1/jobs/{job_id}", headers=alice).status_code == 200
    assert not (settings.uploads_dir / file_id).exists() and not settings.job_dir(job_id).exists()
    _err(client.get(f"/v1/files/{file_id}", headers=alice), 404)
    _err(client.get(f"/v1/jobs/{job_id}", headers=alice), 404)

    # The row's delete refused all the same (the disk stays full): its content is gone for good, said so.
    file_id, job_id = _upload(client, alice, "pool.jsonl", pool).json()["id"], succeeded_job()
    full_while[:] = [settings.data_dir]
    r = client.delete(f"/v1/files/{file_id}", headers=alice)
    _err(r, 507, code="insufficient_storage")
    assert r.headers["retry-after"] and not (settings.uploads_dir / file_id).exists()
    err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": file_id}}), 400,
               param="data.file_id", code="file_not_found")
    assert str(settings.data_dir) not in err["message"]
    _err(client.delete(f"/v1/jobs/{job_id}", headers=alice), 507, code="insufficient_storage")
    assert not settings.job_dir(job_id).exists()
    _err(client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice), 410, code="checkpoint_removed")
    full_while.clear()  # the DELETE again
    assert client.delete(f"/v1/files/{file_id}", headers=alice).status_code == 200
    assert client.delete(f"/v1/jobs/{job_id}", headers=alice).status_code == 200
    _err(client.get(f"/v1/files/{file_id}", headers=alice), 404)
    _err(client.get(f"/v1/jobs/{job_id}", headers=alice), 404)

    # An upload a queued job uses is refused (409) before anything of it is removed.
    file_id = _upload(client, alice, "pool.jsonl", pool * 8).json()["id"]
    r = client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": file_id}})
    assert r.status_code == 200, r.text
    _err(client.delete(f"/v1/files/{file_id}", headers=alice), 409, code="file_in_use")
    assert any((settings.uploads_dir / file_id).iterdir())


def test_a_full_temp_dir_under_an_upload_is_a_507_not_bad_json(env, monkeypatch):
    """The form parser spools uploads in the system temp dir before any route runs; a full one was
    answered 400 "not valid JSON"."""
    client, _, settings, alice = env

    class FullSpool:
        def __init__(self, *a, **k):
            pass

        def write(self, _data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    monkeypatch.setattr("starlette.formparsers.SpooledTemporaryFile", FullSpool)
    r = _upload(client, alice, "pool.jsonl", b'{"instruction": "a", "output": "b"}\n')
    _err(r, 507, code="insufficient_storage")
    assert r.headers["retry-after"] and list(settings.uploads_dir.iterdir()) == []


def test_checkpoint_files_removed_on_the_server_are_not_announced(env):
    """The manifest is cached; a file removed (or rewritten) since is not listed with its old size
    and checksum, so no download starts that is then cut off. A manifest cache that cannot be
    written (a full disk) does not fail the read."""
    client, store, settings, alice = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"w" * 5000, "tokenizer.json": b"{}"}
    _publish(store, settings, job_id, files)
    (ckpt,) = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"]
    url = next(f["url"] for f in ckpt["files"] if f["name"] == "model.safetensors")
    root = settings.job_dir(job_id) / "run" / "final"
    (root / "model.safetensors").unlink()
    (ckpt,) = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"]
    assert [f["name"] for f in ckpt["files"]] == ["config.json", "tokenizer.json"]
    _err(client.get(url, headers=alice), 404)
    archive = client.get(ckpt["archive_url"], headers=alice)
    assert archive.status_code == 200 and len(archive.content) == ckpt["archive_bytes"]
    (root / "tokenizer.json").write_bytes(b'{"x": 1}')  # rewritten, same size or not
    (ckpt,) = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"]
    assert next(f for f in ckpt["files"] if f["name"] == "tokenizer.json")["bytes"] == 8

    manifests = settings.job_dir(job_id) / "manifests"
    for f in manifests.iterdir():
        f.unlink()
    manifests.rmdir()
    manifests.write_text("not a folder: the cache cannot be written")
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).status_code == 200
    assert client.get(ckpt["archive_url"], headers=alice).status_code == 200


def test_checkpoints_of_a_succeeded_job_removed_on_the_server_are_410_not_missing(env):
    """A succeeded job whose folder was removed on the server listed no checkpoints (200 []) and
    its archive said "has no checkpoint 'final' (yet)" (404), while its result named both. What
    the job published and the server lost is 410 Gone, the same on every checkpoint route."""
    import shutil

    client, store, settings, alice = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    for name in ("pruned", "final"):
        root = settings.job_dir(job_id) / "run" / name
        root.mkdir(parents=True)
        (root / "config.json").write_text('{"model_type": "llama"}')
        (root / ".done").write_text("")
    store.claim("w", "cpu", 60)
    store.finish(job_id, "w", "succeeded", result={"checkpoints": {"pruned": "pruned", "final": "final"}})
    base = f"/v1/jobs/{job_id}/checkpoints"
    assert [c["name"] for c in client.get(base, headers=alice).json()["data"]] == ["pruned", "final"]

    shutil.rmtree(settings.job_dir(job_id) / "run" / "final")  # one checkpoint gone
    err = _err(client.get(base, headers=alice), 410, param="job_id", code="checkpoint_removed")
    assert err["type"] == "server_error" and "checkpoint 'final' was removed on the server" in err["message"]
    _err(client.get(f"{base}/final/archive", headers=alice), 410, param="checkpoint", code="checkpoint_removed")
    assert client.get(f"{base}/pruned/archive", headers=alice).status_code == 200

    shutil.rmtree(settings.job_dir(job_id))  # the job's whole folder
    for r in (client.get(base, headers=alice), client.get(f"{base}/final/archive", headers=alice),
              client.get(f"{base}/pruned/files/config.json", headers=alice),
              client.head(f"{base}/final/archive", headers=alice)):
        assert r.status_code == 410 and r.headers["content-type"].startswith("application/json"), r.request.url
    err = client.get(base, headers=alice).json()["error"]
    assert "checkpoints 'pruned', 'final' were removed with all of the job's files" in err["message"]
    assert str(settings.data_dir) not in err["message"]
    _err(client.get(f"{base}/other/archive", headers=alice), 404)  # never a checkpoint: not found
    queued = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]  # nothing published yet: as before
    assert client.get(f"/v1/jobs/{queued}/checkpoints", headers=alice).json()["data"] == []
    _err(client.get(f"/v1/jobs/{queued}/checkpoints/final/archive", headers=alice), 404)


def test_a_corrupt_manifest_cache_is_rebuilt_not_a_500(env):
    client, store, settings, alice = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    _publish(store, settings, job_id, {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"w" * 100})
    (ckpt,) = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"]
    cache = settings.job_dir(job_id) / "manifests" / "final.json"
    for broken in ("", "{}", '{"files": 3}', '{"files": [{"bytes": 1}]}', "[]", "\xff"):
        cache.write_text(broken)
        r = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice)
        assert r.status_code == 200 and r.json()["data"] == [ckpt], broken
        cache.write_text(broken)
        assert client.get(ckpt["archive_url"], headers=alice).status_code == 200, broken


def test_an_upload_gone_from_disk_is_refused_without_its_server_path(env):
    client, _, settings, alice = env
    pool = _upload(client, alice, "pool.jsonl", b'{"instruction": "a", "output": "b"}\n').json()
    (path,) = (settings.uploads_dir / pool["id"]).iterdir()
    path.unlink()
    err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": pool["id"]}}), 400,
               param="data.file_id", code="file_not_found")
    assert str(settings.data_dir) not in err["message"] and "upload it again" in err["message"]


def test_an_interrupted_download_is_one_line_and_keeps_what_arrived(tmp_path):
    size = 3 * 1024 * 1024
    ckpt = {"name": "final", "archive_bytes": size, "archive_sha256": "0" * 64,
            "archive_url": "/v1/jobs/job-1/checkpoints/final/archive"}

    class CutOff(httpx.SyncByteStream):
        def __iter__(self):
            yield b"x" * 300_000  # less than any read buffer: what arrived is written as it comes
            raise httpx.RemoteProtocolError("peer closed connection without sending complete message body")

    def handler(request):
        if request.url.path.endswith("/checkpoints"):
            return httpx.Response(200, json={"object": "list", "data": [ckpt]})
        return httpx.Response(200, headers={"Content-Length": str(size)}, stream=CutOff())

    client = Client("http://test", api_key="k")
    client.http = httpx.Client(base_url="http://test", transport=httpx.MockTransport(handler))
    with pytest.raises(UserError, match=r"interrupted after 300,000 of 3,145,728 bytes .*run the command again"):
        client.download("job-1", tmp_path / "out")
    assert (tmp_path / "out" / "job-1-final.tar.part").stat().st_size == 300_000


def test_a_lease_shorter_than_two_heartbeats_is_refused():
    with pytest.raises(ValidationError, match="at least twice heartbeat_seconds"):
        Settings(lease_seconds=0.3, heartbeat_seconds=0.5)
    Settings(lease_seconds=1.0, heartbeat_seconds=0.5)


def test_a_store_outage_is_logged_once_not_every_poll(caplog):
    outage = StoreOutage("w1")
    with caplog.at_level(logging.WARNING, logger="llm_prune.service"):
        for _ in range(50):
            try:
                raise sqlite3.OperationalError("database is locked")
            except sqlite3.OperationalError:
                outage.failed("claiming a job")
        assert outage.backoff(0.3) == StoreOutage.MAX_BACKOFF_S
        outage.ok()
    assert [r.levelname for r in caplog.records] == ["ERROR", "WARNING"]
    assert caplog.records[0].exc_info is not None and "available again after 50" in caplog.records[1].message
    assert outage.backoff(0.3) == 0.3


@pytest.mark.parametrize("how", ["removed", "replaced"])
def test_a_database_file_removed_or_replaced_under_the_server_is_a_503_not_lost_writes(env, how):
    """Pooled connections went on writing to the unlinked file: 200s for jobs that were gone (and a
    new connection made an empty database in its place); a replaced file would serve another one."""
    import shutil

    client, _, settings, alice = env
    assert client.post("/v1/jobs", headers=alice, json=MIN).status_code == 200
    db = settings.data_dir / "jobs.db"
    if how == "replaced":  # a backup moved into place: the same contents, another file
        shutil.copy(db, settings.data_dir / "copy.db")
        (settings.data_dir / "copy.db").replace(db)
    else:
        db.unlink()
    for r in (client.post("/v1/jobs", headers=alice, json=MIN), client.get("/healthz")):
        err = _err(r, 503, code="store_unavailable")
        assert "database file was removed or replaced" in err["message"] and "restore" in err["message"], err
    assert db.exists() == (how == "replaced")  # no empty database made in its place


def test_a_briefly_read_only_database_names_the_cause_and_heals_once_writable(env):
    """A SQLite connection opened while the file was read-only stays read-only: every write was a
    503 "busy... try again shortly" long after the permissions were restored, until a restart."""
    from sqlalchemy import event

    client, store, settings, alice = env
    read_only = True

    def opened(_dialect, _record, cargs, cparams):  # as SQLite opens a file it may not write
        if read_only:
            cargs[0], cparams["uri"] = f"file:{cargs[0]}?mode=ro", True

    event.listen(store.engine, "do_connect", opened)
    store.engine.dispose()
    held = [store.engine.connect() for _ in range(3)]  # the pool fills with read-only connections
    for conn in held:
        conn.close()
    err = _err(client.post("/v1/jobs", headers=alice, json=MIN), 503, code="store_unavailable")
    assert "read-only" in err["message"] and "try again shortly" not in err["message"], err
    read_only = False  # the permissions restored: the next writes succeed, none is left to a stale connection
    for _ in range(4):
        assert client.post("/v1/jobs", headers=alice, json=MIN).status_code == 200


def test_a_full_disk_at_start_up_is_named_not_a_disk_io_error(tmp_path, monkeypatch):
    """SQLite says "disk I/O error" when it cannot make its WAL files on a full disk."""
    import os

    def no_room(*_a):  # as SQLite fails on a full disk: at the first statement of a connection
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(store_mod, "_sqlite_pragmas", no_room)
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with pytest.raises(UserError) as exc:
        store_mod.Store(url)
    assert exc.value.message == f"cannot open database {url}: disk I/O error"  # a disk with room: as it was
    monkeypatch.setattr(os, "statvfs", lambda _p: os.statvfs_result((4096, 4096, 1000, 0, 0, 100, 50, 50, 0, 255)))
    with pytest.raises(UserError) as exc:
        store_mod.Store(url)
    assert exc.value.message == (f"cannot open database {url}: the disk holding {tmp_path} is full (0 KiB free) "
                                 f"(SQLite said: disk I/O error)")


def test_a_data_dir_marker_that_cannot_be_written_leaves_nothing_that_refuses_the_next_start(tmp_path,
                                                                                            monkeypatch):
    """On a full disk the marker was left empty beside the id recorded in the database, and every
    later start was refused (".store-id is missing"), the disk freed or not."""
    import builtins

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def write(self, _text):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_on_a_full_disk(path, mode="r", *a, **k):
        fh = builtins.open(path, mode, *a, **k)
        return Full(fh) if "x" in mode or "w" in mode else fh

    store = store_mod.Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(store_mod, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(UserError, match=r"cannot write .*\.store-id: No space left on device"):
        store.check_data_dir(data)
    assert list(data.iterdir()) == [] and store._meta("data_dir_id") is None
    monkeypatch.undo()  # the disk freed: the next start pairs them
    store.check_data_dir(data)
    assert (data / store_mod.DATA_DIR_MARKER).read_text().strip() == store._meta("data_dir_id")
    store.close()
