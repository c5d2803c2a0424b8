"""Job store queries, on SQLite and (when LLM_PRUNE_TEST_POSTGRES_URL is set) PostgreSQL."""

import os
import threading
import time
import uuid
from pathlib import Path

import pytest

from llm_prune.errors import UserError
from service.store import LimitExceeded, Store

PG_URL = os.environ.get("LLM_PRUNE_TEST_POSTGRES_URL")


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
        yield s
        s.close()
        return
    if not PG_URL:
        pytest.skip("LLM_PRUNE_TEST_POSTGRES_URL not set")
    from sqlalchemy import create_engine, text

    schema = f"t_{uuid.uuid4().hex[:12]}"  # a schema per test: repeated or parallel runs never collide
    admin = create_engine(PG_URL)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    s = Store(PG_URL, schema=schema)
    try:
        yield s
    finally:
        s.close()
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def _job(store, owner="k1", **kw):
    return store.create_job(owner, "m", {"model": "m"}, {"model": "m"}, max_attempts=kw.pop("max_attempts", 2), **kw)


def test_keys_are_stored_hashed(store):
    key_id, secret = store.create_key("ci")
    assert store.key_owner(secret) == key_id
    assert store.key_owner(secret + "x") is None
    from service.store import ApiKey

    with store.session() as s:
        row = s.get(ApiKey, key_id)
    assert secret not in row.key_hash and len(row.key_hash) == 64


def test_list_pagination_and_owner_isolation(store):
    ids = [_job(store).id for _ in range(5)]
    _job(store, owner="k2")
    page, more = store.list_jobs("k1", limit=2)
    assert [j.id for j in page] == ids[::-1][:2] and more
    page2, more2 = store.list_jobs("k1", after=page[-1].id, limit=10)
    assert [j.id for j in page2] == ids[::-1][2:] and not more2
    assert store.get_job(ids[0], "k2") is None
    assert store.list_jobs("k2", after=ids[0]) is None  # another key's cursor is unknown, as a bogus one


def test_active_job_limit(store):
    _job(store, max_active=2)
    _job(store, max_active=2)
    with pytest.raises(LimitExceeded):
        _job(store, max_active=2)
    _job(store, owner="k2", max_active=2)


def test_racing_workers_claim_each_job_once(store):
    ids = {_job(store).id for _ in range(6)}
    claimed, lock = [], threading.Lock()

    def work(n):
        while (job := store.claim(f"w{n}", "cpu", 30)) is not None:
            with lock:
                claimed.append(job.id)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(claimed) == sorted(ids)


def test_claims_are_fair_between_keys(store):
    """Claimed oldest-first, a key with long jobs held every worker slot while another key's job
    stayed queued: the next claim is the oldest job of the owner with the fewest running jobs."""
    a = [_job(store, owner="alice").id for _ in range(3)]
    b = [_job(store, owner="bob").id for _ in range(2)]
    c = _job(store, owner="carol").id
    # Slot by slot: alice (oldest, nobody runs), then bob and carol (none running), then the
    # owners with one running each, by age.
    order = [store.claim(f"w{n}", "cpu", 30).id for n in range(6)]
    assert order == [a[0], b[0], c, a[1], b[1], a[2]]
    assert store.claim("w9", "cpu", 30) is None
    # Bob's jobs end: his younger job goes before alice's older one (she runs 3, he none).
    late_a, late_b = _job(store, owner="alice").id, _job(store, owner="bob").id
    assert store.finish(b[0], "w1", "succeeded", result={})
    assert store.finish(b[1], "w4", "succeeded", result={})
    assert store.claim("w10", "cpu", 30).id == late_b
    assert store.get_job(late_a).status == "queued"
    assert store.claim("w11", "cpu", 30).id == late_a


