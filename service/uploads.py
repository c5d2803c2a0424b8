"""Uploaded files: a recovery pool (JSON Lines or a JSON array of records) or an evaluation text.
Format is checked on upload so a bad file fails at once, with the line at fault, rather than
an hour into a job."""

from __future__ import annotations

import json
from pathlib import Path

from llm_prune.errors import UserError

PURPOSES = ("recovery", "eval")
# Record fields the recovery-data readers understand (instruction data, chat turns, plain text).
TEXT_FIELDS = ("instruction", "output", "input", "text", "conversations", "messages", "prompt", "response")


def _check_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise UserError(f"{where}: a record must be a JSON object, got {type(record).__name__}", param="file")
    if not any(k in record for k in TEXT_FIELDS):
        raise UserError(f"{where}: record has none of the fields {', '.join(TEXT_FIELDS)}", param="file")


def validate_pool(path: Path, filename: str) -> int:
    """Returns the number of records; raises UserError naming the first bad line."""
    suffix = Path(filename).suffix.lower()
    if suffix not in (".jsonl", ".json"):
        raise UserError(f"recovery pool '{filename}' must be .jsonl (one JSON record per line) or .json "
                        f"(an array of records)", param="file")
    try:
        if suffix == ".json":
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise UserError(f"{filename}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
                                param="file") from None
            if not isinstance(data, list):
                raise UserError(f"{filename}: expected a JSON array of records at the top level", param="file")
            for i, rec in enumerate(data):
                _check_record(rec, f"{filename}: record {i}")
            count = len(data)
        else:
            count = 0
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise UserError(f"{filename}: line {lineno} is not valid JSON: {exc.msg} "
                                        f"(column {exc.colno})", param="file") from None
                    _check_record(rec, f"{filename}: line {lineno}")
                    count += 1
    except UnicodeDecodeError:
        raise UserError(f"{filename}: not UTF-8 text", param="file") from None
    if count == 0:
        raise UserError(f"{filename}: no records", param="file")
    return count


def validate_text(path: Path, filename: str) -> None:
    try:
        with open(path, encoding="utf-8") as fh:
            nonblank = any(line.strip() for line in fh)
    except UnicodeDecodeError:
        raise UserError(f"{filename}: evaluation text must be UTF-8", param="file") from None
    if not nonblank:
        raise UserError(f"{filename}: evaluation text is empty", param="file")


def validate_upload(path: Path, filename: str, purpose: str) -> int | None:
    if purpose not in PURPOSES:
        raise UserError(f"purpose must be one of {', '.join(PURPOSES)}, got '{purpose}'", param="purpose")
    if purpose == "recovery":
        return validate_pool(path, filename)
    validate_text(path, filename)
    return None
