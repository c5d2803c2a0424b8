"""Service-side user errors beyond `llm_prune.errors`."""

from llm_prune.errors import UserError


class ConflictError(UserError):
    """The request is valid but the resource's state forbids it (HTTP 409)."""


class PayloadTooLarge(UserError):
    """An upload over the size limit (HTTP 413)."""


class RangeError(UserError):
    """A `Range` the resource cannot satisfy (HTTP 416, with `Content-Range: bytes */size`)."""

    def __init__(self, message: str, size: int):
        super().__init__(message, param="Range", code="range_not_satisfiable")
        self.size = size
