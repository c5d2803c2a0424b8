"""Worker pieces that need no pipeline run: progress folding, exit reasons, the runner's report
protocol, and the reproducible checkpoint archive."""

import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import tarfile

from service import artifacts
from service.worker import JobProgress, _exit_reason


def test_progress_folds_work_and_thins_steps():
    p = JobProgress()
    # A resumed job: baseline is done; the plan weighs the stages by their work.
    assert p.fold({"kind": "plan", "stage": "job", "time": 0.0,
                   "metrics": {"work": {"baseline": 0, "prune": 100, "recover": 900}, "done": ["baseline"]}})
    start = p.progress
    assert 0 < start < 0.05  # the done stage counts, but it had little work
    p.fold({"kind": "stage_start", "stage": "prune", "time": 1.0, "metrics": {"work": {"score": 100}}})
    p.fold({"kind": "progress", "stage": "score", "parent": "prune", "step": 10, "total": 10, "time": 2.0})
    p.fold({"kind": "stage_end", "stage": "prune", "time": 2.0})
    after_prune = p.progress
    assert abs(after_prune - (100 + 10 + 10) / (1000 + 30)) < 1e-3
    p.fold({"kind": "stage_start", "stage": "recover", "time": 10.0, "metrics": {"work": {"train": 900}}})
    seen = []
    kept = []
    for i in range(1, 101):
        kept.append(p.fold({"kind": "progress", "stage": "train", "parent": "recover", "step": i, "total": 100,
                            "time": 10.0 + i, "metrics": {"loss": 1 / i}}))
        seen.append(p.progress)
    assert kept[0] and kept[-1] and sum(kept) < 10  # steps are thinned, the last one always kept
    assert seen == sorted(seen) and seen[0] > after_prune and seen[-1] < 1.0  # not done until the stage ends
    assert p.metrics["train"]["loss"] == 0.01 and p.fields()["stage"] == "recover"
    snap = p.fields()["metrics"]["progress"]
    assert snap["eta_s"] == 0 and snap["stage_fraction"] == 1.0
    p.fold({"kind": "stage_end", "stage": "recover", "time": 111.0})
    assert p.progress == 1.0 and p.fields()["stages_done"] == 3  # baseline, done by an earlier attempt, counts


def test_a_resumed_job_keeps_the_metrics_of_stages_finished_before():
    earlier = {"baseline": {"ppl": 41.0}, "prune": {"params": 9}, "progress": {"eta_s": 3}}
    p = JobProgress(earlier)
    p.fold({"kind": "metric", "stage": "recover", "time": 1.0, "metrics": {"loss": 2.5}})
    metrics = p.fields()["metrics"]
    assert metrics["baseline"] == {"ppl": 41.0} and metrics["prune"] == {"params": 9}
    assert metrics["recover"] == {"loss": 2.5} and metrics["progress"] != {"eta_s": 3}
    assert earlier["prune"] == {"params": 9}  # the row's own dict is not changed in place


def test_a_job_resumed_after_its_last_stage_keeps_its_stage_and_count():
    p = JobProgress()
    work = {"baseline": 1, "prune": 1, "select": 1, "recover": 1, "final": 1}
    p.fold({"kind": "plan", "stage": "job", "time": 0.0, "metrics": {"work": work, "done": list(work)}})
    fields = p.fields()
    assert "stage" not in fields and fields["stages_done"] == 5  # the stored stage stands, not null


def test_eta_is_remaining_work_over_current_throughput():
    p = JobProgress()
    p.fold({"kind": "plan", "stage": "job", "time": 0.0, "metrics": {"work": {"recover": 1000, "final": 500}}})
    p.fold({"kind": "stage_start", "stage": "recover", "time": 0.0, "metrics": {"work": {"train": 1000}}})
    p.fold({"kind": "stage_start", "stage": "train", "parent": "recover", "step": 0, "total": 100, "time": 10.0})
    p.fold({"kind": "progress", "stage": "train", "parent": "recover", "step": 25, "total": 100, "time": 60.0})
    # 250 units in 50 s: 5 units/s; 750 + 500 units left.
    assert abs(p.work.eta_seconds() - 250.0) < 1e-6
    assert p.fold({"kind": "warning", "stage": "recover", "message": "x"})


def test_exit_reasons():
    assert "SIGKILL" in _exit_reason(-signal.SIGKILL) and "out of memory" in _exit_reason(-signal.SIGKILL)
    assert "SIGSEGV" in _exit_reason(-signal.SIGSEGV)
    assert "status 3" in _exit_reason(3)


