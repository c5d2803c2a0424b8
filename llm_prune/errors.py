"""Errors a user can cause. The CLI prints the message on one line and exits non-zero;
the API maps it to a 4xx error object. Anything else is a bug and keeps its traceback, but for
a full disk (`disk_full`), which is the machine's and said in one line too."""

import errno


NOT_UTF8 = "is not UTF-8 text (bytes of another encoding?); give it in UTF-8"


def shown_text(text: str, limit: int = 80) -> str:
    """`text` as one printable line: the bytes an argument had (Python keeps each byte that is not
    UTF-8 as a surrogate), escaped."""
    try:
        raw = text[:limit].encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no byte stands for (a JSON `\ud800` escape)
        raw = text[:limit].encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace").replace("\n", "\\n").replace("\r", "\\r")


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type's name when it has none), for a
    one-line error that quotes a library's reason."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:limit]


class UserError(Exception):
    """A problem with what the user asked for; the message says what to do."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request"):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class NotFoundError(UserError):
    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message, param=param, code="not_found")


# How writers that are not Python's own file objects report a full disk: safetensors (Rust's
# io::Error text) and C libraries' strerror.
_FULL_DISK = ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122")


def disk_full(exc: BaseException | None) -> str | None:
    """Where the disk filled up (the file, or "while writing"), if that is what `exc` (or an error
    it was raised from) says; None for anything else. The CLI and the job service's runner both
    say a full disk by it."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return str(exc.filename or "while writing")
        try:
            said = str(exc)
        except Exception:  # noqa: BLE001 - an exception whose __str__ raises says nothing of the disk
            said = ""
        if any(text in said for text in _FULL_DISK):
            return "while writing"
        exc = exc.__cause__ or exc.__context__
    return None
