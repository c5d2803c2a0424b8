"""The job store: API keys, uploaded files, jobs and their events, through SQLAlchemy.

SQLite file by default (zero set-up), PostgreSQL by URL. Every state change is one short
transaction; a job is claimed with a conditional UPDATE (status still `queued`), so several
workers can share one database without row locks that SQLite lacks; the job claimed is the oldest
of the owner with the fewest running jobs, so keys share the workers. Admission (count a key's
active jobs, then insert) holds the database's write lock on SQLite (`BEGIN IMMEDIATE`) and a
per-key advisory lock on PostgreSQL, so the per-key limit holds under any concurrency.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import secrets
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from sqlalchemy import (JSON, BigInteger, Boolean, Float, Integer, String, Text, case, create_engine, delete,
                        event, func, inspect, select, update)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from llm_prune.errors import UserError, first_line
from llm_prune.paths import no_room
from service.errors import ConflictError, DatabaseReplaced, StorageQuotaExceeded, read_only

ACTIVE = ("queued", "running")
TERMINAL = ("succeeded", "failed", "cancelled")


class Base(DeclarativeBase):
    pass


class ApiKey(Base):
    __tablename__ = "api_keys"
    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    created_at: Mapped[float] = mapped_column(Float)


class FileRow(Base):
    __tablename__ = "files"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(20))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    records: Mapped[int | None] = mapped_column(Integer, nullable=True)
    malformed: Mapped[int] = mapped_column(Integer, default=0)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class JobRow(Base):
    __tablename__ = "jobs"
    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(40), unique=True, index=True)
    owner: Mapped[str] = mapped_column(String(40), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    model: Mapped[str] = mapped_column(Text)
    request: Mapped[dict] = mapped_column(JSON)
    recipe: Mapped[dict] = mapped_column(JSON)
    stage: Mapped[str | None] = mapped_column(String(64), nullable=True)
    stages_done: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    updated_at: Mapped[float] = mapped_column(Float)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(80), nullable=True)
    lease_expires: Mapped[float | None] = mapped_column(Float, nullable=True, index=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    device: Mapped[str | None] = mapped_column(String(40), nullable=True)


class IdempotencyRow(Base):
    """A client's `Idempotency-Key` for a job it submitted: a retried POST gets that job back."""
    __tablename__ = "idempotency_keys"
    owner: Mapped[str] = mapped_column(String(40), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    body_sha256: Mapped[str] = mapped_column(String(64))
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[float] = mapped_column(Float)


# `Integer` columns are 32-bit on PostgreSQL (64-bit on SQLite): what goes into one is clamped to
# this, and a cursor past it selects what a cursor at it does (no id is larger).
INT_COLUMN_MAX = 2**31 - 1


def _column_int(value) -> int | None:
    return None if value is None else max(-INT_COLUMN_MAX, min(INT_COLUMN_MAX, int(value)))


class EventRow(Base):
    __tablename__ = "job_events"
    # One writer per job (the worker that holds the lease), so ids grow in order within a job.
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[str] = mapped_column(String(40), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(20))
    stage: Mapped[str] = mapped_column(String(64))
    step: Mapped[int] = mapped_column(Integer, default=0)
    total: Mapped[int | None] = mapped_column(Integer, nullable=True)
    message: Mapped[str] = mapped_column(Text, default="")
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)


