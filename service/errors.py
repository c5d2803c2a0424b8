"""Service-side user errors beyond `llm_prune.errors`, and the server faults that are not bugs."""

import errno

from llm_prune.errors import UserError


class ConflictError(UserError):
    """The request is valid but the resource's state forbids it (HTTP 409)."""


class GoneError(UserError):
    """What the request names existed but was removed on the server, for good (HTTP 410): the
    client did nothing wrong, and asking again will not bring it back."""


class PayloadTooLarge(UserError):
    """An upload over the size limit (HTTP 413)."""


class StorageQuotaExceeded(PayloadTooLarge):
    """An upload that would take a key's uploads past `max_stored_bytes_per_key` (HTTP 413)."""

    def __init__(self, used: int, size: int, limit: int, declared: bool = False):
        what = f"a request body of {size:,} bytes" if declared else f"{size:,} more bytes"
        super().__init__(f"storage quota exceeded: this key's uploads take {used:,} bytes, and {what} would pass its "
                         f"limit of {limit:,} bytes (max_stored_bytes_per_key); delete files it no longer needs "
                         "(DELETE /v1/files/{id})", param="file", code="storage_quota_exceeded")
        self.used, self.limit = used, limit


class RangeError(UserError):
    """A `Range` the resource cannot satisfy (HTTP 416, with `Content-Range: bytes */size`)."""

    def __init__(self, message: str, size: int):
        super().__init__(message, param="Range", code="range_not_satisfiable")
        self.size = size


class DatabaseReplaced(Exception):
    """The job database's file is not the one the server opened: removed (its connections would go
    on writing to a file no one will read) or replaced (another database under the same name)."""


RETRY_AFTER = "10"  # seconds a client is asked to wait when storage is unavailable


def shown(value: str, limit: int = 80) -> str:
    """A client's value as an error message quotes it: cut short, so a 60 KB field or id is not
    sent back whole."""
    value = str(value)
    return value if len(value) <= limit else value[:limit] + f"... ({len(value):,} characters)"


def _storage_errors() -> tuple[type[BaseException], ...]:
    from sqlalchemy.exc import DBAPIError, DisconnectionError

    return OSError, DBAPIError, DisconnectionError, DatabaseReplaced


STORAGE_ERRORS = _storage_errors()  # the exception types `storage_fault` may recognise


def storage_fault(exc: BaseException) -> tuple[int, str, str] | None:
    """(status, message, code) when `exc` is the server's storage failing rather than a bug: 507
    while its disk is full, 503 while the job database is locked, unreachable or read-only, or its
    file was removed or replaced. None otherwise."""
    from sqlalchemy.exc import DBAPIError, DisconnectionError, InterfaceError, OperationalError

    full = (507, "the server's disk is full; try again later", "insufficient_storage")
    if isinstance(exc, DatabaseReplaced):
        return 503, ("the job database file was removed or replaced; the operator must restore it and restart "
                     "the server"), "store_unavailable"
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return full
    if isinstance(exc, DBAPIError) and read_only(exc.orig):
        return 503, ("the job database is read-only (the permissions of its file or directory, or a read-only "
                     "file system); the operator must make it writable"), "store_unavailable"
    if isinstance(exc, (OperationalError, InterfaceError, DisconnectionError)) or (
            isinstance(exc, DBAPIError) and exc.connection_invalidated):
        if "full" in str(getattr(exc, "orig", None) or exc).lower():  # SQLite's "database or disk is full"
            return full
        return 503, "the job database is busy or unreachable; try again shortly", "store_unavailable"
    if isinstance(exc, DBAPIError) and _missing_table(exc):  # the database was replaced behind the server
        # A restart alone is refused (`Store.check_data_dir`): the data directory knows another database.
        return 503, "the job database has lost its tables; the operator must restore it and restart the server", \
            "store_unavailable"
    return None


def read_only(orig: BaseException | None) -> bool:
    """A driver's error saying the database refuses writes: SQLite's "attempt to write a readonly
    database" (its file, directory or file system read-only when the connection opened it: the
    connection stays read-only after that is fixed), PostgreSQL's read_only_sql_transaction (a
    standby, e.g. after a failover)."""
    return getattr(orig, "sqlstate", None) == "25006" or "readonly database" in str(orig).lower()


def _missing_table(exc) -> bool:
    orig = getattr(exc, "orig", None)
    return getattr(orig, "sqlstate", None) == "42P01" or "no such table" in str(orig or exc).lower()
