"""Uploaded files: a recovery pool (any format `data_selection.pool` reads) or an evaluation text.
Format is checked on upload so a bad file fails at once, with the line at fault, rather than
an hour into a job."""

from __future__ import annotations

from pathlib import Path

from llm_prune.errors import UserError
from service.errors import shown

PURPOSES = ("recovery", "eval")


# A pool's records may hold this many characters per byte uploaded: text files hold one or less,
# compressed Parquet a few; a Parquet file of a few hundred bytes can decode to gigabytes.
TEXT_PER_UPLOADED_BYTE = 16


def validate_pool(path: Path, filename: str, uploaded: int) -> tuple[int, int]:
    """Reads the pool the way a job will (`data_selection.pool.iter_records`), one record at a time;
    returns (usable records, malformed records). A file with no usable record is refused, naming its
    first problem, and so is one whose records decode to more text than TEXT_PER_UPLOADED_BYTE allows."""
    from data_selection.pool import FILE_SUFFIXES, iter_records, no_usable_records

    if Path(filename).suffix.lower() not in FILE_SUFFIXES:
        raise UserError(f"recovery pool '{filename}' must be one of {', '.join(FILE_SUFFIXES)}", param="file")
    good = bad = chars = 0
    first = None
    limit = TEXT_PER_UPLOADED_BYTE * uploaded
    try:
        for location, record in iter_records(path):
            if isinstance(record, str):
                bad += 1
                first = first or (location, record)
                continue
            good += 1
            chars += len(record.prompt) + len(record.response) + len(record.system)
            if chars > limit:
                raise UserError(f"{filename}: its records decode to more than {TEXT_PER_UPLOADED_BYTE} characters "
                                f"per byte uploaded ({uploaded:,} bytes); upload the text less compressed",
                                param="file")
        if not good:
            raise no_usable_records(path, bad, first)
    except UserError as exc:  # the loader names the server-side path; the user knows the upload's name
        raise UserError(exc.message.replace(str(path), filename), param="file") from None
    return good, bad


def validate_text(path: Path, filename: str) -> None:
    try:
        with open(path, encoding="utf-8") as fh:
            nonblank = any(line.strip() for line in fh)
    except UnicodeDecodeError:
        raise UserError(f"{filename}: evaluation text must be UTF-8", param="file") from None
    if not nonblank:
        raise UserError(f"{filename}: evaluation text is empty", param="file")


def validate_upload(path: Path, filename: str, purpose: str, uploaded: int) -> tuple[int | None, int]:
    """Returns (records, malformed records) for a pool, (None, 0) for a text."""
    if purpose not in PURPOSES:
        raise UserError(f"purpose must be one of {', '.join(PURPOSES)}, got '{shown(purpose)}'", param="purpose")
    if purpose == "recovery":
        return validate_pool(path, filename, uploaded)
    validate_text(path, filename)
    return None, 0


# Recipe fields that hold the server path of an upload, and where the job's request named its file id.
FILE_FIELDS = ((("data", "pool"), ("data", "file_id")), (("evaluation", "ppl"), ("evaluation", "ppl")),
               (("pruning", "calibration"), ("pruning", "calibration")))


def missing_uploads(recipe: dict, request: dict) -> list[tuple[str, str | None]]:
    """(request parameter, file id) of each upload a job's recipe uses whose content is no longer on
    the server (removed there, behind the API, which refuses to delete a file an active job uses)."""
    missing = []
    for (section, key), (req_section, req_key) in FILE_FIELDS:
        path = ((recipe or {}).get(section) or {}).get(key)
        if path and not Path(path).is_file():
            missing.append((f"{req_section}.{req_key}", ((request or {}).get(req_section) or {}).get(req_key)))
    return missing
