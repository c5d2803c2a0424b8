"""Uploaded files: a recovery pool (any format `data_selection.pool` reads) or an evaluation text.
Format is checked on upload so a bad file fails at once, with the line at fault, rather than
an hour into a job."""

from __future__ import annotations

from pathlib import Path

from llm_prune.errors import UserError
from service.errors import shown

PURPOSES = ("recovery", "eval")


def validate_pool(path: Path, filename: str) -> tuple[int, int]:
    """Reads the pool the way a job will (`data_selection.pool.load_pool`); returns (usable records,
    malformed records). A file with no usable record is refused, naming its first problem."""
    from data_selection.pool import FILE_SUFFIXES, load_pool

    if Path(filename).suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"recovery pool '{filename}' must be one of {', '.join(FILE_SUFFIXES)}", param="file")
    try:
        load = load_pool(path)
    except UserError as exc:  # the loader names the server-side path; the user knows the upload's name
        raise UserError(exc.message.replace(str(path), filename), param="file") from None
    return len(load.records), len(load.errors)


def validate_text(path: Path, filename: str) -> None:
    try:
        with open(path, encoding="utf-8") as fh:
            nonblank = any(line.strip() for line in fh)
    except UnicodeDecodeError:
        raise UserError(f"{filename}: evaluation text must be UTF-8", param="file") from None
    if not nonblank:
        raise UserError(f"{filename}: evaluation text is empty", param="file")


def validate_upload(path: Path, filename: str, purpose: str) -> tuple[int | None, int]:
    """Returns (records, malformed records) for a pool, (None, 0) for a text."""
    if purpose not in PURPOSES:
        raise UserError(f"purpose must be one of {', '.join(PURPOSES)}, got '{shown(purpose)}'", param="purpose")
    if purpose == "recovery":
        return validate_pool(path, filename)
    validate_text(path, filename)
    return None, 0
