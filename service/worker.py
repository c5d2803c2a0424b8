"""Workers: claim a queued job with a lease, run it in its own child process (`service.runner`),
write its events and progress to the store, heartbeat the lease, and stop it by signal when the
job is cancelled. A worker that dies stops heartbeating; any worker then requeues the job once
the lease expires, and the pipeline resumes after its last finished stage."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from llm_prune.errors import disk_full, first_line
from service import artifacts, uploads
from service.errors import storage_fault
from service.settings import Settings
from service.store import JobRow, Store

log = logging.getLogger("llm_prune.worker")

PROGRESS_EVERY_S = 0.5


class JobProgress:
    """Folds pipeline events into the job's stage, progress and ETA (`WorkTracker`: a fraction of
    the job's estimated work) and metrics, and thins out step events so a long training run does
    not write a row per step."""

    def __init__(self, metrics: dict | None = None) -> None:
        """`metrics`: what the job's earlier attempts recorded. A resumed run skips the stages they
        finished, so their metrics would otherwise vanish from the job."""
        from llm_prune.progress import WorkTracker

        self.stage: str | None = None
        self.done: list[str] = []
        self.work = WorkTracker()
        self.metrics: dict[str, dict] = {k: dict(v) for k, v in (metrics or {}).items()
                                         if k != "progress" and isinstance(v, dict)}
        self._last_kept: dict[str, float] = {}

    def fold(self, event: dict) -> bool:
        """Update state; returns whether the event is worth storing."""
        from llm_prune.progress import ProgressEvent

        stage, kind = event.get("stage", ""), event.get("kind", "progress")
        known = {k: event[k] for k in ProgressEvent.__dataclass_fields__ if k in event}
        self.work.fold(ProgressEvent(**known))
        top = event.get("parent") is None
        if kind == "stage_start" and top and stage in self.work.plan:
            self.stage = stage
        elif kind == "stage_end" and top and stage in self.work.plan and stage not in self.done:
            self.done.append(stage)
        if event.get("metrics") and kind not in ("plan", "stage_start"):
            self.metrics.setdefault(stage or "job", {}).update(event["metrics"])
        if event.get("parent"):  # stored as parent/stage, the hierarchy the CLI's bars follow
            event["stage"] = f"{event['parent']}/{stage}"
        if kind != "progress":
            return True
        now = time.monotonic()
        final = event.get("total") is not None and event.get("step") == event.get("total")
        if final or now - self._last_kept.get(stage, 0.0) >= PROGRESS_EVERY_S:
            self._last_kept[stage] = now
            return True
        return False

    @property
    def progress(self) -> float:
        return self.work.progress

    def fields(self) -> dict:
        # A resumed attempt starts no stage its predecessors finished: until it starts one, the
        # stage and the count stored by them stand (a job resumed after its last stage ended with
        # `stage: null` and no stages done).
        done = len(set(self.done) | set(getattr(self.work, "done", ())))
        out = {"stages_done": done, "progress": self.progress,
               "metrics": {**self.metrics, "progress": self.work.snapshot()}}
        if self.stage is not None:
            out["stage"] = self.stage
        return out


class StoreOutage:
    """Logs a failing job store once with its traceback, then one line a minute until it answers
    again (a worker polls several times a second: a traceback each time would fill the disk that
    may be what is full), and backs the claim loop off up to `MAX_BACKOFF_S`."""

    MAX_BACKOFF_S = 30.0

    def __init__(self, worker_id: str):
        self.worker_id, self.failures, self.last_line = worker_id, 0, 0.0
        self._lock = threading.Lock()

    def failed(self, what: str) -> None:
        with self._lock:
            now, self.failures = time.monotonic(), self.failures + 1
            if self.failures == 1:
                log.exception("worker %s: %s: job store unavailable", self.worker_id, what)
                self.last_line = now
            elif now - self.last_line >= 60:
                log.warning("worker %s: job store still unavailable (%d failures): %s", self.worker_id,
                            self.failures, first_line(sys.exc_info()[1] or Exception(), 300))
                self.last_line = now

    def ok(self) -> None:
        with self._lock:
            if self.failures:
                log.warning("worker %s: job store available again after %d failures", self.worker_id, self.failures)
            self.failures = 0

    def backoff(self, poll_s: float) -> float:
        return min(self.MAX_BACKOFF_S, poll_s * 2 ** min(self.failures, 10)) if self.failures else poll_s


class Worker:
    def __init__(self, settings: Settings, store: Store | None = None, worker_id: str | None = None):
        self.settings = settings
        self.store = store or Store(settings.db_url)
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{id(self) & 0xffff:x}"
        self._stop = threading.Event()
        self.outage = StoreOutage(self.id)
        self._children: dict[str, subprocess.Popen] = {}
        self._unsettled: dict[str, tuple] = {}  # job id: `_finish`'s arguments, for a write the store refused
        self._lock = threading.Lock()

    # --- loop -----------------------------------------------------------------------------
    def run_forever(self) -> None:
        slots = max(1, self.settings.worker_slots)
        threads = [threading.Thread(target=self._slot, name=f"slot-{i}", daemon=True) for i in range(slots)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    def _slot(self) -> None:
        # Each slot thread spawns its own runners: the kernel's parent-death signal follows the
        # spawning thread, which lives as long as the slot.
        spare: subprocess.Popen | None = None
        while not self._stop.is_set():
            if self.settings.prestart_runner and (spare is None or spare.poll() is not None):
                spare = self._spawn(None)
            try:
                self._settle_pending()
                self.store.requeue_expired()
                job = self.store.claim(self.id, self.settings.device, self.settings.lease_seconds)
                self.outage.ok()
            except Exception:  # noqa: BLE001 - a database hiccup must not end the worker
                self.outage.failed("claiming a job")
                job = None
            if job is None:
                self._stop.wait(self.outage.backoff(self.settings.poll_seconds))
                continue
            if self._stop.is_set():  # stopped while claiming: hand it back now, not after its lease
                self._release(job.id)
                break
            try:
                self.run_job(job, spare)
            except Exception:  # noqa: BLE001
                log.exception("worker %s: job %s", self.id, job.id)
            spare = None
        if spare is not None:
            self._terminate(spare)

    def stop(self) -> None:
        """Graceful shutdown: stop children and hand their jobs back to the queue."""
        self._stop.set()
        for job_id, proc in list(self._children.items()):
            self._terminate(proc)
            self._release(job_id)
        try:  # a last try: left unwritten, those jobs are requeued once their leases lapse
            self._settle_pending()
        except Exception:  # noqa: BLE001
            self.outage.failed("recording the outcomes of finished jobs")

    def _release(self, job_id: str, reason: str | None = None) -> None:
        """Hand a job back: released (the attempt does not count), or requeued for `reason`."""
        try:
            if reason is None:
                self.store.release(job_id, self.id)
            else:
                self.store.requeue(job_id, self.id, reason)
        except Exception:  # noqa: BLE001 - out of touch with the database: its lease runs out instead
            self.outage.failed(f"handing back {job_id}")

    def _spawn(self, job_dir: Path | None) -> subprocess.Popen:
        """A runner for `job_dir`, or a prestarted one (job_dir None) that waits for it on stdin."""
        # stdin: the job directory (prestarted), then the lease's renewals (`_renewed`).
        args = [sys.executable, "-m", "service.runner", "--parent-pid", str(os.getpid()),
                "--lease-seconds", str(self.settings.lease_seconds)]
        env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
        if job_dir is None:
            return subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                    start_new_session=True, env=env)
        with open(job_dir / "job.log", "ab") as logfile:
            return subprocess.Popen(args + [str(job_dir)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=logfile, start_new_session=True, env=env)

    # --- one job --------------------------------------------------------------------------
    def run_job(self, job: JobRow, spare: subprocess.Popen | None = None) -> str | None:
        job_dir = self.settings.job_dir(job.id)
        tracker = JobProgress(job.metrics)
        proc = None
        try:
            job_dir.mkdir(parents=True, exist_ok=True)
            recipe = dict(job.recipe, device=self.settings.device)
            (job_dir / "recipe.json").write_text(json.dumps(recipe, indent=2))
            if spare is not None and spare.poll() is None:
                try:
                    spare.stdin.write(f"{job_dir}\n".encode())
                    spare.stdin.flush()
                    proc = spare
                except OSError:  # it died meanwhile
                    self._terminate(spare)
            proc = proc or self._spawn(job_dir)
        except OSError as exc:  # a full disk: no job process starts; the job goes back, with the reason
            if spare is not None:
                self._terminate(spare)
            self._release(job.id, f"the worker could not start the job's process: {self._reason(exc)}")
            return None
        self._children[job.id] = proc
        outcome: dict = {}
        try:
            # Who runs the job stays on the server (fault tests and operators read it); the API
            # shows the attempt and the device only.
            (job_dir / "process.json").write_text(json.dumps({"pid": proc.pid, "worker": self.id,
                                                              "attempt": job.attempts}))
            start = {"kind": "stage_start", "stage": "job", "time": time.time(),
                     "message": f"attempt {job.attempts} of {job.max_attempts} ({self.settings.device})"}
            self.store.record(job.id, self.id, [start])
            lines: queue.Queue = queue.Queue()
            reader = threading.Thread(target=_read_lines, args=(proc.stdout, lines), daemon=True)
            reader.start()
            lost = self._supervise(job.id, proc, lines, tracker, outcome)
        except BaseException as exc:
            # Unsupervised, the job process would run on (blocked on its unread stdout, holding the
            # job's folder) beside the attempt that runs once the lease expires: stop it first.
            self._terminate(proc)
            self._release(job.id, f"the worker failed supervising its job process: {self._reason(exc)}")
            raise
        finally:
            self._children.pop(job.id, None)
            with contextlib.suppress(OSError):
                proc.stdin.close()
        reader.join(timeout=5)
        try:
            self._drain(job.id, lines, tracker, outcome)
        except Exception:  # noqa: BLE001 - its last events lost (a full disk, a busy store); the outcome is kept
            self.outage.failed(f"recording events of {job.id}")
        if lost or self._stop.is_set():
            return None
        return self._settle(job, job_dir, proc.returncode, outcome)

    def _reason(self, exc: BaseException) -> str:
        """An exception as a job's events show it: one line, a full disk said as such, without the
        data directory's path."""
        full = disk_full(exc)
        text = f"no space left on the server's disk ({full})" if full else first_line(exc, 300)
        return artifacts.scrub(text, self.settings.data_dir)

    def _settle(self, job: JobRow, job_dir: Path, code: int, outcome: dict) -> str | None:
        """`_finish`. When the store refuses the write (a full disk may refuse every write until space
        is freed), the outcome is kept and written as soon as the store takes writes again
        (`_settle_pending`, each turn of the claim loop, before expired leases are requeued): the
        job ends with its own reason, not as the job of a worker that stopped responding."""
        try:
            return self._finish(job, job_dir, code, outcome)
        except Exception as exc:  # noqa: BLE001
            if storage_fault(exc) is None:
                raise  # a bug: its traceback, from the slot
            self.outage.failed(f"recording the outcome of {job.id}")
        with self._lock:
            self._unsettled[job.id] = (job, job_dir, code, outcome)
        return None

    def _settle_pending(self) -> None:
        """Write the outcomes the store refused before; raises while it still refuses them. A write
        that comes after another worker requeued the job for its lapsed lease does nothing."""
        with self._lock:
            pending, self._unsettled = self._unsettled, {}
        try:
            while pending:
                job_id, args = next(iter(pending.items()))
                try:
                    self._finish(*args)
                except Exception as exc:  # noqa: BLE001
                    if storage_fault(exc) is not None:
                        raise
                    log.exception("worker %s: recording the outcome of %s", self.id, job_id)  # a bug: dropped
                pending.pop(job_id)
        finally:
            with self._lock:
                self._unsettled.update(pending)

    def _supervise(self, job_id: str, proc: subprocess.Popen, lines: queue.Queue, tracker: JobProgress,
                   outcome: dict) -> bool:
        """Until the child exits: store its events, heartbeat, obey cancel. True if the lease was lost."""
        next_beat, last_beat = 0.0, time.monotonic()
        while proc.poll() is None:
            if self._stop.is_set():  # stop() hands back the jobs it found; one started meanwhile, here
                self._terminate(proc)
                self._release(job_id)
                return True
            try:
                self._drain(job_id, lines, tracker, outcome)
            except Exception:  # noqa: BLE001 - a lost progress update must not stop the job
                self.outage.failed(f"recording events of {job_id}")
            if time.monotonic() >= next_beat:
                try:
                    started = time.monotonic()  # the lease runs from (at the latest) here
                    owned, cancel = self.store.heartbeat(job_id, self.id, self.settings.lease_seconds)
                    last_beat = time.monotonic()
                    if owned:
                        _renewed(proc, self.settings.lease_seconds - (last_beat - started))
                    self.outage.ok()
                except Exception:  # noqa: BLE001 - the database may be back by the next beat
                    self.outage.failed(f"heartbeat for {job_id}")
                    owned, cancel = time.monotonic() - last_beat < self.settings.lease_seconds, False
                next_beat = time.monotonic() + self.settings.heartbeat_seconds
                if not owned:  # requeued elsewhere, deleted, or out of touch too long: stop this run
                    self._terminate(proc)
                    return True
                if cancel:
                    outcome["cancelled"] = True
                    self._terminate(proc)
            time.sleep(0.2)
        return False

    def _drain(self, job_id: str, lines: queue.Queue, tracker: JobProgress, outcome: dict) -> None:
        keep = []
        while True:
            try:
                msg = lines.get_nowait()
            except queue.Empty:
                break
            kind = msg.pop("type", None)
            msg = artifacts.scrub(msg, self.settings.data_dir)
            if kind == "event":
                if tracker.fold(msg):
                    keep.append(msg)
            elif kind in ("result", "error"):
                outcome[kind] = msg
        if keep:
            self.store.record(job_id, self.id, keep, **tracker.fields())

    def _finish(self, job: JobRow, job_dir: Path, code: int, outcome: dict) -> str | None:
        fields = {"events": [{"kind": "stage_end", "stage": "job", "time": time.time()}]}
        if not outcome.get("cancelled") and "result" not in outcome and "error" not in outcome:
            # Killed (OOM killer, a signal) or gone without a report: nothing says the job itself
            # is at fault, and it resumes after its last finished stage. Retry within max_attempts.
            return self.store.requeue(job.id, self.id, _exit_reason(code))
        if outcome.get("cancelled"):
            status = "cancelled"
        elif code == 0 and "result" in outcome:
            status = "succeeded"
            artifacts.manifests(job_dir)  # hash once now, so listing and downloads start at once
            summary = dict(outcome["result"].get("summary") or {})
            summary.pop("recipe", None)  # the job object shows it, with file ids
            fields["result"] = summary
        else:
            status = "failed"
            err = outcome.get("error")
            missing = uploads.missing_uploads(job.recipe, job.request)
            if missing:  # removed on the server under the job: said by its id, never by its path
                param, file_id = missing[0]
                fields["error"] = {"message": f"upload {file_id} ({param}) is missing on the server: its content was "
                                              "removed there; upload the file again and submit a new job",
                                   "param": param, "type": "server_error", "code": "file_not_found"}
            elif err:
                fields["error"] = {"message": err["message"], "param": err.get("param"),
                                   "type": "invalid_request_error" if err.get("user") else "server_error",
                                   "code": err.get("code")}
            else:
                fields["error"] = {"message": _exit_reason(code), "param": None, "type": "server_error",
                                   "code": "job_process_died"}
            fields["events"][0]["message"] = fields["error"]["message"]
        fields["events"][0]["metrics"] = {"status": status}
        self.store.finish(job.id, self.id, status, **fields)
        return status

    def _terminate(self, proc: subprocess.Popen) -> None:
        """SIGTERM the job's process group, SIGKILL after the grace period."""
        for sig, wait in ((signal.SIGTERM, self.settings.cancel_grace_seconds), (signal.SIGKILL, 10.0)):
            if proc.poll() is not None:
                return
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                proc.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue


def _renewed(proc: subprocess.Popen, left_s: float) -> None:
    """Tell the job process how long the lease it runs under has left (`runner._hold_lease`)."""
    with contextlib.suppress(OSError, ValueError):  # it has exited (or its stdin is closed)
        proc.stdin.write(f"{left_s:.3f}\n".encode())
        proc.stdin.flush()


def _read_lines(stream, out: queue.Queue) -> None:
    for raw in stream:
        try:
            msg = json.loads(raw)
        except ValueError:
            continue
        if isinstance(msg, dict):
            out.put(msg)
    stream.close()


def _exit_reason(code: int) -> str:
    from service.runner import FOLDER_BUSY

    if code == FOLDER_BUSY:
        return "an earlier attempt's job process still held the job's folder"
    if code is not None and code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = " (out of memory?)" if -code == signal.SIGKILL else ""
        return f"job process was killed by {name}{hint}"
    return f"job process exited with status {code} without a result"
