"""The child process that runs one job: `python -m service.runner JOB_DIR --parent-pid PID`, or
prestarted without JOB_DIR: it then imports the heavy libraries and reads JOB_DIR from stdin.

Reads JOB_DIR/recipe.json, runs the pipeline into JOB_DIR/run (resuming after its last finished
stage), and reports to the worker as JSON lines on its stdout: `event`, then `result` or `error`.
Anything else the libraries print goes to stderr (the job log). It dies with its worker, so a
`kill -9` of the worker never leaves a job running twice, and (with --lease-seconds) when its
worker stops renewing the job's lease, so neither does a worker cut off from the database.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path


def _die_with_parent(parent_pid: int) -> None:
    if sys.platform.startswith("linux"):
        try:  # PR_SET_PDEATHSIG: the kernel sends SIGKILL when the parent goes away.
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
        except (OSError, AttributeError):
            pass

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(137)
            time.sleep(0.5)

    if os.getppid() != parent_pid:
        os._exit(137)
    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


def _hold_lease(lease_s: float) -> None:
    """End this job process (SIGKILL to its process group) when its worker's lease on the job runs
    out unrenewed. After each renewal the worker writes the seconds the lease has left on our stdin;
    a worker that cannot renew (a database behind a network partition, where its calls block for
    good; a SIGSTOPped worker) writes nothing, and once the lease expires another worker may start
    the job again: this process must be gone by then, whatever its worker is doing."""
    margin = min(2.0, lease_s / 10)  # the kill, and the spawn after the claim that started the lease
    deadline = [time.monotonic() + lease_s - margin]

    def renewals() -> None:
        for line in sys.stdin:
            try:
                deadline[0] = time.monotonic() + float(line) - margin
            except ValueError:
                continue

    def expire() -> None:
        while time.monotonic() < deadline[0]:
            time.sleep(0.1)
        print("the worker's lease on this job ran out unrenewed: stopping", file=sys.stderr, flush=True)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=renewals, daemon=True, name="lease-renewals").start()
    threading.Thread(target=expire, daemon=True, name="lease-expiry").start()


def _preload() -> None:
    """A prestarted runner imports the heavy stack (torch, transformers, peft) while it waits,
    so a claimed job starts at once."""
    try:
        import llm_prune.pipeline  # noqa: F401
        import recovery  # noqa: F401
    except ImportError:
        pass  # the job's own import reports it


def _wait_for_job() -> Path | None:
    """Prestarted: the worker writes the job directory on stdin (EOF: not needed, exit)."""
    line = sys.stdin.readline().strip()
    if not line:
        return None
    job_dir = Path(line)
    log = os.open(job_dir / "job.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 2)
    os.dup2(log, 1)
    os.close(log)
    return job_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.runner")
    parser.add_argument("job_dir", nargs="?", help="omit to prestart: the directory then comes on stdin")
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--lease-seconds", type=float, help="end unless the worker renews its lease (on stdin)")
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)

    # Our stdout is the report channel; whatever else writes to fd 1 goes to the log instead.
    channel = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    lock = threading.Lock()

    def send(message_type: str, **payload) -> None:
        line = json.dumps({"type": message_type, **payload}, default=str)
        with lock:
            channel.write(line + "\n")
            channel.flush()

    if args.job_dir is None:
        _preload()
        job_dir = _wait_for_job()
        if job_dir is None:
            return 0
    else:
        job_dir = Path(args.job_dir)
    if args.lease_seconds:
        _hold_lease(args.lease_seconds)

    from llm_prune.errors import UserError, disk_full

    try:
        from llm_prune.recipe import parse_recipe

        recipe = parse_recipe(json.loads((job_dir / "recipe.json").read_text()))
        recipe.check_files()
        from llm_prune.pipeline import run_recipe

        summary = _run_when_free(lambda: run_recipe(recipe, job_dir / "run",
                                                    on_event=lambda e: send("event", **e.to_dict())))
        if summary is None:
            return FOLDER_BUSY
        send("result", summary=summary)
        return 0
    except UserError as exc:
        send("error", message=exc.message[:MAX_MESSAGE], param=exc.param, code=exc.code, user=True)
        return 2
    # BaseException: a stage that raises KeyboardInterrupt or SystemExit is a failed job, said as
    # such; unreported, the worker took it for a killed process and ran it twice more. (The worker
    # stops a job with SIGTERM/SIGKILL, which no handler here turns into an exception.)
    except BaseException as exc:  # noqa: BLE001 - reported to the job, traceback kept in the log
        traceback.print_exc()
        full = disk_full(exc) if isinstance(exc, Exception) else None
        if full is not None:  # the server's disk, not the job: said so (the worker shows the path as a name)
            message = f"no space left on the server's disk ({full}); the job can be retried once space is freed"
            send("error", message=message[:MAX_MESSAGE], param=None, code="insufficient_storage", user=False)
            return 1
        send("error", message=describe(exc), param=None, code="pipeline_error", user=False)
        return 1


# The job's folder is locked by another process only when an earlier attempt's process is still
# being stopped (its worker lost the lease): wait for it, then hand the job back unreported (the
# worker requeues a job process that exits without a result) rather than fail it as the user's fault.
FOLDER_WAIT_S = 30.0
FOLDER_BUSY = 75  # EX_TEMPFAIL


def _run_when_free(run):
    from llm_prune.errors import UserError
    from llm_prune.pipeline import RUN_IN_PROGRESS

    deadline = time.monotonic() + FOLDER_WAIT_S
    while True:
        try:
            return run()
        except UserError as exc:
            if exc.code != RUN_IN_PROGRESS:
                raise
            if time.monotonic() > deadline:
                print(f"gave up waiting: {exc.message}", file=sys.stderr)
                return None
            time.sleep(0.5)


MAX_MESSAGE = 2000  # a job's error message is one line for people, not the stage's whole output


def describe(exc: BaseException) -> str:
    """`Type: first line of the message`, at most MAX_MESSAGE characters, even for an exception
    whose __str__ raises (that escaped the report, and the job was retried as a dead process)."""
    try:
        lines = str(exc).strip().splitlines()
    except Exception:  # noqa: BLE001
        lines = ["(its message could not be formatted)"]
    name = type(exc).__name__
    return (f"{name}: {lines[0]}" if lines else name)[:MAX_MESSAGE]


if __name__ == "__main__":
    code = main()
    sys.stderr.flush()
    # Everything is reported; skip the interpreter's teardown of torch & co (seconds on a busy CPU).
    os._exit(code)