def test_runner_reports_a_bad_recipe_as_user_error(tmp_path):
    (tmp_path / "recipe.json").write_text(json.dumps({"model": "m", "budget": {"ratio": 2}}))
    proc = subprocess.run([sys.executable, "-m", "service.runner", str(tmp_path), "--parent-pid", str(os.getpid())],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    (line,) = proc.stdout.splitlines()
    msg = json.loads(line)
    assert msg["type"] == "error" and msg["user"] and msg["param"] == "budget.ratio"


def test_runner_reports_any_exception_of_a_stage_in_one_short_line(tmp_path):
    """A stage raising KeyboardInterrupt or SystemExit, or an exception whose __str__ raises, went
    unreported: the job was retried as a dead process; a 5 MB message was stored whole."""
    (tmp_path / "recipe.json").write_text("{}")
    faults = {"KeyboardInterrupt()": "KeyboardInterrupt", "SystemExit(0)": "SystemExit: 0",
              "BadStr()": "BadStr: (its message could not be formatted)", "ValueError('x' * 5_000_000)": None}
    for raised, message in faults.items():
        script = ("import sys, llm_prune.recipe as recipe, service.runner as runner\n"
                  "class BadStr(Exception):\n    def __str__(self): raise RuntimeError('no')\n"
                  f"def parse(_): raise {raised}\n"
                  "recipe.parse_recipe = parse\n"
                  f"sys.exit(runner.main([{str(tmp_path)!r}, '--parent-pid', str(__import__('os').getppid())]))\n")
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
        (line,) = proc.stdout.splitlines()
        msg = json.loads(line)
        assert proc.returncode == 1 and msg["type"] == "error" and not msg["user"], raised
        assert msg["message"] == (message or "ValueError: " + "x" * 1988) and len(msg["message"]) <= 2000


def test_runner_exits_when_its_parent_is_gone(tmp_path):
    (tmp_path / "recipe.json").write_text("{}")
    proc = subprocess.run([sys.executable, "-m", "service.runner", str(tmp_path), "--parent-pid", "1"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 137 and proc.stdout == ""


def test_archive_is_reproducible_and_matches_manifest(tmp_path):
    root = tmp_path / "run" / "final"
    root.mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "model.safetensors").write_bytes(os.urandom(3000))
    (root / "sub").mkdir()
    (root / "sub" / "x.txt").write_text("x" * 513)
    (root / ".done").write_text("")
    m = artifacts.build_manifest(tmp_path, "final")
    assert [f["name"] for f in m["files"]] == ["config.json", "model.safetensors", "sub/x.txt"]
    first = b"".join(artifacts.stream_tar(root, "final", [f["name"] for f in m["files"]]))
    os.utime(root / "model.safetensors", (0, 12345))  # timestamps do not enter the archive
    second = b"".join(artifacts.stream_tar(root, "final", [f["name"] for f in m["files"]]))
    assert first == second and len(first) == m["archive_bytes"] and len(first) % tarfile.RECORDSIZE == 0
    assert hashlib.sha256(first).hexdigest() == m["archive_sha256"]
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        assert tar.extractfile("final/sub/x.txt").read() == b"x" * 513
    assert artifacts.build_manifest(tmp_path, "pruned") is None


def test_a_job_claimed_while_the_worker_stops_is_handed_back(tmp_path):
    """stop() hands back the jobs it finds running; one claimed while it ran (a server whose start
    failed) went back only when its lease ran out, an attempt lost."""
    from service.settings import Settings
    from service.store import Store
    from service.worker import Worker

    settings = Settings(data_dir=tmp_path, prestart_runner=False)
    store = Store(settings.db_url)
    job = store.create_job("k", "m", {}, {"model": "m"}, max_attempts=1)
    worker = Worker(settings, store)
    real_claim = store.claim

    def claim_then_stop(*args):
        got = real_claim(*args)
        worker.stop()
        return got

    store.claim = claim_then_stop
    worker.run_forever()  # returns: the slot saw the stop
    row = store.get_job(job.id, "k")
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 0, None)
    store.close()


def test_a_store_error_right_after_the_spawn_stops_the_job_process(tmp_path):
    """The job's first event write failing (a lock timeout) escaped run_job and left the job process
    running, unread and holding the job's folder, beside the attempt that ran after the lease."""
    import pytest

    from service.settings import Settings
    from service.store import Store
    from service.worker import Worker

    settings = Settings(data_dir=tmp_path, prestart_runner=False)
    store = Store(settings.db_url)
    store.create_job("k", "m", {}, {"model": "m"}, max_attempts=3)
    worker = Worker(settings, store)
    job = store.claim(worker.id, "cpu", 30)

    def locked(*_a, **_k):
        raise RuntimeError("canceling statement due to lock timeout")

    store.record = locked
    with pytest.raises(RuntimeError):
        worker.run_job(job)
    pid = json.loads((settings.job_dir(job.id) / "process.json").read_text())["pid"]
    assert not os.path.exists(f"/proc/{pid}") and worker._children == {}  # stopped and reaped
    row = store.get_job(job.id)
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 1, None)  # handed back at once
    assert "lock timeout" in store.list_events(job.id)[0][-1].message
    store.close()