def test_events_and_progress_only_from_lease_holder(store):
    job = _job(store)
    assert store.claim("w1", "cpu", 30).id == job.id
    assert store.record(job.id, "w1", [{"kind": "stage_start", "stage": "prune"}], stage="prune", progress=0.3)
    assert not store.record(job.id, "w2", [{"kind": "progress", "stage": "prune"}], progress=0.9)
    for i in range(5):
        store.record(job.id, "w1", [{"kind": "progress", "stage": "prune", "step": i, "total": 5}])
    row = store.get_job(job.id)
    assert row.stage == "prune" and row.progress == pytest.approx(0.3)
    first, more = store.list_events(job.id, limit=3)
    rest, more2 = store.list_events(job.id, after=first[-1].id)
    assert more and not more2 and len(first) + len(rest) == 6
    assert [e.step for e in rest] == [2, 3, 4]
    assert store.finish(job.id, "w1", "succeeded", result={"ok": 1})
    row = store.get_job(job.id)
    # Progress is what the job's work reached, never forced: the worker records 1.0 when the last stage ends.
    assert row.status == "succeeded" and row.progress == pytest.approx(0.3) and row.lease_owner is None


def test_cancel_queued_and_running(store):
    queued = _job(store)
    assert store.request_cancel("k1", queued.id)[0].status == "cancelled"
    running = _job(store)
    store.claim("w1", "cpu", 30)
    row, accepted = store.request_cancel("k1", running.id)
    assert accepted and row.status == "running" and row.cancel_requested
    assert store.heartbeat(running.id, "w1", 30) == (True, True)
    assert store.request_cancel("k2", running.id) == (None, False)


def test_expired_lease_requeues_then_fails_at_retry_limit(store):
    job = _job(store, max_attempts=2)
    store.claim("w1", "cpu", 0.01)
    time.sleep(0.05)
    assert store.requeue_expired() == [(job.id, "queued")]
    assert store.heartbeat(job.id, "w1", 30) == (False, False)  # the old worker lost it
    assert store.claim("w2", "cpu", 0.01).attempts == 2
    time.sleep(0.05)
    assert store.requeue_expired() == [(job.id, "failed")]
    row = store.get_job(job.id)
    assert row.error["code"] == "worker_lost"
    kinds = [e.kind for e in store.list_events(job.id)[0]]
    assert kinds == ["warning", "warning"]


def test_release_and_delete(store):
    job = _job(store)
    store.claim("w1", "cpu", 30)
    assert not store.delete_job("k1", job.id)  # running jobs are not deleted
    assert store.release(job.id, "w1")
    row = store.get_job(job.id)
    assert row.status == "queued" and row.attempts == 0
    (event,) = store.list_events(job.id)[0]  # the next start is the same attempt again: the events say why
    assert event.kind == "warning" and "handed back" in event.message
    assert store.delete_job("k1", job.id) and store.get_job(job.id) is None


