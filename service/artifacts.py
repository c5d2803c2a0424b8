"""Published checkpoints of a job: file manifests with sha256, and the whole directory as a
streamed, byte-reproducible `.tar` (fixed order, mtime and owner), so its sha256 is known before
the download starts, a client can check what it got, and any byte range of it can be served
(a broken download resumes with `Range`). A checkpoint is published once its stage is finished
(the pipeline's `.done` marker), while the job may still run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

from service.ranges import file_chunks

CHECKPOINTS = ("pruned", "final")
CHUNK = 1024 * 1024


def run_dir(job_dir: Path) -> Path:
    """Where the pipeline writes its stage outputs (and resumes from)."""
    return job_dir / "run"


def checkpoint_dir(job_dir: Path, name: str) -> Path:
    return run_dir(job_dir) / name


def checkpoint_files(root: Path) -> list[str]:
    """Relative paths of the files a checkpoint publishes; stage markers (dotfiles) are internal."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if not f.startswith("."):
                out.append(str((Path(dirpath) / f).relative_to(root)))
    return sorted(out)


def scrub(value, data_dir: Path):
    """Server paths out of what the API shows: a path under the data directory becomes its name
    relative to the job's run directory (`pruned`, `final/config.json`), or is dropped."""
    root = str(data_dir)
    if isinstance(value, str):
        if root not in value:
            return value
        return re.sub(re.escape(root) + r"/jobs/[^/\s'\"]+/run/?", "", value).replace(root, "<data>")
    if isinstance(value, dict):
        return {k: scrub(v, data_dir) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v, data_dir) for v in value]
    return value


# The checkpoint files, at any depth, that may quote the job's recipe or its own folder
# (transformers' `_name_or_path`, the model card, the plan, a kept adapter's
# `base_model_name_or_path`); weights and tokenizers never do.
_QUOTING = ("config.json", "README.md", "plan.json", "eval_results.json", "generation_config.json",
            "adapter_config.json")


def _scrub_files(root: Path, data_dir: Path) -> None:
    """Server paths out of a checkpoint before it is published, as out of everything else the API
    shows. Written under a new inode: a file linked into another stage's folder keeps its own."""
    for name in checkpoint_files(root):
        if Path(name).name not in _QUOTING:
            continue
        path = root / name
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        clean = scrub(scrub(text, data_dir), data_dir.resolve())  # as configured, and as a job saw it
        if clean != text:  # two requests may publish at once: each writes its own temporary file
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(clean)
            os.chmod(tmp, path.stat().st_mode & 0o777)
            os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _tar_segments(root: Path, prefix: str, files: list[str]) -> Iterator[tuple[int, bytes | Path]]:
    """The archive as (length, bytes or file) pieces in order; their lengths are known without
    reading any file, so a byte range maps to pieces (and a seek) at once."""
    written = 0
    for rel in files:
        path = root / rel
        size = path.stat().st_size
        header = _tar_header(f"{prefix}/{rel}", size)
        yield len(header), header
        yield size, path
        pad = (-size) % tarfile.BLOCKSIZE
        written += len(header) + size + pad
        if pad:
            yield pad, b"\0" * pad
    end = 2 * tarfile.BLOCKSIZE
    end += (-(written + end)) % tarfile.RECORDSIZE
    yield end, b"\0" * end


def stream_tar(root: Path, prefix: str, files: list[str], start: int = 0, end: int | None = None) -> Iterator[bytes]:
    """Yield a POSIX tar of `files` (relative to root) under `prefix/`, one chunk at a time; with
    `start`/`end` (inclusive) only those bytes of it, for `Range` requests and resumed downloads."""
    offset = 0
    for length, piece in _tar_segments(root, prefix, files):
        lo, hi = max(start, offset), min(offset + length, end + 1 if end is not None else offset + length)
        offset += length
        if lo >= hi:
            if end is not None and offset > end:
                return
            continue
        skip, want = lo - (offset - length), hi - lo
        if isinstance(piece, bytes):
            yield piece[skip:skip + want]
            continue
        yield from file_chunks(piece, CHUNK)(skip, skip + want - 1)


def build_manifest(job_dir: Path, name: str) -> dict | None:
    """Manifest of one checkpoint, cached in job_dir/manifests/; None if it was not published."""
    root = checkpoint_dir(job_dir, name)
    # Only a finished stage: while it is being written its files are incomplete, and the
    # manifest is cached for good.
    if not (root / ".done").exists() or not (root / "config.json").exists():
        return None
    cache = job_dir / "manifests" / f"{name}.json"
    if cache.exists():
        try:
            cached = json.loads(cache.read_text())
            if _unchanged(root, cached["files"], cache.stat().st_mtime):
                return cached
        # Only a cache: one cut short (a crash mid-write, a full disk, a hand edit) is rebuilt, not a 500.
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass
    _scrub_files(root, job_dir.parent.parent)  # job_dir is <data_dir>/jobs/<id>
    files = checkpoint_files(root)
    entries = [{"name": f, "bytes": (root / f).stat().st_size, "sha256": _sha256_file(root / f)} for f in files]
    h, archive_bytes = hashlib.sha256(), 0
    for chunk in stream_tar(root, name, files):
        h.update(chunk)
        archive_bytes += len(chunk)
    metrics = {}
    if (root / "eval_results.json").exists():
        try:
            metrics = json.loads((root / "eval_results.json").read_text())
        except ValueError:
            metrics = {}
    manifest = {"name": name, "files": entries, "bytes": sum(e["bytes"] for e in entries),
                "metrics": metrics if isinstance(metrics, dict) else {"results": metrics},
                "archive_bytes": archive_bytes, "archive_sha256": h.hexdigest()}
    tmp = cache.with_suffix(".tmp")
    try:  # only a cache: a full disk must not fail the read
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(manifest))
        tmp.replace(cache)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
    return manifest


def _unchanged(root: Path, entries: list[dict], since: float) -> bool:
    """Whether every file of a cached manifest is still there with its size and not written after
    the manifest: a file removed or replaced on the server must not be announced (and then cut off
    mid-download) with its old size and checksum."""
    for entry in entries:
        try:
            st = (root / entry["name"]).stat()
        except OSError:
            return False
        if st.st_size != entry["bytes"] or st.st_mtime > since:
            return False
    return len(entries) == len(checkpoint_files(root))


def manifests(job_dir: Path) -> list[dict]:
    return [m for m in (build_manifest(job_dir, n) for n in CHECKPOINTS) if m is not None]
