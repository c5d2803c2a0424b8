"""Checks on paths a user names for output, made before any work (no heavy imports: the job
client uses them too)."""

from __future__ import annotations

import os
from pathlib import Path

from llm_prune.errors import UserError


def check_output_dir(path: str | Path, param: str = "output", label: str = "output") -> Path:
    """Fail before any work unless PATH is a directory or can be created as one: nothing on its way
    may be an existing file (or a dangling link), and the nearest existing folder must be writable."""
    out = Path(path).expanduser()
    try:
        if out.exists():
            if not out.is_dir():
                raise UserError(f"{label} {path} is a file, not a directory", param=param)
            existing = out
        else:
            existing = None
            for p in (out, *out.parents):
                if p.exists():
                    if not p.is_dir():
                        raise UserError(f"{label} {path} cannot be created: {p} is a file, not a directory",
                                        param=param)
                    existing = p
                    break
                if p.is_symlink():
                    raise UserError(f"{label} {path} cannot be created: {p} is a link to nothing", param=param)
            existing = existing or Path.cwd()
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte, a loop of links
        raise UserError(f"{label} {str(path)[:80]!r} is not usable: {getattr(exc, 'strerror', None) or exc}",
                        param=param) from None
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{label} {path} cannot be written: no write permission in {existing}", param=param)
    return out


def check_output_file(path: str | Path, param: str = "output", label: str = "output") -> Path:
    """Fail before any work unless PATH can be written as a file: not a directory, not a name the
    file system refuses, in a folder that exists or can be created."""
    out = Path(path).expanduser()
    try:
        is_dir = out.is_dir()
    except (OSError, ValueError) as exc:  # a name longer than the file system takes, a NUL byte
        raise UserError(f"{label} {str(path)[:80]!r} is not usable: {getattr(exc, 'strerror', None) or exc}",
                        param=param) from None
    if is_dir:
        raise UserError(f"{label} {path} is a directory; give a file name", param=param)
    check_output_dir(out.parent, param=param, label=label)
    return out


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` so that a reader (or a rerun after a crash or a full disk) finds the old
    content or the new, never a cut-off file: a temporary file beside it, flushed, then renamed over."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