def test_runner_waits_for_a_folder_an_earlier_attempt_holds_then_hands_the_job_back(tmp_path):
    """The folder lock of an earlier attempt's process, still being stopped, failed the job as a
    user error ("another `llm-prune run` is working in ..."); now the runner waits, then exits
    unreported (status FOLDER_BUSY), which its worker requeues."""
    import fcntl
    import time

    from service.runner import FOLDER_BUSY

    (tmp_path / "recipe.json").write_text("{}")
    script = ("import sys, llm_prune.recipe as recipe, llm_prune.pipeline as pipeline, service.runner as runner\n"
              "runner.FOLDER_WAIT_S = 1\n"
              "recipe.parse_recipe = lambda _: type('R', (), {'check_files': lambda self: None})()\n"
              "def run(_recipe, out, on_event):\n    with pipeline._only_run(out):\n        return {'ok': 1}\n"
              "pipeline.run_recipe = run\n"
              f"sys.exit(runner.main([{str(tmp_path)!r}, '--parent-pid', str(__import__('os').getppid())]))\n")
    (tmp_path / "run").mkdir()
    with open(tmp_path / "run" / ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        busy = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert busy.returncode == FOLDER_BUSY and busy.stdout == "" and time.monotonic() - t0 >= 1
    assert "earlier attempt" in _exit_reason(FOLDER_BUSY)
    free = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert free.returncode == 0 and json.loads(free.stdout)["type"] == "result"


def test_a_job_process_ends_when_its_worker_cannot_renew_the_lease(tmp_path, monkeypatch):
    """A worker whose database calls block (a network partition; or a SIGSTOPped worker) never got
    to its ownership check: its job process ran on while another worker ran the job after the
    lease. The job process now ends itself once the lease it was last told of runs out."""
    import time

    from service.settings import Settings
    from service.store import Store
    from service.worker import Worker

    hook = tmp_path / "hook"  # the job process's pipeline: a long stage
    hook.mkdir()
    (hook / "sitecustomize.py").write_text("import time, llm_prune.pipeline as p\n"
                                           "p.run_recipe = lambda *a, **k: time.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    settings = Settings(data_dir=tmp_path / "data", prestart_runner=False, lease_seconds=2, heartbeat_seconds=0.5)
    settings.prepare()
    store = Store(settings.db_url)
    store.create_job("k", "m", {}, {"model": "m", "budget": {"ratio": 0.2}}, max_attempts=3)
    worker = Worker(settings, store)
    job = store.claim(worker.id, "cpu", settings.lease_seconds)
    renew, t0, seen = store.heartbeat, time.monotonic(), {}

    def partitioned(*args):
        if time.monotonic() - t0 < 3:  # renewed past the first lease: the job runs on
            seen["alive_while_renewed"] = worker._children[job.id].poll() is None
            return renew(*args)
        time.sleep(settings.lease_seconds + 0.5)  # then a call that hangs past the lease
        seen["alive_after_lease"] = worker._children[job.id].poll() is None
        return False, False

    store.heartbeat = partitioned
    assert worker.run_job(job) is None  # the lease was lost: the job is for another worker now
    assert seen == {"alive_while_renewed": True, "alive_after_lease": False}
    assert "lease on this job ran out" in (settings.job_dir(job.id) / "job.log").read_text()
    store.close()


def _full_database(statement="INSERT INTO job_events"):
    """What SQLite raises when the disk under the job database is full."""
    import sqlite3

    from sqlalchemy.exc import OperationalError

    return OperationalError(statement, {}, sqlite3.OperationalError("database or disk is full"))


def test_a_job_that_fills_the_disk_fails_saying_so_even_when_the_store_refuses_writes(tmp_path, monkeypatch):
    """The last events' write after the job process exits, refused on a full disk, escaped run_job:
    the job stayed `running` until requeued as "worker stopped responding", its cause never said.
    Now the job fails as the server's full disk (no path), and an outcome the store refuses too is
    written once the store takes writes again (the slot's next turn)."""
    import errno

    from service.settings import Settings
    from service.store import Store
    from service.worker import Worker

    hook = tmp_path / "hook"  # the job process's pipeline: a stage that fills the disk
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, llm_prune.pipeline as p\n"
        "from llm_prune.progress import ProgressEvent\n"
        "def run(recipe, out, on_event):\n"
        "    on_event(ProgressEvent(stage='prune', kind='stage_start'))\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device', str(out / 'pruned' / 'config.json'))\n"
        "p.run_recipe = run\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")]))
    settings = Settings(data_dir=tmp_path / "data", prestart_runner=False)
    settings.prepare()
    store = Store(settings.db_url)
    store.create_job("k", "m", {}, {"model": "m", "budget": {"ratio": 0.2}}, max_attempts=3)
    worker = Worker(settings, store)
    job = store.claim(worker.id, "cpu", settings.lease_seconds)
    real_drain, real_finish, refused = worker._drain, store.finish, []

    def drain(job_id, *args):
        real_drain(job_id, *args)
        if job_id not in worker._children:  # the last drain, once the job process has exited
            raise _full_database()

    def finish(*args, **kwargs):
        if not refused:
            refused.append(True)
            raise _full_database("UPDATE jobs")
        return real_finish(*args, **kwargs)

    worker._drain, store.finish = drain, finish
    assert worker.run_job(job) is None and store.get_job(job.id).status == "running"  # nothing could be written
    worker._settle_pending()  # the store takes writes again
    row = store.get_job(job.id)
    message = "no space left on the server's disk (pruned/config.json); the job can be retried once space is freed"
    assert row.status == "failed" and row.error == {"message": message, "param": None, "type": "server_error",
                                                    "code": "insufficient_storage"}
    assert store.list_events(job.id)[0][-1].message == message and worker._unsettled == {}
    store.close()