class MetaRow(Base):
    """Facts about the deployment: `data_dir_id`, the id of the data directory the store serves;
    `schema_version`, the `SCHEMA_VERSION` of the code that made the tables."""
    __tablename__ = "service_meta"
    key: Mapped[str] = mapped_column(String(40), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


# The tables this code reads and writes, recorded in `service_meta` as "schema_version": bump it with
# any change to them that an older version could not read or write.
SCHEMA_VERSION = 1

DATA_DIR_MARKER = ".store-id"  # in the data directory: the id the store has recorded for it

LOCK_TIMEOUT_MS = 30_000  # how long a query waits for a lock before the request gets a 503


# A database behind a network partition leaves the socket open and a call waits forever: these make
# it fail within about 20 s instead (libpq: connecting, unanswered keepalives, unacknowledged data),
# so a worker gets its slot and an API request its 503 back. The lease itself does not depend on
# them: a job process ends when its worker stops renewing (`service.runner._hold_lease`).
PG_NETWORK_TIMEOUTS = {"connect_timeout": 10, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 5,
                       "keepalives_count": 3, "tcp_user_timeout": 20_000}


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _hide_password(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return url


def _sqlite_in_memory(url: str) -> bool:
    try:
        database = make_url(url).database
    except (ArgumentError, ValueError):
        return False  # create_engine says what is wrong with it
    return database in (None, "", ":memory:")


class LimitExceeded(Exception):
    pass


class Store:
    """All queries the service needs. `schema` puts the tables in a PostgreSQL schema."""

    def __init__(self, url: str, schema: str | None = None):
        self.url, self.schema = url, schema
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite") and _sqlite_in_memory(url):
            raise UserError(f"an in-memory SQLite database ({url}) cannot be shared by the API and the workers: "
                            f"give a file, e.g. sqlite:///path/to/jobs.db", param="database_url")
        if url.startswith("sqlite"):
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
            # Connections are cheap but each new one pays the pragmas: keep enough for the API's threads.
            kwargs.update(pool_size=20, max_overflow=20)
        else:
            kwargs["pool_pre_ping"] = True
            if url.startswith("postgresql"):  # a lock held elsewhere fails a request (503) instead of hanging it
                kwargs["connect_args"] = {"options": f"-c lock_timeout={LOCK_TIMEOUT_MS}", **PG_NETWORK_TIMEOUTS}
        try:
            engine = create_engine(url, **kwargs)
        except ImportError as exc:
            raise UserError(f"the database driver for {_hide_password(url)} is not installed: {first_line(exc, 300)}",
                            param="database_url") from None
        except (ArgumentError, ValueError) as exc:  # unparsable URL or port, unknown dialect (NoSuchModuleError)
            raise UserError(f"invalid database URL '{_hide_password(url)}': {first_line(exc, 300)}; expected e.g. "
                            f"sqlite:///path/to/jobs.db or postgresql+psycopg://user:password@host/dbname",
                            param="database_url") from None
        base = engine
        event.listen(engine, "handle_error", _discard_read_only)
        try:
            if url.startswith("sqlite"):
                event.listen(engine, "connect", _sqlite_pragmas)
                with engine.begin() as conn:  # persistent in the file; per connection it would take a lock
                    conn.exec_driver_sql("PRAGMA journal_mode=WAL")
            if schema:
                engine = engine.execution_options(schema_translate_map={None: schema})
            Base.metadata.create_all(engine)
            self.engine = engine
            self.session = sessionmaker(engine, expire_on_commit=False)
            self._check_schema()
        except DatabaseError as exc:  # only here, at start-up: cannot connect, not a database, ...
            base.dispose()
            cause = first_line(exc.orig or exc, 300)
            if url.startswith("sqlite") and (full := _full_disk(base.url.database)):
                cause = f"{full} (SQLite said: {cause})"  # it says "disk I/O error" of a full one
            raise UserError(f"cannot open database {_hide_password(url)}: {cause}", param="database_url") from None
        except UserError:
            base.dispose()
            raise
        if url.startswith("sqlite"):
            _watch_sqlite_file(base)

    def close(self) -> None:
        self.engine.dispose()

    def _check_schema(self) -> None:
        """The tables are the ones this code reads and writes. A database made by another version
        gave a 503 on every request that touched a column it lacks, and a 500 on every insert into a
        table with a required column this code does not fill: refused here, in one line. Extra
        tables and extra columns that may be left empty (nullable or with a default) are accepted.
        A database without a recorded version (new, or from before versions were recorded) gets
        this code's once its tables match."""
        made_by = f"the database {_hide_password(self.url)} was made by another llm-prune version"
        fix = "run the version that made it, or give another database (--db)"
        inspector = inspect(self.engine)
        problem = None
        for table in Base.metadata.sorted_tables:
            found = {c["name"]: c for c in inspector.get_columns(table.name, schema=self.schema)}
            missing = [c.name for c in table.columns if c.name not in found]
            required = [name for name, c in found.items() if name not in table.columns and not c["nullable"]
                        and c.get("default") is None and not c.get("identity") and not c.get("computed")]
            if missing:
                problem = f"column {table.name}.{missing[0]} is missing"
            elif required:
                problem = f"column {table.name}.{required[0]} must be set and has no default, and this version " \
                          f"does not know it"
            if problem:
                break
        try:
            recorded = self._meta("schema_version")
        except DatabaseError:  # service_meta itself does not match: `problem` says how
            recorded = None
        if recorded is not None:
            try:
                version = int(recorded)
            except ValueError:
                raise UserError(f"{made_by}: its schema version {recorded[:40]!r} is not a number; {fix}",
                                param="database_url") from None
            if version > SCHEMA_VERSION:
                raise UserError(f"{made_by}: its schema version is {version}, this one reads up to "
                                f"{SCHEMA_VERSION}; {fix}", param="database_url")
        if problem:
            raise UserError(f"{made_by}: {problem} (this version reads schema {SCHEMA_VERSION}); {fix}",
                            param="database_url")
        if recorded is None:
            try:
                with self.session.begin() as s:
                    s.add(MetaRow(key="schema_version", value=str(SCHEMA_VERSION)))
            except IntegrityError:  # recorded by a process starting beside this one
                pass

    def _meta(self, key: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(MetaRow.value).where(MetaRow.key == key))

    def check_data_dir(self, data_dir: Path) -> None:
        """The store and the data directory belong together: a worker given another directory than
        its server's wrote the checkpoints where the API never looks, and its jobs ended
        `succeeded` with nothing to download. The first start records a random id in the database,
        then in the directory (`.store-id`); every later start must find the same id in both. A
        directory without the file (a deployment from before this check) is adopted; one that has
        it beside a database that records none (emptied, deleted or replaced: it would serve no
        job and no key while the job folders are there) is refused."""
        marker = Path(data_dir) / DATA_DIR_MARKER
        mine = self._read_marker(marker)  # before the database: the marker is written after it
        recorded = self._meta("data_dir_id")
        url = _hide_password(self.url)
        if recorded is None and mine is not None:
            raise UserError(f"the database {url} does not know data directory {data_dir} (the database is new or "
                            f"emptied; the directory's {DATA_DIR_MARKER} {mine} is that of the database it served): "
                            f"restore that database, or point --data-dir (LLM_PRUNE_DATA_DIR) at a new directory",
                            param="data_dir")
        if recorded is None:  # a new store: record an id (another process may win the race), then the directory's
            ours = secrets.token_hex(16)
            try:
                with self.session.begin() as s:
                    s.add(MetaRow(key="data_dir_id", value=ours))
            except IntegrityError:
                pass
            recorded = self._meta("data_dir_id")
            try:
                self._write_marker(marker, recorded)
            except UserError:  # forget the id again: recorded without its marker, the next start would be refused
                with self.session.begin() as s:
                    s.execute(delete(MetaRow).where(MetaRow.key == "data_dir_id", MetaRow.value == ours))
                raise
            mine = self._read_marker(marker)
        if mine != recorded:
            raise UserError(f"data directory {data_dir} is not the one the database {url} serves "
                            f"({DATA_DIR_MARKER} {'differs' if mine else 'is missing'}): a worker must use its "
                            f"server's --data-dir (shared storage) and --db", param="data_dir")

    @staticmethod
    def _read_marker(marker: Path) -> str | None:
        try:
            return marker.read_text(encoding="ascii").strip() or None
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read {marker}: {getattr(exc, 'strerror', None) or exc}", param="data_dir") \
                from None

    @staticmethod
    def _write_marker(marker: Path, value: str) -> None:
        """Writes the marker unless one is there, whole or not at all (linked into place once
        written): a process starting beside this one never reads it half-written, and a failed
        write (a full disk) leaves none behind."""
        tmp = marker.with_name(f"{DATA_DIR_MARKER}.{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "x", encoding="ascii") as fh:
                fh.write(value + "\n")
            try:
                os.link(tmp, marker)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS):
                    raise
                with open(marker, "x", encoding="ascii") as fh:  # a file system without hard links
                    fh.write(value + "\n")
        except FileExistsError:  # written by a process starting beside this one: the caller compares it
            pass
        except OSError as exc:
            raise UserError(f"cannot write {marker}: {exc.strerror or exc}", param="data_dir") from None
        finally:
            tmp.unlink(missing_ok=True)

    # --- API keys -------------------------------------------------------------------------
    def create_key(self, name: str = "") -> tuple[str, str]:
        """Returns (key id, secret); only the hash of the secret is kept."""
        secret = "lp-" + secrets.token_urlsafe(32)
        key_id = new_id("key")
        with self.session.begin() as s:
            s.add(ApiKey(id=key_id, name=name, key_hash=hash_key(secret), created_at=time.time()))
        return key_id, secret

    def key_owner(self, secret: str) -> str | None:
        with self.session() as s:
            return s.scalar(select(ApiKey.id).where(ApiKey.key_hash == hash_key(secret)))

    def list_keys(self) -> list[ApiKey]:
        with self.session() as s:
            return list(s.scalars(select(ApiKey).order_by(ApiKey.created_at)))

    def revoke_key(self, key_id: str) -> bool:
        """The key stops working at once; its jobs and files stay (and stay unreachable by others)."""
        with self.session.begin() as s:
            return s.execute(delete(ApiKey).where(ApiKey.id == key_id)).rowcount > 0

    # --- files ----------------------------------------------------------------------------
    def add_file(self, *, quota: int | None = None, **fields: Any) -> FileRow:
        """Record an upload; with `quota`, only if the owner's uploads stay within it (counted and
        added under the owner's admission lock, so concurrent uploads cannot pass it together)."""
        row = FileRow(created_at=time.time(), **fields)
        with self._admission(fields["owner"]) as s:
            if quota is not None:
                used = self._stored_bytes(s, fields["owner"])
                if used + fields["bytes"] > quota:
                    raise StorageQuotaExceeded(used, fields["bytes"], quota)
            s.add(row)
        return row

    def stored_bytes(self, owner: str) -> int:
        """The bytes of the owner's uploads (what `max_stored_bytes_per_key` limits)."""
        with self.session() as s:
            return self._stored_bytes(s, owner)

    @staticmethod
    def _stored_bytes(s: Session, owner: str) -> int:
        return int(s.scalar(select(func.coalesce(func.sum(FileRow.bytes), 0)).where(FileRow.owner == owner)))

    def get_file(self, owner: str, file_id: str) -> FileRow | None:
        with self.session() as s:
            return s.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.owner == owner))

    def list_files(self, owner: str) -> list[FileRow]:
        with self.session() as s:
            return list(s.scalars(select(FileRow).where(FileRow.owner == owner).order_by(FileRow.seq.desc())))

    def delete_file(self, owner: str, file_id: str, before: Callable[[FileRow], None] | None = None) -> bool:
        """Delete an upload no active job of its owner uses. Under the owner's admission lock, so a
        job submitted meanwhile either sees the file gone or holds it (see `create_job`). `before`
        (removing its content) runs under that lock before the row goes: on a full disk the delete's
        own write needs the space it frees."""
        with self._admission(owner) as s:
            row = s.scalar(select(FileRow).where(FileRow.id == file_id, FileRow.owner == owner))
            if row is None:
                return False
            for job in s.scalars(select(JobRow).where(JobRow.owner == owner, JobRow.status.in_(ACTIVE))):
                r = job.recipe
                if row.path in ((r.get("data") or {}).get("pool"), (r.get("evaluation") or {}).get("ppl"),
                                (r.get("pruning") or {}).get("calibration")):
                    raise ConflictError(f"file {file_id} is used by {job.status} job {job.id}; delete it once the "
                                        "job ends", param="file_id", code="file_in_use")
            if before is not None:
                before(row)
            s.delete(row)
        return True

    # --- jobs -----------------------------------------------------------------------------
    def create_job(self, owner: str, model: str, request: dict, recipe: dict, *, max_attempts: int,
                   max_active: int | None = None, job_id: str | None = None,
                   files: dict[str, str] | None = None, idempotency_key: str | None = None) -> JobRow:
        """Admit a job; `files` ({param: upload id}) must still exist when it is added (an upload
        deleted since the body was checked is refused, not left for the job to miss). With an
        `idempotency_key` the owner used before for the same request, that job is returned instead
        (a client retrying a POST whose answer it lost); for another request, a ConflictError."""
        now = time.time()
        row = JobRow(id=job_id or new_id("job"), owner=owner, status="queued", model=model, request=request,
                     recipe=recipe, metrics={}, created_at=now, updated_at=now, max_attempts=max_attempts,
                     attempts=0, progress=0.0, stages_done=0, cancel_requested=False)
        digest = hashlib.sha256(json.dumps(request, sort_keys=True, default=str).encode()).hexdigest()
        with self._admission(owner) as s:
            if idempotency_key is not None:
                seen = s.get(IdempotencyRow, (owner, idempotency_key))
                earlier = s.scalar(select(JobRow).where(JobRow.id == seen.job_id)) if seen else None
                if earlier is not None and seen.body_sha256 != digest:
                    raise ConflictError("Idempotency-Key was used for another request (a different body); use a "
                                        "new key for a new job", param="Idempotency-Key",
                                        code="idempotency_key_reused")
                if earlier is not None:
                    return earlier
                if seen is not None:  # its job was deleted since: the key starts afresh
                    s.delete(seen)
                    s.flush()
            if max_active is not None:
                self._check_active(s, owner, max_active)
            for param, file_id in (files or {}).items():
                if s.scalar(select(FileRow.id).where(FileRow.id == file_id, FileRow.owner == owner)) is None:
                    raise UserError(f"{param}: no file with id '{file_id}'", param=param, code="file_not_found")
            s.add(row)
            if idempotency_key is not None:
                s.add(IdempotencyRow(owner=owner, key=idempotency_key, body_sha256=digest, job_id=row.id,
                                     created_at=now))
        return row

    @contextmanager
    def _admission(self, owner: str) -> Iterator[Session]:
        """A transaction in which counting `owner`'s active jobs and adding one is atomic: SQLite
        takes its write lock up front (BEGIN IMMEDIATE); PostgreSQL takes a per-key advisory lock
        (a key may have no row to lock: no-auth mode, or a key revoked meanwhile)."""
        with self.engine.connect() as conn:
            if conn.dialect.name == "sqlite":
                conn.exec_driver_sql("BEGIN IMMEDIATE")
            elif conn.dialect.name == "postgresql":
                conn.execute(select(func.pg_advisory_xact_lock(func.hashtextextended(owner, 0))))
            with Session(bind=conn, expire_on_commit=False) as s:
                yield s
                s.flush()
            conn.commit()

    @staticmethod
    def _check_active(s: Session, owner: str, max_active: int) -> None:
        active = s.scalar(select(func.count()).select_from(JobRow)
                          .where(JobRow.owner == owner, JobRow.status.in_(ACTIVE)))
        if active >= max_active:
            raise LimitExceeded(f"{active} jobs are already queued or running for this key "
                                f"(limit {max_active}); wait for one to finish or cancel one")

    def retry_job(self, owner: str, job_id: str, max_active: int | None = None) -> JobRow | None:
        """Queue a failed job again; it resumes after its last finished stage with a fresh attempt
        budget. None if the job is not (or no longer) failed."""
        now = time.time()
        with self._admission(owner) as s:
            if max_active is not None:
                self._check_active(s, owner, max_active)
            won = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.owner == owner,
                                                 JobRow.status == "failed")
                            .values(status="queued", attempts=0, error=None, finished_at=None, updated_at=now,
                                    cancel_requested=False)).rowcount > 0
            if won:
                s.add(EventRow(job_id=job_id, created_at=now, kind="warning", stage="job", metrics={},
                               message="retry requested; the job resumes after its last finished stage"))
        return self.get_job(job_id, owner) if won else None

    def get_job(self, job_id: str, owner: str | None = None) -> JobRow | None:
        q = select(JobRow).where(JobRow.id == job_id)
        if owner is not None:
            q = q.where(JobRow.owner == owner)
        with self.session() as s:
            return s.scalar(q)

    def list_jobs(self, owner: str, after: str | None = None, limit: int = 20) -> tuple[list[JobRow], bool] | None:
        """Newest first; `after` is the id of the last job of the previous page. None when `after`
        is not a job of this owner."""
        with self.session() as s:
            q = select(JobRow).where(JobRow.owner == owner)
            if after is not None:
                cursor = s.scalar(select(JobRow.seq).where(JobRow.id == after, JobRow.owner == owner))
                if cursor is None:
                    return None
                q = q.where(JobRow.seq < cursor)
            rows = list(s.scalars(q.order_by(JobRow.seq.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def active_jobs(self, owner: str) -> list[JobRow]:
        with self.session() as s:
            return list(s.scalars(select(JobRow).where(JobRow.owner == owner, JobRow.status.in_(ACTIVE))))

    def request_cancel(self, owner: str, job_id: str) -> tuple[JobRow | None, bool]:
        """A queued job is cancelled at once; a running one is flagged for its worker to stop (and
        ends `cancelled` even if its last stage completes meanwhile, see `finish`). Returns (job,
        whether the request took effect): False for a job that already ended."""
        now = time.time()
        with self.session.begin() as s:
            hit = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.owner == owner,
                                                 JobRow.status == "queued")
                            .values(status="cancelled", finished_at=now, updated_at=now)).rowcount
            hit += s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.owner == owner,
                                                  JobRow.status == "running")
                             .values(cancel_requested=True, updated_at=now)).rowcount
        row = self.get_job(job_id, owner)
        return row, bool(hit) or (row is not None and row.status == "cancelled")

    def delete_job(self, owner: str, job_id: str, before: Callable[[], None] | None = None) -> bool:
        """Delete a job that is not running. `before` (removing its files) runs once the row is
        deleted but not yet committed (no worker can claim it meanwhile): on a full disk the commit
        needs the space it frees."""
        with self.session.begin() as s:
            gone = s.execute(delete(JobRow).where(JobRow.id == job_id, JobRow.owner == owner,
                                                  JobRow.status.not_in(("running",)))).rowcount > 0
            if gone:
                if before is not None:
                    before()
                s.execute(delete(EventRow).where(EventRow.job_id == job_id))
                s.execute(delete(IdempotencyRow).where(IdempotencyRow.job_id == job_id))
        return gone

    # --- worker side ----------------------------------------------------------------------
    def claim(self, worker_id: str, device: str, lease_s: float) -> JobRow | None:
        """Take the next queued job, fairly between keys: the oldest queued job of the owner with
        the fewest running jobs (ties by age), so one key's long jobs cannot hold every worker slot
        while another key's job waits. The conditional UPDATE makes racing workers safe."""
        running = (select(JobRow.owner, func.count().label("n")).where(JobRow.status == "running")
                   .group_by(JobRow.owner).subquery())
        pick = (select(JobRow.id).outerjoin(running, running.c.owner == JobRow.owner)
                .where(JobRow.status == "queued")
                .order_by(func.coalesce(running.c.n, 0), JobRow.seq).limit(1))
        for _ in range(5):
            with self.session() as s:
                job_id = s.scalar(pick)
            if job_id is None:
                return None
            with self.session.begin() as s:
                now = self._lease_clock(s)
                won = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.status == "queued")
                                .values(status="running", lease_owner=worker_id, lease_expires=now + lease_s,
                                        attempts=JobRow.attempts + 1, device=device, updated_at=now,
                                        started_at=func.coalesce(JobRow.started_at, now))).rowcount
            if won:
                return self.get_job(job_id)
        return None

    def heartbeat(self, job_id: str, worker_id: str, lease_s: float) -> tuple[bool, bool]:
        """Extends the lease; returns (still ours, cancel requested)."""
        with self.session.begin() as s:
            now = self._lease_clock(s)
            owned = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker_id,
                                                   JobRow.status == "running")
                              .values(lease_expires=now + lease_s)).rowcount > 0
            cancel = bool(s.scalar(select(JobRow.cancel_requested).where(JobRow.id == job_id)))
        return owned, cancel

    def record(self, job_id: str, worker_id: str, events: Iterable[dict], **job_fields: Any) -> bool:
        """Append events and update the job's progress fields, if the lease is still ours. Progress
        never goes back: a resumed attempt restarts its stage's count, not the job's."""
        now = time.time()
        job_fields, events = storable(job_fields), storable(list(events))
        if job_fields.get("progress") is not None:
            value = job_fields["progress"]
            job_fields["progress"] = case((JobRow.progress > value, JobRow.progress), else_=value)
        with self.session.begin() as s:
            owned = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker_id,
                                                   JobRow.status == "running")
                              .values(updated_at=now, **job_fields)).rowcount > 0
            if owned:
                for e in events:
                    s.add(EventRow(job_id=job_id, created_at=e.get("time", now), kind=e.get("kind", "progress"),
                                   stage=e.get("stage", ""), step=_column_int(e.get("step") or 0),
                                   total=_column_int(e.get("total")),
                                   message=e.get("message", ""), metrics=e.get("metrics") or {}))
        return owned

    def finish(self, job_id: str, worker_id: str, status: str, *, result: dict | None = None,
               error: dict | None = None, events: Iterable[dict] = ()) -> bool:
        assert status in TERMINAL
        fields: dict[str, Any] = {"status": status, "finished_at": time.time(), "lease_owner": None,
                                  "lease_expires": None, "result": result, "error": error}
        if status == "succeeded":
            # A cancel accepted while the last stage was completing still wins: the client was told
            # it would stop, so the job ends `cancelled` (its published checkpoints stay listed).
            fields["status"] = case((JobRow.cancel_requested, "cancelled"), else_="succeeded")
        return self.record(job_id, worker_id, events, **fields)

    def requeue(self, job_id: str, worker_id: str, reason: str) -> str | None:
        """The job's process died (signal, OOM): queue it again to resume, or fail it once its
        attempts are used up; the reason goes to its events. Returns the new status (None if the
        lease was no longer ours)."""
        job = self.get_job(job_id)
        if job is None:
            return None
        now, reason = time.time(), storable(reason)
        if job.attempts >= job.max_attempts:
            status = "failed"
            message = f"{reason}; gave up after {job.attempts} attempts"
            fields: dict[str, Any] = {"finished_at": now, "error": {"message": message, "type": "server_error",
                                                                    "param": None, "code": "job_process_died"}}
        else:
            status, fields = "queued", {}
            message = f"{reason}; retrying (attempt {job.attempts} of {job.max_attempts} used)"
        with self.session.begin() as s:
            if self._cancel_run(s, job_id, worker_id, now, f"{reason}; the job was being cancelled: cancelled"):
                return "cancelled"
            won = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker_id,
                                                 JobRow.status == "running")
                            .values(status=status, lease_owner=None, lease_expires=None, updated_at=now,
                                    **fields)).rowcount > 0
            if won:
                s.add(EventRow(job_id=job_id, created_at=now, kind="warning", stage=job.stage or "job",
                               message=message, metrics={"status": status}))
        return status if won else None

    def _cancel_run(self, s: Session, job_id: str, worker_id: str, now: float, message: str) -> bool:
        """A run that ends without an outcome (its process died, its worker shut down) of a job whose
        cancel was accepted ends the job `cancelled`: queued again, it would run once more against
        what the client was told."""
        won = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker_id,
                                             JobRow.status == "running", JobRow.cancel_requested.is_(True))
                        .values(status="cancelled", finished_at=now, lease_owner=None, lease_expires=None,
                                updated_at=now)).rowcount > 0
        if won:
            stage = s.scalar(select(JobRow.stage).where(JobRow.id == job_id))
            s.add(EventRow(job_id=job_id, created_at=now, kind="warning", stage=stage or "job", message=message,
                           metrics={"status": "cancelled"}))
        return won

    def release(self, job_id: str, worker_id: str) -> bool:
        """A worker shutting down hands its job back (or ends it `cancelled` if a cancel was accepted);
        the attempt does not count, and the events say so (the next start reads as the same attempt
        again)."""
        now = time.time()
        with self.session.begin() as s:
            if self._cancel_run(s, job_id, worker_id, now, "the worker shut down while the job was being "
                                                             "cancelled; job cancelled"):
                return True
            won = s.execute(update(JobRow).where(JobRow.id == job_id, JobRow.lease_owner == worker_id,
                                                 JobRow.status == "running")
                            .values(status="queued", lease_owner=None, lease_expires=None, updated_at=now,
                                    attempts=JobRow.attempts - 1)).rowcount > 0
            if won:
                stage = s.scalar(select(JobRow.stage).where(JobRow.id == job_id))
                s.add(EventRow(job_id=job_id, created_at=now, kind="warning", stage=stage or "job", metrics={},
                               message="the worker shut down; job handed back, it resumes after its last "
                                       "finished stage (the attempt does not count)"))
        return won

    def requeue_expired(self) -> list[tuple[str, str]]:
        """Jobs whose worker stopped heartbeating: requeue (they resume from their last finished
        stage), or fail once the retry limit is used up. Returns [(job id, new status)]."""
        changed: list[tuple[str, str]] = []
        with self.session() as s:
            now = self._lease_clock(s)
            stale = list(s.scalars(select(JobRow).where(JobRow.status == "running", JobRow.lease_expires < now)))
        for job in stale:
            if job.cancel_requested:
                status, fields = "cancelled", {"finished_at": now}
                message = "worker lost while cancelling; job cancelled"
            elif job.attempts >= job.max_attempts:
                status = "failed"
                message = f"worker stopped responding; gave up after {job.attempts} attempts"
                fields = {"finished_at": now, "error": {"message": message, "type": "server_error",
                                                        "param": None, "code": "worker_lost"}}
            else:
                status, fields = "queued", {}
                message = f"worker stopped responding; requeued (attempt {job.attempts} of {job.max_attempts})"
            with self.session.begin() as s:
                won = s.execute(update(JobRow).where(JobRow.id == job.id, JobRow.status == "running",
                                                     JobRow.lease_expires < now)
                                .values(status=status, lease_owner=None, lease_expires=None, updated_at=now,
                                        **fields)).rowcount > 0
                if won:
                    s.add(EventRow(job_id=job.id, created_at=now, kind="warning", stage=job.stage or "",
                                   message=message, metrics={}))
            if won:
                changed.append((job.id, status))
        return changed

    def _lease_clock(self, s: Session) -> float:
        """The time leases are written and compared in: the database's on PostgreSQL, so workers on
        machines whose clocks disagree agree on when a lease expires (one running ahead by more than
        the lease requeued every other worker's healthy jobs). SQLite is a file on one machine: its
        clock is everyone's."""
        if self.engine.dialect.name == "postgresql":
            return float(s.scalar(select(func.extract("epoch", func.clock_timestamp()))))
        return time.time()

    def list_events(self, job_id: str, after: int | None = None, limit: int = 100) -> tuple[list[EventRow], bool]:
        q = select(EventRow).where(EventRow.job_id == job_id)
        if after is not None:
            q = q.where(EventRow.id > min(after, INT_COLUMN_MAX))
        with self.session() as s:
            rows = list(s.scalars(q.order_by(EventRow.id).limit(limit + 1)))
        return rows[:limit], len(rows) > limit


