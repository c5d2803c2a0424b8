"""Errors a user can cause. The CLI prints the message on one line and exits non-zero;
the API maps it to a 4xx error object. Anything else is a bug and keeps its traceback."""


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
