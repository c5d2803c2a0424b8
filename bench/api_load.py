"""Latency of `GET /v1/jobs/{id}` under concurrent pollers while a job runs.

Starts `llm-prune serve` (embedded worker, SQLite store, no-auth localhost mode) in a temporary
data directory, submits one job, waits until it is running, then runs N pollers (one asyncio
task each, one keep-alive HTTP/1.1 connection each) that GET the job in a loop for D seconds. Reports p50/p90/p99
latency and request rate; the job keeps running on the same machine during the measurement.

    .venv/bin/python bench/api_load.py --pollers 50 --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from service.launch import Server


async def _get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """One keep-alive HTTP/1.1 GET; returns the status code. The body is read in full."""
    writer.write(request)
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    await reader.readexactly(length)
    return status


async def poll(port: int, path: str, until: float, latencies: list[float], errors: list[str]) -> None:
    # A bare asyncio connection per poller: httpx's pool spends more CPU per request than the
    # server does at 50 connections, and on 2 shared cores the client would be what we measure.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAccept: application/json\r\n\r\n".encode()
    try:
        await _get(reader, writer, request)  # warm-up, not counted
        while time.monotonic() < until:
            t = time.perf_counter()
            status = await _get(reader, writer, request)
            latencies.append(time.perf_counter() - t)
            if status != 200:
                errors.append(str(status))
    finally:
        writer.close()


async def measure(url: str, job_id: str, pollers: int, duration: float) -> dict:
    latencies: list[float] = []
    errors: list[str] = []
    port = int(url.rsplit(":", 1)[1])
    until = time.monotonic() + duration
    t0 = time.perf_counter()
    await asyncio.gather(*(poll(port, f"/v1/jobs/{job_id}", until, latencies, errors) for _ in range(pollers)))
    wall = time.perf_counter() - t0
    ms = sorted(x * 1000 for x in latencies)
    q = statistics.quantiles(ms, n=100)
    return {"requests": len(ms), "errors": len(errors), "wall_s": round(wall, 1), "rps": round(len(ms) / wall, 1),
            "p50_ms": round(q[49], 1), "p90_ms": round(q[89], 1), "p99_ms": round(q[98], 1),
            "max_ms": round(ms[-1], 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pollers", type=int, default=50)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds of polling")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--out", default="bench/results/api_load.json")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="llm-prune-bench-") as tmp:
        with Server(Path(tmp) / "data", extra_args=["--no-auth"], log=Path(tmp) / "server.log") as server:
            # Pruning only: loading, Taylor scoring and surgery keep the job busy (and the CPU loaded)
            # for longer than the measurement.
            body = {"model": args.model, "budget": {"ratio": args.ratio}, "recovery": {"method": "none"}}
            job = httpx.post(f"{server.url}/v1/jobs", json=body, timeout=60).json()
            deadline = time.monotonic() + 300
            while httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()["status"] == "queued":
                if time.monotonic() > deadline:
                    raise SystemExit("the job did not start within 300 s")
                time.sleep(0.5)
            load_before = os.getloadavg()[0]
            server_proc = psutil.Process(server.proc.pid)  # the API process alone, not the job's
            cpu_before = sum(server_proc.cpu_times()[:2])
            result = asyncio.run(measure(server.url, job["id"], args.pollers, args.duration))
            result["server_cpu_ms_per_request"] = round(
                (sum(server_proc.cpu_times()[:2]) - cpu_before) * 1000 / max(1, result["requests"]), 2)
            if result["errors"]:
                raise SystemExit(f"{result['errors']} requests failed")
            after = httpx.get(f"{server.url}/v1/jobs/{job['id']}").json()
            result.update(pollers=args.pollers, duration_s=args.duration, job_status_after=after["status"],
                          job_stage_after=after["stage"], machine=f"{platform.machine()}, "
                          f"{os.cpu_count()} CPU cores, no GPU", store="SQLite (WAL)",
                          load_avg_1m_before=round(load_before, 1), load_avg_1m_after=round(os.getloadavg()[0], 1))
            httpx.post(f"{server.url}/v1/jobs/{job['id']}/cancel")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
