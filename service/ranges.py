"""HTTP byte ranges (RFC 9110 §14) for checkpoint files and archives: one range per request,
`If-Range` against the strong ETag (the content's sha256), every refusal an error object."""

from __future__ import annotations

import re
from typing import Callable, Iterator

from fastapi.responses import Response, StreamingResponse

from llm_prune.errors import UserError
from service.errors import RangeError

_SPEC = re.compile(r"^\s*(\d*)\s*-\s*(\d*)\s*$", re.ASCII)
_HUGE = 10**18  # past any size served; longer digit strings are not converted (int() refuses 4,300 digits)


def _byte(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 19 else _HUGE


def parse_range(header: str | None, size: int, if_range: str | None = None,
                etag: str | None = None) -> tuple[int, int] | None:
    """(first, last) byte, inclusive, or None for the whole content."""
    if header is None or (if_range is not None and if_range.strip() != etag):
        return None  # no range, or the client's copy is of other content: send it all
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None  # unknown units are ignored (RFC 9110 §14.2)
    if "," in spec:
        raise UserError("only one byte range per request is supported", param="Range", code="invalid_range")
    m = _SPEC.match(spec)
    if m is None or (m.group(1) == "" and m.group(2) == ""):
        raise UserError(f"malformed Range header: {header[:100]!r}; use bytes=FIRST-LAST, bytes=FIRST- or "
                        "bytes=-SUFFIX", param="Range", code="invalid_range")
    first, last = m.group(1), m.group(2)
    if first == "":  # suffix: the last N bytes
        n = _byte(last)
        if n == 0 or size == 0:
            raise RangeError(f"range {header[:100]!r} selects no byte of the {size} available", size)
        return max(0, size - n), size - 1
    lo = _byte(first)
    if last and _byte(last) < lo:
        raise UserError(f"malformed Range header: {header[:100]!r} ends before it starts", param="Range",
                        code="invalid_range")
    if lo >= size:
        raise RangeError(f"range starts at byte {first.lstrip('0')[:40] or 0}, past the end of the {size} bytes "
                         "available", size)
    return lo, min(_byte(last) if last else size - 1, size - 1)


def ranged_response(request_headers, size: int, etag: str, chunks: Callable[[int, int], Iterator[bytes]],
                    media_type: str, headers: dict[str, str], head: bool = False) -> Response:
    """200 with the whole content or 206 with the requested range; `chunks(first, last)` yields
    those bytes. Always advertises `Accept-Ranges: bytes` and the ETag. `head`: the same status and
    headers without the body, which is then never read (an archive is built as it streams)."""
    quoted = f'"{etag}"'
    span = parse_range(request_headers.get("range"), size, request_headers.get("if-range"), quoted)
    out = {**headers, "Accept-Ranges": "bytes", "ETag": quoted}
    status, first, last = (200, 0, size - 1) if span is None else (206, *span)
    out["Content-Length"] = str(last - first + 1)
    if span is not None:
        out["Content-Range"] = f"bytes {first}-{last}/{size}"
    if head:
        return Response(status_code=status, media_type=media_type, headers=out)
    return StreamingResponse(chunks(first, last) if size else iter(()), status_code=status, media_type=media_type,
                             headers=out)


def file_chunks(path, chunk: int = 1024 * 1024) -> Callable[[int, int], Iterator[bytes]]:
    def read(first: int, last: int) -> Iterator[bytes]:
        with open(path, "rb") as fh:
            fh.seek(first)
            left = last - first + 1
            while left > 0:
                block = fh.read(min(chunk, left))
                if not block:
                    raise OSError(f"{path} shrank while being sent")
                left -= len(block)
                yield block
    return read