def storable(value: Any) -> Any:
    """What a worker writes, made storable in every database: NaN and Infinity (a diverged loss;
    not JSON, which PostgreSQL refuses) become null, and a NUL character (PostgreSQL text cannot hold
    one; it can come from an exception quoting its input) becomes U+FFFD."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {storable(k): storable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [storable(v) for v in value]
    return value


def _full_disk(database: str | None) -> str | None:
    """What is full on the file system holding a SQLite database file, or None."""
    if not database or database.startswith("file:"):
        return None
    folder = Path(os.path.abspath(database)).parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    room = no_room(folder)
    return f"the disk holding {folder} is full ({room})" if room else None


def _discard_read_only(ctx) -> None:
    """A connection that refuses writes is discarded, with every pooled one opened before it: a
    SQLite connection opened while its file was read-only stays read-only, and every write failed
    long after the permissions were restored; a PostgreSQL connection to a standby after a failover
    gets the new primary."""
    if read_only(ctx.original_exception):
        ctx.is_disconnect = True


def _watch_sqlite_file(engine) -> None:
    """Refuses every connection once the database file is not the one opened here: removed, pooled
    connections went on writing to the unlinked file (200s for work that was gone) and a new one
    made an empty database in its place; replaced, they would serve another database. Checked
    before a connection is made and each time one is taken from the pool (a stat: microseconds)."""
    database = engine.url.database
    if not database or database.startswith("file:") or engine.url.query.get("uri"):
        return  # a URI filename: not a plain path to watch
    path = os.path.abspath(database)
    st = os.stat(path)
    opened = (st.st_dev, st.st_ino)

    def check(*_args) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise DatabaseReplaced(f"the job database file {path} was removed") from None
        except OSError:
            return  # cannot tell (e.g. no search permission on its directory): SQLite says what is wrong
        if (st.st_dev, st.st_ino) != opened:
            raise DatabaseReplaced(f"the job database file {path} was replaced by another file")

    event.listen(engine, "do_connect", check)  # before SQLite would create an empty file in its place
    event.listen(engine, "checkout", check)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    # WAL (set once per file) lets the API read while a worker writes; busy_timeout waits out
    # short write locks.
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout={LOCK_TIMEOUT_MS}")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.close()
