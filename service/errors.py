"""Service-side user errors beyond `llm_prune.errors`."""

from llm_prune.errors import UserError


class ConflictError(UserError):
    """The request is valid but the resource's state forbids it (HTTP 409)."""


class PayloadTooLarge(UserError):
    """An upload over the size limit (HTTP 413)."""