def test_a_full_disk_before_the_job_process_starts_hands_the_job_back_with_the_reason(tmp_path, monkeypatch):
    """Writing the job's recipe into its folder on a full disk escaped run_job (the job stayed
    `running` until its lease lapsed, the reason unsaid) and left the prestarted runner waiting."""
    import errno
    import subprocess
    from pathlib import Path

    from service.settings import Settings
    from service.store import Store
    from service.worker import Worker

    settings = Settings(data_dir=tmp_path / "data", prestart_runner=False)
    settings.prepare()
    store = Store(settings.db_url)
    store.create_job("k", "m", {}, {"model": "m"}, max_attempts=3)
    worker = Worker(settings, store)
    job = store.claim(worker.id, "cpu", 30)
    spare = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE,
                             start_new_session=True)

    def full(path, *_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(Path, "write_text", full)
    assert worker.run_job(job, spare) is None
    assert spare.poll() is not None  # stopped, not left waiting for a job
    row = store.get_job(job.id)
    assert (row.status, row.attempts, row.lease_owner) == ("queued", 1, None)
    message = store.list_events(job.id)[0][-1].message
    assert "no space left on the server's disk" in message and "retrying" in message
    assert str(settings.data_dir) not in message
    store.close()


def test_an_upload_removed_on_the_server_under_a_queued_job_is_named_by_its_id(tmp_path):
    """The job failed as the user's mistake, quoting the upload's server path ("data.pool: file not
    found: <data>/files/file-.../pool.jsonl"); the README promises the upload's id."""
    from service.settings import Settings
    from service.store import Store
    from service.worker import Worker

    settings = Settings(data_dir=tmp_path / "data", prestart_runner=False)
    settings.prepare()
    store = Store(settings.db_url)
    pool = settings.uploads_dir / "file-abc" / "pool.jsonl"  # removed: its folder is not there
    store.create_job("k", "m", {"data": {"file_id": "file-abc"}},
                     {"model": "m", "budget": {"ratio": 0.2}, "data": {"pool": str(pool)}}, max_attempts=3)
    worker = Worker(settings, store)
    job = store.claim(worker.id, "cpu", 30)
    assert worker.run_job(job) == "failed"
    error = store.get_job(job.id).error
    assert error["type"] == "server_error" and error["code"] == "file_not_found" and error["param"] == "data.file_id"
    assert "upload file-abc (data.file_id) is missing on the server" in error["message"]
    assert "pool.jsonl" not in error["message"] and "<data>" not in error["message"]
    store.close()