def test_active_job_limit_holds_under_concurrent_submissions(store):
    """20 trials of 20 simultaneous submissions for one key with limit 4: exactly 4 get in."""
    limit, callers = 4, 20
    for trial in range(20):
        owner, accepted, refused = f"race{trial}", [], []
        start = threading.Barrier(callers)

        def submit():
            start.wait()
            try:
                _job(store, owner=owner, max_active=limit)
                accepted.append(1)
            except LimitExceeded:
                refused.append(1)

        threads = [threading.Thread(target=submit) for _ in range(callers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert (len(accepted), len(refused)) == (limit, callers - limit), f"trial {trial}"
        assert len(store.active_jobs(owner)) == limit


def test_cancel_accepted_while_finishing_ends_cancelled(store):
    job = _job(store)
    store.claim("w1", "cpu", 30)
    assert store.request_cancel("k1", job.id)[1]
    assert store.finish(job.id, "w1", "succeeded", result={"ok": 1})  # the last stage completed meanwhile
    assert store.get_job(job.id).status == "cancelled"
    assert store.request_cancel("k1", job.id)[1]  # cancelling a cancelled job is a no-op, not a conflict
    done = _job(store)
    store.claim("w1", "cpu", 30)
    store.finish(done.id, "w1", "succeeded")
    row, accepted = store.request_cancel("k1", done.id)
    assert not accepted and row.status == "succeeded" and not row.cancel_requested


def test_what_a_worker_writes_is_stored_in_every_database(store):
    """A diverged loss (NaN, inf) and a NUL quoted from the user's input would make PostgreSQL refuse
    the write, and the job's real error would be lost to a lease timeout."""
    job = _job(store)
    store.claim("w1", "cpu", 30)
    nan, inf = float("nan"), float("inf")
    assert store.record(job.id, "w1", [{"kind": "eval", "stage": "recover", "message": "bad\x00name",
                                         "metrics": {"eval_loss": nan, "grad": [inf, 1.5]}}],
                        metrics={"recover": {"eval_loss": nan}})
    assert store.finish(job.id, "w1", "failed", error={"message": "no layer named q\x00x", "type": "user_error",
                                                       "param": None, "code": None})
    row = store.get_job(job.id)
    assert row.status == "failed" and row.error["message"] == "no layer named q\ufffdx"
    assert row.metrics == {"recover": {"eval_loss": None}}
    (event,) = store.list_events(job.id)[0]
    assert event.message == "bad\ufffdname" and event.metrics == {"eval_loss": None, "grad": [None, 1.5]}


def test_integers_past_a_32_bit_column_neither_fail_nor_500(store):
    """PostgreSQL's INTEGER is 32-bit: a step count or a cursor past it used to raise (a 500, or
    every progress write of a job refused as a store outage)."""
    job = _job(store)
    store.claim("w1", "cpu", 30)
    assert store.record(job.id, "w1", [{"kind": "progress", "stage": "train", "step": 3_000_000_000,
                                         "total": 10**20}])
    (event,) = store.list_events(job.id)[0]
    assert (event.step, event.total) == (2**31 - 1, 2**31 - 1)
    assert store.list_events(job.id, after=0)[0] and store.list_events(job.id, after=2**31)[0] == []
    assert store.list_events(job.id, after=2**63 - 1) == ([], False)


def test_progress_never_goes_back(store):
    """A resumed attempt restarts its stage's count; the job's progress holds (README: never decreasing)."""
    job = _job(store)
    store.claim("w1", "cpu", 30)
    store.record(job.id, "w1", [], progress=0.87)
    store.record(job.id, "w1", [], progress=0.73)
    assert store.get_job(job.id).progress == pytest.approx(0.87)
    store.record(job.id, "w1", [], progress=0.9)
    assert store.get_job(job.id).progress == pytest.approx(0.9)


def test_uploads_are_recorded_within_the_owners_quota(store):
    from service.errors import StorageQuotaExceeded

    def add(n, owner="k1", size=400):
        store.add_file(id=f"file-{owner}-{n}", owner=owner, filename="p.jsonl", purpose="recovery", bytes=size,
                       sha256="0" * 64, records=1, path=f"/srv/files/{n}/p.jsonl", quota=1000)

    add(1), add(2)
    with pytest.raises(StorageQuotaExceeded) as refused:
        add(3)
    assert (refused.value.used, refused.value.limit) == (800, 1000) and store.stored_bytes("k1") == 800
    add(3, owner="k2")
    assert store.delete_file("k1", "file-k1-1")
    add(4)
    assert store.stored_bytes("k1") == 800 and store.stored_bytes("nobody") == 0


def test_a_file_deleted_before_admission_is_refused_and_a_used_one_is_kept(store):
    from llm_prune.errors import UserError
    from service.errors import ConflictError

    store.add_file(id="file-a", owner="k1", filename="p.jsonl", purpose="recovery", bytes=1, sha256="0" * 64,
                         records=1, path="/srv/files/file-a/p.jsonl")
    assert store.delete_file("k1", "file-a") and store.get_file("k1", "file-a") is None
    with pytest.raises(UserError, match="data.file_id: no file with id 'file-a'"):
        _job(store, files={"data.file_id": "file-a"})
    store.add_file(id="file-b", owner="k1", filename="p.jsonl", purpose="recovery", bytes=1, sha256="0" * 64,
                   records=1, path="/srv/files/file-b/p.jsonl")
    job = store.create_job("k1", "m", {}, {"model": "m", "data": {"pool": "/srv/files/file-b/p.jsonl"}},
                           max_attempts=2, files={"data.file_id": "file-b"})
    with pytest.raises(ConflictError, match=f"used by queued job {job.id}"):
        store.delete_file("k1", "file-b")
    assert store.get_file("k1", "file-b") is not None


def test_an_idempotency_key_returns_the_job_it_made(store):
    from service.errors import ConflictError

    first = store.create_job("k1", "m", {"model": "m"}, {"model": "m"}, max_attempts=2, idempotency_key="abc",
                             max_active=1)
    again = store.create_job("k1", "m", {"model": "m"}, {"model": "m"}, max_attempts=2, idempotency_key="abc",
                             max_active=1)  # the limit is not hit: no second job is made
    assert again.id == first.id and len(store.list_jobs("k1")[0]) == 1
    with pytest.raises(ConflictError, match="another request"):
        store.create_job("k1", "m", {"model": "other"}, {"model": "other"}, max_attempts=2, idempotency_key="abc")
    other_owner = store.create_job("k2", "m", {"model": "m"}, {"model": "m"}, max_attempts=2, idempotency_key="abc")
    assert other_owner.id != first.id  # keys are per API key
    store.request_cancel("k1", first.id)
    assert store.delete_job("k1", first.id)
    fresh = store.create_job("k1", "m", {"model": "m"}, {"model": "m"}, max_attempts=2, idempotency_key="abc")
    assert fresh.id != first.id


def test_an_accepted_cancel_survives_a_worker_shutdown_and_a_dead_job_process(store):
    """release (the worker stopped gracefully) and requeue (the job process died) queued a job whose
    cancel had been accepted: it ran again."""
    for hand_back in (lambda j: store.release(j, "w1"), lambda j: store.requeue(j, "w1", "killed by SIGKILL")):
        job = _job(store)
        store.claim("w1", "cpu", 30)
        assert store.request_cancel("k1", job.id)[1]
        assert hand_back(job.id) in (True, "cancelled")
        row = store.get_job(job.id)
        assert (row.status, row.lease_owner) == ("cancelled", None) and row.finished_at is not None
        assert store.list_events(job.id)[0][-1].metrics == {"status": "cancelled"}
        assert store.claim("w2", "cpu", 30) is None


def test_a_postgresql_connection_has_network_timeouts(store):
    """Behind a network partition a call blocked for good (the socket stays open)."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only")
    with store.engine.connect() as conn:
        params = conn.connection.dbapi_connection.info.get_parameters()  # libpq's, on the client side
    assert {k: params.get(k) for k in ("connect_timeout", "keepalives", "tcp_user_timeout")} == \
        {"connect_timeout": "10", "keepalives": "1", "tcp_user_timeout": "20000"}


def test_leases_follow_the_database_clock_not_the_workers(store, monkeypatch):
    """A worker whose clock ran ahead by more than the lease requeued other workers' healthy jobs."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("PostgreSQL only: SQLite is one machine, one clock")
    job = _job(store)
    store.claim("w1", "cpu", 30)
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + 3600)  # this process's clock, an hour ahead
    assert store.requeue_expired() == []
    assert store.heartbeat(job.id, "w1", 30) == (True, False)
    assert store.get_job(job.id).lease_expires < real() + 60


def _emptied(store):
    """The store's database as an operator left it: deleted (SQLite: `rm jobs.db*`) or its tables
    dropped (PostgreSQL), then opened again (the tables come back empty)."""
    from service.store import Base

    store.close()
    if store.engine.dialect.name == "sqlite":
        db = Path(store.engine.url.database)
        for suffix in ("", "-wal", "-shm"):
            db.with_name(db.name + suffix).unlink(missing_ok=True)
    else:
        Base.metadata.drop_all(store.engine)
    return Store(store.url, schema=store.schema)


def test_an_emptied_database_is_refused_beside_a_data_dir_it_served(store, tmp_path):
    """It was adopted: the data directory's id went into the empty database, and the server said
    "ok" while every key was unknown and GET /v1/jobs was [] beside the job folders."""
    from service.store import DATA_DIR_MARKER

    data = tmp_path / "data"
    data.mkdir()
    store.check_data_dir(data)
    store.create_key("ci")
    _job(store)
    fresh = _emptied(store)
    try:
        with pytest.raises(UserError) as exc:
            fresh.check_data_dir(data)
        marker = (data / DATA_DIR_MARKER).read_text().strip()
        assert exc.value.message.startswith(f"the database {fresh.url} does not know data directory {data}") and \
            marker in exc.value.message and "restore that database" in exc.value.message, exc.value.message
        assert fresh._meta("data_dir_id") is None  # nothing adopted: the next start is refused as well
        with pytest.raises(UserError):
            fresh.check_data_dir(data)
        # A directory that never had the marker (a deployment from before it) is adopted, as before.
        (data / DATA_DIR_MARKER).unlink()
        fresh.create_key("old")
        fresh.check_data_dir(data)
        assert (data / DATA_DIR_MARKER).read_text().strip() == fresh._meta("data_dir_id")
        assert [k.name for k in fresh.list_keys()] == ["old"]
    finally:
        fresh.close()


def test_a_read_only_connection_is_discarded_once_it_refuses_a_write(store):
    """SQLite: a connection opened while the file was read-only; PostgreSQL: one to a standby (a
    read-only transaction). Either kept refusing writes after the database was writable again."""
    from sqlalchemy import event
    from sqlalchemy.exc import DBAPIError

    from service.errors import storage_fault

    read_only = True
    if store.engine.dialect.name == "sqlite":
        @event.listens_for(store.engine, "do_connect")
        def opened(_dialect, _record, cargs, cparams):
            if read_only:
                cargs[0], cparams["uri"] = f"file:{cargs[0]}?mode=ro", True
    else:
        @event.listens_for(store.engine, "connect")
        def opened(dbapi_conn, _record):
            if read_only:
                with dbapi_conn.cursor() as cur:
                    cur.execute("SET default_transaction_read_only = on")
            dbapi_conn.commit()
    store.engine.dispose()
    held = [store.engine.connect() for _ in range(3)]
    for conn in held:
        conn.close()
    with pytest.raises(DBAPIError) as exc:
        store.create_key("ci")
    assert "read-only" in storage_fault(exc.value)[1]
    read_only = False
    for _ in range(4):
        store.create_key("ci")


def _alter(store, *statements):
    from sqlalchemy import text

    with store.engine.begin() as conn:
        if store.schema:
            conn.execute(text(f'SET LOCAL search_path TO "{store.schema}"'))
        for sql in statements:
            conn.execute(text(sql))


def _reopened(store):
    with pytest.raises(UserError) as exc:
        Store(store.url, schema=store.schema).close()
    return exc.value.message


def test_a_database_made_by_another_version_is_refused_at_start_up(store):
    """A column the code expects missing gave a 503 on every request that touched it (forever),
    an extra required column a 500 on every insert; a newer schema version is refused outright."""
    from sqlalchemy import Column, MetaData, Text

    from service.store import SCHEMA_VERSION, Base

    assert store._meta("schema_version") == str(SCHEMA_VERSION) == "1"
    _alter(store, "DELETE FROM service_meta")  # as a database from before versions were recorded
    _alter(store, "ALTER TABLE jobs ADD COLUMN note TEXT", "CREATE TABLE extra (x INTEGER NOT NULL)")
    again = Store(store.url, schema=store.schema)  # extra tables and nullable columns are fine
    assert again._meta("schema_version") == "1"
    again.close()

    _alter(store, "UPDATE service_meta SET value = '2' WHERE key = 'schema_version'")
    msg = _reopened(store)
    assert "was made by another llm-prune version: its schema version is 2, this one reads up to 1" in msg, msg
    _alter(store, "UPDATE service_meta SET value = '1' WHERE key = 'schema_version'")

    # A newer version's table with a column it requires and this one cannot fill.
    newer = MetaData(schema=store.schema)
    table = Base.metadata.tables["idempotency_keys"].to_metadata(newer, schema=store.schema)
    table.append_column(Column("scope", Text, nullable=False))
    _alter(store, "DROP TABLE idempotency_keys")
    newer.create_all(store.engine)
    msg = _reopened(store)
    assert "made by another llm-prune version: column idempotency_keys.scope must be set and has no default" in msg
    assert msg.count("\n") == 0
    _alter(store, "DROP TABLE idempotency_keys")
    Store(store.url, schema=store.schema).close()  # made again as this version reads it

    _alter(store, "ALTER TABLE files DROP COLUMN malformed")
    msg = _reopened(store)
    assert msg.startswith(f"the database {store.url} was made by another llm-prune version: column "
                          f"files.malformed is missing (this version reads schema 1)"), msg
