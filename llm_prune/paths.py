"""Checks on paths a user names for output, made before any work (no heavy imports: the job
client uses them too)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from llm_prune.errors import NOT_UTF8, UserError, shown_text

STAGING = ".partial"  # a checkpoint is written here inside its output folder, then renamed into place


def check_utf8(path: str | Path, param: str, label: str) -> None:
    """A name in another encoding (kept by Python as surrogates) cannot be written into the JSON and
    text files that record where outputs went: refused before the work, not after it."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{label} {shown_text(str(path))} {NOT_UTF8}", param=param) from None


def check_output_dir(path: str | Path, param: str = "output", label: str = "output") -> Path:
    """Fail before any work unless PATH is a directory or can be created as one: nothing on its way
    may be an existing file (or a dangling link), and the nearest existing folder must be writable.
    Returns the path to use (`~` expanded, as inputs are)."""
    check_utf8(path, param, label)
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
    file system refuses, in a folder that exists or can be created. Returns the path to use."""
    check_utf8(path, param, label)
    out = Path(path).expanduser()
    try:
        is_dir = out.is_dir()
    except (OSError, ValueError) as exc:  # a name longer than the file system takes, a NUL byte
        raise UserError(f"{label} {str(path)[:80]!r} is not usable: {getattr(exc, 'strerror', None) or exc}",
                        param=param) from None
    if is_dir:
        raise UserError(f"{label} {path} is a directory; give a file name", param=param)
    check_replaceable_file(out, param=param, label=label)
    check_output_dir(out.parent, param=param, label=label)
    return out


def check_replaceable_file(out: Path, param: str = "output", label: str = "output") -> None:
    """Outputs are written beside and renamed over: over a device or a pipe that would replace the
    node itself (as root, /dev/null), and over a link to nothing or a loop of links, the link."""
    if out.is_symlink() and not out.exists():
        raise UserError(f"{label} {out} is a link to nothing (or a loop of links); give a file name", param=param)
    if out.exists() and not out.is_file():
        raise UserError(f"{label} {out} is not a regular file (a device or a pipe); give a file name", param=param)


def make_dir(path: str | Path, param: str = "output", label: str = "output") -> Path:
    """mkdir -p, where a folder the checks could not foresee refusing it (/proc, /sys, a race) is
    one line rather than a traceback."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{label} {path} cannot be created: a file is in its way", param=param) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise  # the disk, not the path: reported as such
        raise UserError(f"{label} {path} cannot be created: {exc.strerror or exc}", param=param) from None
    return path


DISK_NEARLY_FULL = 64 * 2**20  # bytes free below which a failed write without a reason is the disk


def no_room(path: str | Path) -> str | None:
    """How the file system holding `path` is (nearly) full for its user ("12 KiB free", "no free
    inodes"), or None when it has room or cannot be asked."""
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    if st.f_bavail * st.f_frsize < DISK_NEARLY_FULL:
        return f"{st.f_bavail * st.f_frsize // 1024} KiB free"
    if st.f_files and not st.f_favail:
        return "no free inodes"
    return None


def nearly_full(path: str | Path) -> bool:
    """Whether the file system holding `path` has (nearly) no space left for its user."""
    return no_room(path) is not None


def full_disk(exc: OSError, path: str | Path) -> OSError | None:
    """`exc` as the full disk it is (ENOSPC, which the CLI reports in one line, exit status 1), or
    None when it is something else. Writers in C report a short write without the OS's errno (numpy's
    `tofile`, under gguf-py: "8192 requested and 8096 written"): that one is the disk when the disk
    holding `path` is indeed (nearly) full."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return exc
    if exc.errno is None and nearly_full(Path(path).parent if not Path(path).is_dir() else path):
        full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        full.__cause__ = exc
        return full
    return None


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
