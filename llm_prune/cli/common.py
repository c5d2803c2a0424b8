"""Small helpers shared by the CLI commands."""

from __future__ import annotations

import json
import math
import sys
from typing import Any


def json_safe(value: Any) -> Any:
    """`value` with NaN and Infinity made null: Python writes them as bare NaN/Infinity, which is
    not JSON and which strict parsers (jq, JavaScript, PostgreSQL) refuse."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(data: Any) -> str:
    """Indented JSON that is valid JSON: non-finite numbers are null (see `json_safe`)."""
    return json.dumps(json_safe(data), indent=2, default=str, allow_nan=False)


def emit_json(data: Any) -> None:
    sys.stdout.write(json_text(data) + "\n")


def human_bytes(n: float) -> str:
    """Binary units, named as such: the benchmarks report memory in MiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def human_count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])
