"""Start `llm-prune serve` / `llm-prune worker` as child processes on a free localhost port and
wait until they answer; used by the demo, the load benchmark and the end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


# How `llm-prune serve` runs uvicorn. h11, not httptools (uvicorn's default when installed):
# httptools has no limit on a request's head, so one client that never finishes its headers grew
# the server by megabytes a second and stalled every other request; h11 answers 400 past 16 KiB.
# timeout_graceful_shutdown: on SIGTERM uvicorn waited for every connection to end, and an event
# stream follower or a stalled upload never does: `docker stop` (10 s) or systemd then SIGKILLed the
# server before its embedded worker handed its job back (an attempt lost). 5 s for connections
# leaves the worker its cancel grace (3 s) to stop the job process and release the job.
SERVER_OPTIONS = {"http": "h11", "h11_max_incomplete_event_size": 16 * 1024, "timeout_graceful_shutdown": 5}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli_command() -> list[str]:
    return [sys.executable, "-c", "from llm_prune.cli import main; main()"]


class Managed:
    """A child process that is stopped (SIGTERM, then SIGKILL) when the block ends."""

    def __init__(self, args: list[str], env: dict[str, str] | None = None, log: Path | None = None):
        self.args = args
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Managed":
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(cli_command() + self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        if self.log:
            out.close()
        return self

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> "Managed":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Server(Managed):
    """`llm-prune serve` on 127.0.0.1 with the given data directory."""

    def __init__(self, data_dir: Path, *, port: int | None = None, env: dict[str, str] | None = None,
                 extra_args: list[str] = (), log: Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(["serve", "--host", "127.0.0.1", "--port", str(self.port), "--data-dir", str(data_dir),
                          *extra_args], env=env, log=log)

    def start(self, wait_s: float = 60.0) -> "Server":
        super().start()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with status {self.proc.returncode}"
                                   + (f"; see {self.log}" if self.log else ""))
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not answer on {self.url} within {wait_s:.0f} s")
