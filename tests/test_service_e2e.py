"""End to end over loopback: a real `llm-prune serve` (uvicorn) process, real workers running the
pipeline in child processes on a tiny model, and the HTTP client. Every wait is bounded."""

import hashlib
import json
import os
import signal
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from service.client import Client
from service.launch import Managed, Server

TERMINAL = ("succeeded", "failed", "cancelled")


def cli_app():
    """The `llm-prune` typer app with every command registered, for in-process CLI runs."""
    from llm_prune.cli import _register, app

    if not any(c.name == "serve" for c in app.registered_commands):
        _register()
    return app


def _wait(predicate, timeout, what, interval=0.25):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """Server environment: fast leases so lost workers are noticed within seconds."""
    root = tmp_path_factory.mktemp("svc")
    from tests.tiny_models import build_model

    model = build_model(root / "models" / "tiny", "llama")
    extra = {"LLM_PRUNE_ALLOWED_MODEL_ROOTS": str(root / "models"), "LLM_PRUNE_LEASE_SECONDS": "3",
             "LLM_PRUNE_HEARTBEAT_SECONDS": "0.5", "LLM_PRUNE_POLL_SECONDS": "0.3",
             "LLM_PRUNE_CANCEL_GRACE_SECONDS": "2", "LLM_PRUNE_MAX_ACTIVE_JOBS_PER_KEY": "200",
             "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    return {"root": root, "model": str(model), "env": extra}


def _key(data_dir, name):
    from service.settings import Settings
    from service.store import Store

    settings = Settings(data_dir=data_dir)
    settings.prepare()
    store = Store(settings.db_url)
    try:
        return store.create_key(name)[1]
    finally:
        store.close()


def _body(model, steps=0):
    return {"model": model, "budget": {"ratio": 0.25},
            "pruning": {"calibration_samples": 2, "calibration_seq_len": 16, "skip_first": 0, "skip_last": 0},
            "recovery": {"method": "lora", "max_steps": steps, "micro_batch_size": 1, "cutoff_len": 32}
            if steps else {"method": "none"},
            "evaluation": {"seq_len": 16, "max_windows": 2}}


def _pool(client, n=64):
    lines = "".join(f'{{"instruction": "Count to {i}.", "output": "{" ".join(map(str, range(i % 9 + 1)))}"}}\n'
                    for i in range(n))
    return client.http.post("/v1/files", files={"file": ("pool.jsonl", lines.encode())},
                            data={"purpose": "recovery"}).json()["id"]


def test_submit_poll_download_load_isolation_restart(env, tmp_path):
    data = tmp_path / "data"
    alice_key, bob_key = _key(data, "alice"), _key(data, "bob")
    with Server(data, env=env["env"], log=tmp_path / "server.log") as server:
        alice, bob = Client(server.url, alice_key), Client(server.url, bob_key)
        job = alice.submit(_body(env["model"]))
        done = _wait(lambda: (j := alice.job(job["id"]))["status"] in TERMINAL and j, 120, "the job to finish")
        assert done["status"] == "succeeded", (done["error"], (tmp_path / "server.log").read_text()[-3000:])
        assert done["progress"] == 1.0 and done["result"]
        events = alice.events(job["id"], limit=1000)["data"]
        assert {"stage_start", "stage_end"} <= {e["kind"] for e in events}
        public = json.dumps([done, events])  # what a client sees names no server path, host or pid
        assert str(data) not in public and socket.gethostname() not in public and '"pid"' not in public
        assert done["result"]["checkpoints"] == {"pruned": "pruned", "final": "final"}

        ckpts = {c["name"]: c for c in alice.checkpoints(job["id"])}
        assert {"pruned", "final"} <= set(ckpts)
        weights = next(f for f in ckpts["final"]["files"] if f["name"].endswith(".safetensors"))
        half = weights["bytes"] // 2
        auth = {"Authorization": f"Bearer {alice_key}"}
        parts = [httpx.get(server.url + weights["url"], headers={**auth, "Range": rng}, timeout=30)
                 for rng in (f"bytes=0-{half - 1}", f"bytes={half}-")]
        assert [p.status_code for p in parts] == [206, 206]
        assert hashlib.sha256(parts[0].content + parts[1].content).hexdigest() == weights["sha256"]

        model_dir = alice.download(job["id"], tmp_path / "dl", "final")  # checks the tar's sha256
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # Per-layer widths ship their modeling file in the checkpoint (auto_map); uniform ones need none.
        remote = "auto_map" in json.loads((model_dir / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote)
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
        out = model(**tok("The quick brown fox", return_tensors="pt"))
        assert out.logits.shape[-1] == model.config.vocab_size
        dense = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(env["model"]).parameters())
        assert sum(p.numel() for p in model.parameters()) < dense

        _cli_client_commands(server.url, alice_key, job["id"], tmp_path)
        for call in (lambda: bob.job(job["id"]), lambda: bob.checkpoints(job["id"]), lambda: bob.cancel(job["id"])):
            with pytest.raises(Exception, match="no job"):
                call()
        assert bob.list_jobs()["data"] == []
        cancelled = _cancel_mid_run(alice, env["model"], data)
        retried = _job_process_killed_is_retried(alice, env["model"], server.url, data)
    with Server(data, env=env["env"]) as server:  # restarted: nothing finished is lost
        again = Client(server.url, alice_key).list_jobs()["data"]
        assert [(j["id"], j["status"]) for j in again] == \
            [(retried, "cancelled"), (cancelled, "cancelled"), (job["id"], "succeeded")]
        assert len(Client(server.url, alice_key).checkpoints(job["id"])) == len(ckpts)


def _cli_client_commands(url, key, job_id, tmp_path):
    from typer.testing import CliRunner

    def run(*args):
        result = CliRunner().invoke(cli_app(), ["jobs", "--server", url, "--api-key", key, *args])
        assert result.exit_code == 0, result.output
        return result.stdout

    assert job_id in run("list")
    assert "succeeded" in run("status", job_id)
    assert json.loads(run("status", job_id, "--json"))["id"] == job_id
    assert "stage_end" in run("events", job_id)
    assert run("events", job_id, "--follow").strip().endswith(f"job {job_id} succeeded")
    out = run("download", job_id, "--out", str(tmp_path / "cli"), "--checkpoint", "pruned")
    assert (tmp_path / "cli" / "pruned" / "config.json").exists(), out
    bad = CliRunner().invoke(cli_app(), ["jobs", "--server", url, "--api-key", "lp-wrong", "list"])
    assert bad.exit_code != 0 and "invalid API key" in str(bad.exception)


def job_pid(data_dir, job_id, attempt=1):
    """The job's process, as its worker recorded it on the server (the API does not show it)."""
    try:
        info = json.loads((data_dir / "jobs" / job_id / "process.json").read_text())
    except (OSError, ValueError):
        return None
    return info["pid"] if info["attempt"] == attempt else None


def _start_long_job(client, model, data_dir):
    body = _body(model, steps=5000)
    body["data"] = {"file_id": _pool(client), "selection": "random", "budget": 1.0}
    job = client.submit(body)
    _wait(lambda: client.job(job["id"])["stage"] not in (None, "job"), 90, "the pipeline to start")
    pid = _wait(lambda: job_pid(data_dir, job["id"]), 60, "the job process")
    assert _alive(pid)
    return job, pid


def _job_process_killed_is_retried(client, model, url, data_dir):
    """A job process killed from outside (as by the OOM killer) is retried and resumes after its
    last finished stage; the `pruned` checkpoint is published as soon as pruning ends."""
    job, pid = _start_long_job(client, model, data_dir)
    pruned = _wait(lambda: {c["name"]: c for c in client.checkpoints(job["id"])}.get("pruned"), 90,
                   "the pruned checkpoint")
    assert client.job(job["id"])["status"] == "running"
    os.kill(pid, signal.SIGKILL)
    second = _wait(lambda: job_pid(data_dir, job["id"], attempt=2), 30, "the second attempt")
    messages = [e["message"] for e in client.events(job["id"], limit=1000)["data"]]
    assert any("SIGKILL" in m and "retrying" in m for m in messages), messages
    assert _alive(second) and client.job(job["id"])["status"] == "running"
    assert httpx.get(f"{url}/healthz").status_code == 200
    # Resumed, not redone: the published checkpoint is byte for byte the same.
    assert {c["name"]: c for c in client.checkpoints(job["id"])}["pruned"]["archive_sha256"] == \
        pruned["archive_sha256"]
    client.cancel(job["id"])
    _wait(lambda: client.job(job["id"])["status"] == "cancelled", 15, "the cancel")
    return job["id"]


def _cancel_mid_run(client, model, data_dir):
    job, pid = _start_long_job(client, model, data_dir)
    t0 = time.monotonic()
    client.cancel(job["id"])
    final = _wait(lambda: (j := client.job(job["id"]))["status"] in TERMINAL and j, 15, "the cancel")
    assert final["status"] == "cancelled" and time.monotonic() - t0 < 10
    _wait(lambda: not _alive(pid), 5, "the job process to exit")
    return job["id"]


def test_worker_killed_mid_job_is_requeued_then_hundred_concurrent_submissions(env, tmp_path):
    data = tmp_path / "data"
    worker_args = ["worker", "--data-dir", str(data)]
    with Server(data, env=env["env"], extra_args=["--no-auth", "--worker-slots", "0"]) as server:
        client = Client(server.url, api_key="")
        body = _body(env["model"], steps=5)
        body["data"] = {"file_id": _pool(client), "selection": "random", "budget": 1.0}
        job = client.submit(body)
        first = Managed(worker_args, env=env["env"], log=tmp_path / "worker1.log").start()
        try:
            _wait(lambda: any(e["kind"] == "stage_end" and e["stage"] != "job"
                              for e in client.events(job["id"], limit=1000)["data"]), 90, "a finished stage")
        finally:
            first.kill()  # kill -9 mid-job
        pid = job_pid(data, job["id"])
        _wait(lambda: not _alive(pid), 5, "the orphaned job process to die with its worker")
        assert client.job(job["id"])["status"] == "running"
        with Managed(worker_args, env=env["env"], log=tmp_path / "worker2.log"):
            done = _wait(lambda: (j := client.job(job["id"]))["status"] in TERMINAL and j, 120, "the resumed job")
        assert done["status"] == "succeeded", done["error"]
        assert done["attempts"] == 2
        messages = [e["message"] for e in client.events(job["id"], limit=1000)["data"]]
        assert any("requeued" in m for m in messages)
        _hundred_concurrent_submissions(server.url, env["model"], client)


def _hundred_concurrent_submissions(url, model, client):
    def submit(i):
        r = httpx.post(f"{url}/v1/jobs", json={"model": model, "budget": {"ratio": 0.1}, "metadata": {"i": i}},
                       timeout=60)
        return r.status_code, r.json().get("id")

    with ThreadPoolExecutor(max_workers=100) as pool:
        results = list(pool.map(submit, range(100)))
    assert [code for code, _ in results] == [200] * 100
    ids = {job_id for _, job_id in results}
    listed, after = [], None
    for _ in range(10):
        page = client.list_jobs(after=after, limit=30)
        listed += [(j["id"], j["metadata"].get("i")) for j in page["data"]]
        if not page["has_more"]:
            break
        after = page["last_id"]
    recorded = [(i, m) for i, m in listed if i in ids]
    assert len(recorded) == 100 and sorted(m for _, m in recorded) == list(range(100))


def test_sigterm_with_an_event_stream_open_stops_the_server_and_hands_the_job_back(env, tmp_path):
    """uvicorn waited for every connection on SIGTERM, and an event-stream follower never closes:
    `docker stop` or systemd then SIGKILLed the server, and its job lost an attempt. Now the server
    closes connections after a bounded wait and its embedded worker releases the running job."""
    import threading

    data = tmp_path / "data"
    server = Server(data, env=env["env"], extra_args=["--no-auth"], log=tmp_path / "server.log").start()
    try:
        client = Client(server.url, api_key="")
        body = _body(env["model"], steps=100_000)
        body["data"] = {"file_id": _pool(client), "selection": "random"}
        job = client.submit(body)
        _wait(lambda: (j := client.job(job["id"]))["stage"] == "recover" and j["status"] == "running", 90,
              "recovery to start")

        def follow():
            try:
                with httpx.stream("GET", f"{server.url}/v1/jobs/{job['id']}/events?stream=true", timeout=None) as r:
                    for _ in r.iter_lines():
                        pass
            except httpx.HTTPError:
                pass  # the server closed it

        threading.Thread(target=follow, daemon=True).start()
        time.sleep(1)
        server.proc.send_signal(signal.SIGTERM)
        server.proc.wait(timeout=20)  # 5 s for connections, then the worker's cancel grace
    finally:
        server.kill()
    with Server(data, env=env["env"], extra_args=["--no-auth", "--worker-slots", "0"]) as again:
        handed_back = Client(again.url, api_key="").job(job["id"])
    assert handed_back["status"] == "queued" and handed_back["attempts"] == 0, handed_back
