"""The service under hostile input: bodies refused before they are read, limits on the stream,
cursors and Range headers that cannot make a 500, no server paths in what a client sees, keys
listed and revoked, failed jobs retried. A real uvicorn server for the socket-level checks."""

import hashlib
import json
import os
import socket
import threading
import time

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from service.store import Store
from tests.api_errors import assert_error as _err

MIN = {"model": "smollm2-135m", "budget": {"ratio": 0.2}}


@pytest.fixture
def env(tmp_path, tiny_llama):
    settings = Settings(data_dir=tmp_path / "data", worker_slots=0, allowed_model_roots=str(tiny_llama.parent),
                        max_upload_bytes=4096, max_json_bytes=64 * 1024, max_metadata_bytes=1024,
                        max_active_jobs_per_key=3)
    app = create_app(settings)
    with TestClient(app) as client:
        store = app.state.store
        keys = [store.create_key(n)[1] for n in ("alice", "bob")]
        yield client, store, settings, [{"Authorization": f"Bearer {k}"} for k in keys]


# --- 1. nothing unauthenticated reads a byte; limits on the stream ---------------------------
@pytest.fixture
def live_server(tmp_path):
    """uvicorn on a free loopback port, in a thread (the guard sits in front of a real socket)."""
    import uvicorn

    from service.launch import SERVER_OPTIONS, free_port

    settings = Settings(data_dir=tmp_path / "live", worker_slots=0, max_upload_bytes=4096)
    app = create_app(settings)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **SERVER_OPTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    key = app.state.store.create_key("live")[1]
    yield server, thread, port, key, settings
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def live(live_server):
    return live_server[2:]


def test_shutdown_does_not_wait_for_a_stalled_upload(live_server):
    """uvicorn waited for every connection to end: a stalled upload or an event stream follower
    kept a SIGTERMed server up until it was SIGKILLed, its job's attempt lost."""
    from service.launch import SERVER_OPTIONS

    server, thread, port, key, _ = live_server
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"POST /v1/files HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                     "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 4000\r\n\r\n--b\r\n".encode())
        time.sleep(0.5)
        server.should_exit = True  # what SIGTERM does
        thread.join(timeout=SERVER_OPTIONS["timeout_graceful_shutdown"] + 5)
        assert not thread.is_alive()


def _chunked_upload(port, key, chunk=1024 * 1024, total=100 * 1024 * 1024, wait=0.5):
    """POST /v1/files chunked, one chunk at a time; returns (response head+body, bytes sent
    before the answer came, bytes the server let us send in all)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    boundary = "b0undary"
    sock.sendall((f"POST /v1/files HTTP/1.1\r\nHost: x\r\n{auth}Transfer-Encoding: chunked\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode())
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.txt\"\r\n"
            f"Content-Type: text/plain\r\n\r\n").encode()
    payload = head + b"x" * (chunk - len(head))
    sent, answer, before_answer = 0, b"", None
    # Long enough for a loaded machine to parse a chunk and answer: a chunk sent after the server
    # closed the connection makes it reset, which can discard its answer unread.
    sock.settimeout(wait)
    try:
        while sent < total:
            sock.sendall(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
            sent += len(payload)
            try:
                got = sock.recv(65536)
            except socket.timeout:
                continue
            if not got:
                break
            answer += got
            if before_answer is None:
                before_answer = sent
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        if before_answer is not None:
            try:
                sock.settimeout(2)
                while (got := sock.recv(65536)):
                    answer += got
            except OSError:
                pass
        sock.close()
    return answer, before_answer, sent


def test_unauthenticated_chunked_upload_refused_after_one_chunk(live):
    port, key, settings = live
    answer, before_answer, sent = _chunked_upload(port, None, wait=5)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert before_answer == 1024 * 1024  # answered after the first chunk
    assert sent < 20 * 1024 * 1024  # and the connection was closed long before 100 MB
    assert b'"invalid_api_key"' in answer and b"connection: close" in answer.lower()


def test_a_request_head_that_never_ends_is_cut_off(live):
    """Headers are read before any guard can run: a client sending an endless header gets a 400
    after 16 KiB, and everyone else is still answered promptly."""
    port, _, _ = live
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ")
    sent, answer = 0, b""
    try:
        while sent < 64 * 1024 * 1024 and not answer:
            sock.sendall(b"x" * (256 * 1024))
            sent += 256 * 1024
            sock.settimeout(0.05)
            try:
                answer = sock.recv(4096)
            except socket.timeout:
                pass
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        sock.close()
    assert sent <= 4 * 1024 * 1024, sent  # refused within the first megabytes, not after 64 MB
    assert not answer or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as other:
        other.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert other.recv(4096).startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < 5


def test_keyed_chunked_upload_over_the_limit_refused_on_the_stream(live):
    port, key, settings = live
    answer, before_answer, sent = _chunked_upload(port, key, chunk=32 * 1024, total=100 * 1024 * 1024)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:300]
    assert before_answer <= 4096 + 64 * 1024 + 2 * 32 * 1024  # limit + framing, then one chunk more
    assert sent < 20 * 1024 * 1024 and b'"file_too_large"' in answer
    assert not any(settings.uploads_dir.iterdir())


def test_a_500_does_not_break_the_next_request_on_a_kept_alive_connection(live, monkeypatch):
    """uvicorn drops the connection after a 500 (Starlette raises the bug on once answered): sent
    without `Connection: close`, the client's next request on it was reset."""
    import httpx

    from service.store import Store

    port, key, _ = live

    def bug(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Store, "list_files", bug)
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"},
                      timeout=10) as client:
        broken = client.get("/v1/files")
        assert broken.status_code == 500 and broken.json()["error"]["code"] == "internal_error"
        assert client.get("/healthz").status_code == 200  # was: ReadError, connection reset by peer
        assert broken.headers["connection"] == "close"
        monkeypatch.undo()
        assert client.get("/v1/files").status_code == 200

def test_json_body_limit_holds_for_chunked_and_declared_bodies(env):
    client, _, _, (alice, _) = env

    def chunks():
        yield b'{"model": "smollm2-135m", "budget": {"ratio": 0.2}, "metadata": {"x": "'
        for _ in range(200):
            yield b"y" * 1024
        yield b'"}}'

    _err(client.post("/v1/jobs", headers={**alice, "content-type": "application/json"}, content=chunks()),
         413, code="body_too_large")
    big = {**MIN, "metadata": {"x": "y" * (20 * 1024 * 1024)}}
    _err(client.post("/v1/jobs", headers=alice, json=big), 413, code="body_too_large")
    _err(client.post("/v1/jobs", json=big), 401)  # no key: refused before the size is even looked at


def test_metadata_limit_and_echoed_once(env):
    client, _, _, (alice, _) = env
    _err(client.post("/v1/jobs", headers=alice, json={**MIN, "metadata": {"x": "y" * 2000}}), 400,
         param="metadata", code="metadata_too_large")
    job = client.post("/v1/jobs", headers=alice, json={**MIN, "metadata": {"team": "nlp"}}).json()
    assert job["metadata"] == {"team": "nlp"} and json.dumps(job).count("nlp") == 1


def test_every_v1_route_needs_a_key_before_anything(env):
    client, *_ = env
    for method, path in (("GET", "/v1/files"), ("POST", "/v1/files"), ("GET", "/v1/files/file-x"),
                         ("DELETE", "/v1/files/file-x"), ("POST", "/v1/jobs"), ("GET", "/v1/jobs"),
                         ("GET", "/v1/jobs/job-x"), ("POST", "/v1/jobs/job-x/cancel"),
                         ("POST", "/v1/jobs/job-x/retry"), ("DELETE", "/v1/jobs/job-x"),
                         ("GET", "/v1/jobs/job-x/events"), ("GET", "/v1/jobs/job-x/checkpoints"),
                         ("GET", "/v1/jobs/job-x/checkpoints/final/archive"),
                         ("GET", "/v1/jobs/job-x/checkpoints/final/files/config.json"), ("GET", "/v1/nothing")):
        _err(client.request(method, path, content=b"{not json"), 401, code="invalid_api_key")


# --- 4 and 8: cursors, Range, error objects --------------------------------------------------
def test_cursors_out_of_range_or_bogus_are_400(env):
    client, store, _, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    huge = "99999999999999999999999"
    _err(client.get(f"/v1/jobs/{job_id}/events?after={huge}", headers=alice), 400, param="after")
    _err(client.get(f"/v1/jobs/{job_id}/events?after={huge}&stream=true", headers=alice), 400, param="after")
    _err(client.get(f"/v1/jobs/{job_id}/events?after=-1", headers=alice), 400, param="after")
    _err(client.get(f"/v1/jobs/{job_id}/events?after=bogus", headers=alice), 400, param="after")
    for bad in (huge, "bogus", "-5", "1e3"):
        _err(client.get(f"/v1/jobs/{job_id}/events?stream=true", headers={**alice, "Last-Event-ID": bad}), 400,
             param="Last-Event-ID")
    assert client.get(f"/v1/jobs/{job_id}/events?after={2**63 - 1}", headers=alice).json()["data"] == []
    _err(client.get("/v1/jobs?after=bogus", headers=alice), 400, param="after", code="invalid_cursor")
    _err(client.get(f"/v1/jobs?after={job_id}", headers=env[3][1]), 400, param="after")  # another key's id
    assert client.get(f"/v1/jobs?after={job_id}", headers=alice).json()["data"] == []


def _publish(settings, job_id, name, files):
    root = settings.job_dir(job_id) / "run" / name
    root.mkdir(parents=True)
    for fname, data in files.items():
        (root / fname).parent.mkdir(parents=True, exist_ok=True)
        (root / fname).write_bytes(data)
    (root / ".done").write_text("{}")
    return root


def test_archive_range_resume_and_range_errors(env, tmp_path):
    client, store, settings, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    weights = os.urandom(70_000)
    _publish(settings, job_id, "pruned", {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights})
    store.claim("w", "cpu", 60)  # still running: the finished stage is published already
    (ckpt,) = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"]
    assert ckpt["name"] == "pruned"
    whole = client.get(ckpt["archive_url"], headers=alice)
    assert whole.headers["accept-ranges"] == "bytes" and whole.headers["etag"] == f'"{ckpt["archive_sha256"]}"'
    tar = whole.content
    assert hashlib.sha256(tar).hexdigest() == ckpt["archive_sha256"]
    for first, last in ((0, 0), (100, 611), (511, 513), (1000, 60_000), (len(tar) - 10, len(tar) - 1)):
        part = client.get(ckpt["archive_url"], headers={**alice, "Range": f"bytes={first}-{last}"})
        assert part.status_code == 206 and part.content == tar[first:last + 1], (first, last)
        assert part.headers["content-range"] == f"bytes {first}-{last}/{len(tar)}"
    tail = client.get(ckpt["archive_url"], headers={**alice, "Range": "bytes=-1000"})
    assert tail.status_code == 206 and tail.content == tar[-1000:]
    stale = client.get(ckpt["archive_url"], headers={**alice, "Range": "bytes=5-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == tar

    err = _err(client.get(ckpt["archive_url"], headers={**alice, "Range": f"bytes={len(tar)}-"}), 416,
               param="Range", code="range_not_satisfiable")
    assert "past the end" in err["message"]
    for bad in ("bytes=abc", "bytes=5-2", "bytes=0-1,4-5", "bytes=-"):
        _err(client.get(ckpt["archive_url"], headers={**alice, "Range": bad}), 400, param="Range")
    file_url = next(f["url"] for f in ckpt["files"] if f["name"] == "model.safetensors")
    r416 = client.get(file_url, headers={**alice, "Range": f"bytes={len(weights) + 5}-"})
    _err(r416, 416, code="range_not_satisfiable")
    assert r416.headers["content-range"] == f"bytes */{len(weights)}"
    assert client.get(file_url, headers={**alice, "Range": f"bytes={2**70}-{2**71}"}).status_code == 416
    # HEAD: a GET's status and headers without the body (download managers and `curl -I` ask first).
    for url, size, sha in ((ckpt["archive_url"], len(tar), ckpt["archive_sha256"]),
                           (file_url, len(weights), hashlib.sha256(weights).hexdigest())):
        head = client.head(url, headers=alice)
        assert head.status_code == 200 and head.content == b"", url
        assert head.headers["content-length"] == str(size) and head.headers["x-content-sha256"] == sha
        part = client.head(url, headers={**alice, "Range": "bytes=10-19"})
        assert part.status_code == 206 and part.headers["content-range"] == f"bytes 10-19/{size}"
        assert part.headers["content-length"] == "10" and part.content == b""
        assert client.head(url, headers={**alice, "Range": f"bytes={size}-"}).status_code == 416
    assert client.head(f"/v1/jobs/{job_id}/checkpoints/pruned/files/nope", headers=alice).status_code == 404
    assert client.head(file_url).status_code == 401

    # The client resumes a broken download from its .part file.
    from service.client import Client

    api = Client("http://testserver", api_key="")
    api.http = client
    client.headers.update(alice)
    out = tmp_path / "dl"
    out.mkdir()
    (out / f"{job_id}-pruned.tar.part").write_bytes(tar[:30_000])
    model_dir = api.download(job_id, out, "pruned")
    assert (model_dir / "model.safetensors").read_bytes() == weights


def test_a_keys_uploads_are_limited_by_its_storage_quota(env):
    """Nothing limited what one key kept: a hundred uploads under the per-upload limit were all
    accepted until the disk was full for every key."""
    client, store, settings, (alice, bob) = env
    settings.max_stored_bytes_per_key = 600

    def upload(headers, name, data=b"x" * 249 + b"\n", **kw):
        return client.post("/v1/files", headers=headers, files={"file": (name, data)}, data={"purpose": "eval"}, **kw)

    first, second = (upload(alice, f"t{i}.txt").json() for i in range(2))
    err = _err(upload(alice, "t2.txt"), 413, param="file", code="storage_quota_exceeded")
    assert "500 bytes" in err["message"] and "limit of 600 bytes" in err["message"], err
    assert err["type"] == "invalid_request_error"
    # Refused with its declared length, before the body is read: no file is that small.
    padded = client.post("/v1/files", headers=alice, files={"file": ("t3.txt", b"y" * 4000)},
                         data={"purpose": "eval", "pad": "p" * 62_000})
    assert "a request body of" in _err(padded, 413, code="storage_quota_exceeded")["message"]
    assert padded.headers["connection"] == "close"
    assert len(list(settings.uploads_dir.iterdir())) == 2  # nothing of the refused uploads is left
    assert upload(bob, "b.txt").status_code == 200  # another key's quota is its own
    assert client.delete(f"/v1/files/{first['id']}", headers=alice).status_code == 200  # deleting frees it
    assert upload(alice, "t4.txt").status_code == 200
    assert [f["id"] for f in client.get("/v1/files", headers=alice).json()["data"]][1] == second["id"]


def test_unfinished_stage_is_not_published(env):
    client, store, settings, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    root = _publish(settings, job_id, "pruned", {"config.json": b"{}"})
    (root / ".done").unlink()  # still being written
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"] == []
    _err(client.get(f"/v1/jobs/{job_id}/checkpoints/pruned/archive", headers=alice), 404)


# --- 6: no server paths; uniform answers for paths in the roots -------------------------------
def test_model_path_errors_do_not_reveal_what_exists(env, tiny_llama):
    client, _, _, (alice, _) = env
    root = tiny_llama.parent
    (root / "empty_dir").mkdir(exist_ok=True)
    (root / "notes.txt").write_text("x")
    messages = []
    for spec in (root / "empty_dir", root / "missing", root / "notes.txt", root / "missing.gguf",
                 root / ".." / "etc", "/etc"):
        err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "model": str(spec)}), 400, "model",
                   "model_not_allowed")
        messages.append(err["message"].replace(str(spec), "<model>"))
    assert len(set(messages)) == 1, messages
    assert str(root) not in messages[0]  # the roots themselves are not named either


def test_no_server_paths_in_job_objects(env):
    client, _, settings, (alice, _) = env
    pool = client.post("/v1/files", headers=alice, files={"file": ("p.jsonl", b'{"instruction": "a", "output": "b"}\n')},
                       data={"purpose": "recovery"}).json()
    job = client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": pool["id"], "selection": "random"}})
    listed = client.get("/v1/jobs", headers=alice).text
    assert str(settings.data_dir) not in job.text and str(settings.data_dir) not in listed
    assert job.json()["recipe"]["data"]["file_id"] == pool["id"]


def test_scrub_turns_server_paths_into_names(tmp_path):
    from service.artifacts import scrub

    data = tmp_path / "data"
    summary = {"checkpoints": {"pruned": f"{data}/jobs/job-1/run/pruned", "final": f"{data}/jobs/job-1/run/final"},
               "note": f"wrote {data}/jobs/job-1/run/final/config.json", "n": 3,
               "error": f"FileNotFoundError: {data}/files/file-1/p.jsonl"}
    out = scrub(summary, data)
    assert out["checkpoints"] == {"pruned": "pruned", "final": "final"} and out["n"] == 3
    assert out["note"] == "wrote final/config.json" and str(data) not in json.dumps(out)


def test_published_checkpoints_do_not_quote_server_paths(env):
    """config.json's `_name_or_path`, the model card's recipe and the plan quoted the job's run
    folder and the uploads' paths; they are scrubbed before the checkpoint is published, and a
    file linked into another stage keeps its own copy."""
    client, store, settings, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    data = str(settings.data_dir)
    config = json.dumps({"_name_or_path": f"{data}/jobs/{job_id}/run/pruned", "model_type": "llama"})
    card = f"---\nbase_model: m\n---\n```json\n{{\"pool\": \"{data}/files/file-1/pool.jsonl\"}}\n```\n"
    adapter = json.dumps({"base_model_name_or_path": f"{data}/jobs/{job_id}/run/pruned", "peft_type": "LORA"})
    root = _publish(settings, job_id, "pruned", {"config.json": config.encode(), "README.md": card.encode(),
                                                 "model.safetensors": data.encode(),
                                                 "adapter/adapter_config.json": adapter.encode(),
                                                 "adapter/README.md": card.encode()})
    elsewhere = root.parent / "linked-config.json"
    os.link(root / "config.json", elsewhere)
    store.claim("w", "cpu", 60)
    (ckpt,) = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"]
    archive = client.get(ckpt["archive_url"], headers=alice).content
    assert hashlib.sha256(archive).hexdigest() == ckpt["archive_sha256"]
    for f in ckpt["files"]:
        body = client.get(f["url"], headers=alice).content
        assert hashlib.sha256(body).hexdigest() == f["sha256"], f["name"]
        if f["name"] != "model.safetensors":  # weights are not text to rewrite
            assert data.encode() not in body, f["name"]
    assert json.loads((root / "config.json").read_text())["_name_or_path"] == "pruned"
    # A kept adapter names the pruned checkpoint it applies to: the download's folder, not the server's.
    assert json.loads((root / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "pruned"
    assert not list((root / "adapter").glob(".*"))
    assert "<data>/files/file-1/pool.jsonl" in (root / "README.md").read_text()
    assert json.loads(elsewhere.read_text())["_name_or_path"].startswith(data)


# --- 9: deferred validation ------------------------------------------------------------------
def test_unknown_hub_id_offline_and_target_above_model_size_refused_at_submission(env, tiny_llama, monkeypatch):
    client, _, _, (alice, _) = env
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "model": "nobody-here/no-such-model-xyz"}), 400,
               param="model")
    assert "hub" in err["message"]
    from transformers import AutoModelForCausalLM

    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_llama).parameters())
    body = {"model": str(tiny_llama), "budget": {"target_params": total + 1}}
    err = _err(client.post("/v1/jobs", headers=alice, json=body), 400, param="budget.target_params")
    assert f"{total:,}" in err["message"]
    ok = client.post("/v1/jobs", headers=alice, json={**body, "budget": {"target_params": total // 2}})
    assert ok.status_code == 200, ok.text


# --- 3: retry of a failed job; a dead job process is retried by its worker -------------------
def test_retry_failed_job_respects_the_active_limit(env):
    client, store, _, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    _err(client.post(f"/v1/jobs/{job_id}/retry", headers=alice), 409, code="job_not_retryable")
    store.claim("w", "cpu", 60)
    store.finish(job_id, "w", "failed", error={"message": "boom", "type": "server_error", "param": None,
                                               "code": "x"})
    for _ in range(3):
        client.post("/v1/jobs", headers=alice, json=MIN)
    _err(client.post(f"/v1/jobs/{job_id}/retry", headers=alice), 429, code="too_many_active_jobs")
    for job in client.get("/v1/jobs", headers=alice).json()["data"]:
        if job["status"] == "queued":
            client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    again = client.post(f"/v1/jobs/{job_id}/retry", headers=alice).json()
    assert again["status"] == "queued" and again["error"] is None and again["attempts"] == 0
    events = client.get(f"/v1/jobs/{job_id}/events", headers=alice).json()["data"]
    assert "retry requested" in events[-1]["message"]


def test_dead_job_process_is_retried_within_max_attempts(tmp_path):
    import signal

    from service.worker import Worker

    settings = Settings(data_dir=tmp_path / "d", worker_slots=0)
    settings.prepare()
    store = Store(settings.db_url)
    worker = Worker(settings, store, worker_id="w")
    job = store.create_job("k", "m", {}, {"model": "m"}, max_attempts=2)
    for attempt, expected in ((1, "queued"), (2, "failed")):
        claimed = store.claim("w", "cpu", 60)
        assert claimed.attempts == attempt
        assert worker._finish(claimed, settings.job_dir(job.id), -signal.SIGKILL, {}) == expected
    row = store.get_job(job.id)
    assert row.status == "failed" and row.error["code"] == "job_process_died"
    messages = [e.message for e in store.list_events(job.id)[0]]
    assert "SIGKILL" in messages[0] and "retrying" in messages[0] and "gave up after 2" in messages[1]
    store.close()


# --- 7: keys list and revoke -----------------------------------------------------------------
def test_cli_keys_list_and_revoke(tmp_path):
    from typer.testing import CliRunner

    from tests.test_service_e2e import cli_app

    def run(*args):
        result = CliRunner().invoke(cli_app(), ["keys", *args, "--data-dir", str(tmp_path)])
        return result

    secret = run("create", "--name", "ci").stdout.strip().splitlines()[0]
    listed = json.loads(run("list", "--json").stdout)
    assert [k["name"] for k in listed] == ["ci"] and secret not in json.dumps(listed)
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    assert store.key_owner(secret) == listed[0]["id"]
    assert run("revoke", listed[0]["id"]).exit_code == 0
    assert store.key_owner(secret) is None and json.loads(run("list", "--json").stdout) == []
    missing = run("revoke", "key-nope")
    assert missing.exit_code != 0 and "no API key" in str(missing.exception)
    store.close()


def test_revoked_key_is_refused_at_once(env):
    client, store, _, (alice, _) = env
    assert client.get("/v1/jobs", headers=alice).status_code == 200
    owner = store.key_owner(alice["Authorization"].split()[1])
    assert store.revoke_key(owner)
    _err(client.get("/v1/jobs", headers=alice), 401)


def _live_job(settings, key):
    """A queued job of the live server's key, made through the store the server uses."""
    store = Store(settings.db_url)
    owner = store.key_owner(key)
    job = store.create_job(owner, "m", {"model": "m"}, {"model": "m"}, max_attempts=1)
    return store, owner, job.id


def test_an_open_event_stream_ends_when_its_key_is_revoked(live, monkeypatch):
    """The key was checked once per request: a follower kept receiving a job's events for as long as
    the job ran after its key was revoked."""
    import httpx

    import service.auth

    monkeypatch.setattr(service.auth, "RECHECK_SECONDS", 0.2, raising=False)
    port, key, settings = live
    store, owner, job_id = _live_job(settings, key)
    lines, url = [], f"http://127.0.0.1:{port}/v1/jobs/{job_id}/events?stream=true"
    with httpx.stream("GET", url, headers={"Authorization": f"Bearer {key}"}, timeout=10) as r:
        assert r.status_code == 200
        time.sleep(0.5)
        assert store.revoke_key(owner)
        revoked = time.monotonic()
        lines = list(r.iter_lines())  # ends by itself: no job end comes (the job stays queued)
    assert time.monotonic() - revoked < 3, "the stream went on after its key was revoked"
    assert "event: error" in lines
    err = json.loads(next(x for x in lines if x.startswith("data:")).split(":", 1)[1])["error"]
    assert err["code"] == "invalid_api_key" and "revoked" in err["message"]
    assert httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code == 401
    store.close()


def test_a_download_in_progress_ends_when_its_key_is_revoked(live, monkeypatch):
    import httpx

    import service.auth

    monkeypatch.setattr(service.auth, "RECHECK_SECONDS", 0.2, raising=False)
    port, key, settings = live
    store, owner, job_id = _live_job(settings, key)
    size = 32 * 1024 * 1024  # past what the socket buffers hold
    _publish(settings, job_id, "pruned", {"config.json": b"{}", "model.safetensors": os.urandom(size)})
    auth = {"Authorization": f"Bearer {key}"}
    url = f"http://127.0.0.1:{port}/v1/jobs/{job_id}/checkpoints/pruned/archive"
    got = 0
    with pytest.raises(httpx.RemoteProtocolError):  # cut off short of its Content-Length
        with httpx.stream("GET", url, headers=auth, timeout=10) as r:
            assert r.status_code == 200 and int(r.headers["content-length"]) > size
            chunks = r.iter_bytes(64 * 1024)
            got += len(next(chunks))
            assert store.revoke_key(owner)
            time.sleep(0.5)
            for chunk in chunks:
                got += len(chunk)
    assert got < size // 2
    r = httpx.get(url, headers={**auth, "Range": f"bytes={got}-"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    store.close()


# --- 9: what JSON carries but a job cannot keep; names past the file system; odd headers -------
def _raw(client, headers, body: str):
    return client.post("/v1/jobs", headers={**headers, "Content-Type": "application/json"}, content=body.encode())


def test_unpaired_surrogates_and_non_numbers_are_refused_before_a_job_exists(env, tiny_llama):
    client, store, _, (alice, _) = env
    surrogate = '"\\ud800"'
    for body in (f'{{"model": "smollm2-135m", "budget": {{"ratio": 0.2}}, "metadata": {{"k": {surrogate}}}}}',
                 f'{{"model": "smollm2-135m", "budget": {{"ratio": 0.2}}, "metadata": {{{surrogate}: 1}}}}',
                 f'{{"model": "smollm2-135m", "budget": {{"ratio": 0.2}}, "evaluation": {{"tasks": [{surrogate}]}}}}',
                 f'{{"model": "smollm2-135m", "budget": {{"ratio": 0.2}}, "data": {{"file_id": {surrogate}}}}}',
                 f'{{"model": {surrogate}, "budget": {{"ratio": 0.2}}}}',
                 '{"model": "smollm2-135m", "budget": {"ratio": 0.2}, "metadata": {"x": NaN}}',
                 '{"model": "smollm2-135m", "budget": {"ratio": 0.2}, "recovery": {"learning_rate": Infinity}}',
                 '{"model": "smollm2-135m", "budget": {"ratio": 0.2}, "recovery": {"epochs": 1e400}}'):
        err = _err(_raw(client, alice, body), 400)
        err["message"].encode("utf-8")
    _err(_raw(client, alice, '{"model": "smollm2-135m", "budget": {"ratio": 0.2}, '
                             '"evaluation": {"tasks": ["no_such_task"]}}'), 400, param="evaluation.tasks")
    _err(client.post("/v1/jobs", headers={**alice, "Content-Type": "application/json"}, content=b'{"model": "\xff"}'),
         400, code="json_invalid")
    listed = client.get("/v1/jobs", headers=alice)
    assert listed.status_code == 200 and listed.json()["data"] == []  # nothing was stored half-way


def test_model_names_past_the_file_system_are_400(env, tiny_llama):
    client, _, _, (alice, _) = env
    for model in ("a" * 256, "org/" + "a" * 5000, f"{tiny_llama}/" + "x" * 300, f"{tiny_llama}\u0000x"):
        _err(client.post("/v1/jobs", headers=alice, json={**MIN, "model": model}), 400, param="model")


def test_long_upload_names_and_unreadable_pools_leave_no_folder(env):
    client, _, settings, (alice, _) = env
    record = b'{"instruction": "a", "output": "b"}\n'
    ok = client.post("/v1/files", headers=alice, files={"file": ("n" * 300 + ".jsonl", record)})
    assert ok.status_code == 200, ok.text
    assert ok.json()["filename"].endswith(".jsonl") and len(ok.json()["filename"].encode()) <= 200
    deep = b"[" * 1900 + b"]" * 1900  # valid JSON, deeper than Python's decoder recurses
    _err(client.post("/v1/files", headers=alice, files={"file": ("p.json", deep)}), 400, param="file")
    _err(client.post("/v1/files", headers=alice, files={"file": ("p.jsonl", deep)}), 400, param="file")
    folders = sorted(p.name for p in settings.uploads_dir.iterdir())
    assert folders == [ok.json()["id"]]


def test_huge_range_numbers_and_empty_files_and_odd_event_ids(env):
    client, _, settings, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    _publish(settings, job_id, "pruned", {"config.json": b"{}", "empty.txt": b""})
    url = f"/v1/jobs/{job_id}/checkpoints/pruned/files/config.json"
    nines = "9" * 5000
    err = _err(client.get(url, headers={**alice, "Range": f"bytes={nines}-"}), 416, code="range_not_satisfiable")
    assert "range starts at byte 9999999999" in err["message"] and "10000000" not in err["message"]
    assert client.get(url, headers={**alice, "Range": f"bytes=0-{nines}"}).content == b"{}"
    assert client.get(url, headers={**alice, "Range": f"bytes=-{nines}"}).content == b"{}"
    empty = client.get(f"/v1/jobs/{job_id}/checkpoints/pruned/files/empty.txt", headers={**alice, "Range": "bytes=0-"})
    _err(empty, 416)
    assert empty.headers["content-range"] == "bytes */0"
    for bad in (b"\xb2", b"1\xb2", "\u0661".encode()):  # superscript two; Arabic-Indic one (UTF-8 bytes)
        _err(client.get(f"/v1/jobs/{job_id}/events?stream=true", headers={**alice, "Last-Event-ID": bad}), 400,
             param="Last-Event-ID")


def test_retry_refused_when_the_jobs_upload_is_gone(env):
    client, store, _, (alice, _) = env
    pool = client.post("/v1/files", headers=alice,
                       files={"file": ("p.jsonl", b'{"instruction": "a", "output": "b"}\n' * 4)}).json()["id"]
    job_id = client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": pool}}).json()["id"]
    store.claim("w", "cpu", 60)
    store.finish(job_id, "w", "failed", error={"message": "boom", "type": "server_error", "param": None, "code": "x"})
    assert client.delete(f"/v1/files/{pool}", headers=alice).status_code == 200
    err = _err(client.post(f"/v1/jobs/{job_id}/retry", headers=alice), 409, param="data.file_id",
               code="file_not_found")
    assert pool in err["message"]
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["status"] == "failed"


def test_nul_characters_and_deep_nesting_are_400_before_the_store_sees_them(env, tiny_llama):
    """PostgreSQL refuses a NUL in any text it is given (ids, cursors, stored bodies), and a body
    nested past a few hundred levels cannot be serialised back: both are the client's, not a 500."""
    client, _, _, (alice, _) = env
    for method, url in (("GET", "/v1/jobs?after=a%00b"), ("GET", "/v1/jobs/job-%00x"),
                        ("DELETE", "/v1/jobs/job-%00x"), ("POST", "/v1/jobs/job-%00x/cancel"),
                        ("GET", "/v1/jobs/job-%00x/events"), ("GET", "/v1/files/file-%00x")):
        _err(client.request(method, url, headers=alice), 400, code="invalid_characters")
    for body in ({**MIN, "data": {"file_id": "f\u0000"}}, {**MIN, "evaluation": {"ppl": "f\u0000"}},
                 {**MIN, "recovery": {"target_modules": ["q_proj\u0000evil"]}}, {**MIN, "metadata": {"k\u0000": 1}}):
        assert "NUL" in _err(client.post("/v1/jobs", headers=alice, json=body), 400)["message"]
    deep: dict = {}
    for _ in range(300):
        deep = {"a": deep}
    assert "nested deeper than" in _err(client.post("/v1/jobs", headers=alice, json={**MIN, "metadata": deep}),
                                        400)["message"]
    assert client.get("/v1/jobs", headers=alice).json()["data"] == []


def test_embedding_model_paths_stay_inside_the_model_roots(env, tiny_llama):
    """PASER's embedder is loaded on the server too: the same roots and the same words as `model`."""
    client, _, _, (alice, _) = env
    pool = client.post("/v1/files", headers=alice, data={"purpose": "recovery"},
                       files={"file": ("p.jsonl", b'{"instruction": "a", "output": "b"}\n' * 4)}).json()["id"]
    messages = []
    (tiny_llama.parent / "empty_embedder").mkdir(exist_ok=True)
    for spec in ("/etc/passwd", "/nonexistent/dir", "/root", "../../../../etc", str(tiny_llama.parent / "missing"),
                 str(tiny_llama.parent / "empty_embedder")):
        body = {**MIN, "model": str(tiny_llama), "data": {"file_id": pool, "embedding_model": spec}}
        err = _err(client.post("/v1/jobs", headers=alice, json=body), 400, "data.embedding_model", "model_not_allowed")
        messages.append(err["message"].replace(spec, "<path>"))
    assert len(set(messages)) == 1, messages
    for spec in (" ", "a" * 5000, "\\\\server\\share"):  # never a hub id: refused now, not after pruning
        body = {**MIN, "model": str(tiny_llama), "data": {"file_id": pool, "embedding_model": spec}}
        _err(client.post("/v1/jobs", headers=alice, json=body), 400, "data.embedding_model", "model_not_allowed")
    ok = {**MIN, "model": str(tiny_llama), "data": {"file_id": pool, "embedding_model": str(tiny_llama)}}
    assert client.post("/v1/jobs", headers=alice, json=ok).status_code == 200


def test_deleting_a_job_that_is_stopping_says_so(env):
    client, store, _, (alice, _) = env
    job = client.post("/v1/jobs", headers=alice, json=MIN).json()
    store.claim("w1", "cpu", 30)
    assert client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice).status_code == 200
    err = _err(client.delete(f"/v1/jobs/{job['id']}", headers=alice), 409, code="job_running")
    assert "stopping (cancel accepted)" in err["message"]


def test_a_retried_submission_with_its_idempotency_key_makes_one_job(env):
    client, _, _, (alice, _) = env
    key = {**alice, "Idempotency-Key": "7f1c2b9e-retry"}
    first = client.post("/v1/jobs", headers=key, json=MIN)
    again = client.post("/v1/jobs", headers=key, json=MIN)
    assert first.status_code == again.status_code == 200 and first.json()["id"] == again.json()["id"]
    _err(client.post("/v1/jobs", headers=key, json={**MIN, "budget": {"ratio": 0.3}}), 409,
         "Idempotency-Key", "idempotency_key_reused")
    _err(client.post("/v1/jobs", headers={**alice, "Idempotency-Key": "x" * 300}, json=MIN), 400,
         "Idempotency-Key", "invalid_idempotency_key")
    assert len(client.get("/v1/jobs", headers=alice).json()["data"]) == 1


def test_error_messages_do_not_send_back_a_huge_value(env):
    client, _, _, (alice, _) = env
    long_id = "job-" + "x" * 10_000
    err = _err(client.get(f"/v1/jobs/{long_id}", headers=alice), 404)
    assert len(err["message"]) < 200 and "(10,004 characters)" in err["message"]
    r = client.post("/v1/files", headers=alice, files={"file": ("p.jsonl", b'{"instruction": "a", "output": "b"}\n')},
                    data={"purpose": "p" * 60_000})
    err = _err(r, 400, param="purpose")
    assert len(err["message"]) < 300 and "(60,000 characters)" in err["message"]


# --- hostile model files: refused at submission, before any module is built --------------------
def _model_in_root(tiny_llama, name, edit=None):
    import shutil

    dst = tiny_llama.parent / name
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(tiny_llama, dst)
    if edit is not None:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_a_config_with_millions_of_layers_is_refused_before_anything_is_built(env, tiny_llama, few_layers_built):
    """budget.target_params built the model on the meta device in the request thread: 10 million
    layers grew the server without bound and the request never returned."""
    client, _, _, (alice, _) = env
    model = _model_in_root(tiny_llama, "layers_huge", lambda c: c.update(num_hidden_layers=10**7))
    for budget in ({"target_params": 1000}, {"ratio": 0.2}):
        err = _err(client.post("/v1/jobs", headers=alice, json={"model": str(model), "budget": budget}), 400,
                   param="model")
        assert "num_hidden_layers must be a positive integer" in err["message"], err
    assert not few_layers_built


@pytest.mark.parametrize("case", ["kv heads zero", "null", "5000 digits", "device", "fifo", "eos past vocab"])
def test_broken_configs_are_400_at_submission(case, env, tiny_llama, fifo_writer):
    """Accepted before, then failed on the worker as server_error (MemoryError, TypeError, ...)."""
    client, _, _, (alice, _) = env
    model = _model_in_root(tiny_llama, "broken_" + case.replace(" ", "_"))
    cfg = model / "config.json"
    needle = {"kv heads zero": "num_key_value_heads must be a positive integer", "null": "expected a JSON object",
              "5000 digits": "thousands of digits", "device": "inside the server's allowed model roots",
              "fifo": "not a regular file", "eos past vocab": "eos_token_id must be a token id"}[case]
    if case == "kv heads zero":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "num_key_value_heads": 0}))
    elif case == "eos past vocab":
        cfg.write_text(json.dumps({**json.loads(cfg.read_text()), "eos_token_id": 10**6}))
    elif case == "null":
        cfg.write_text("null")
    elif case == "5000 digits":
        cfg.write_text('{"model_type": "llama", "vocab_size": ' + "9" * 5000 + "}")
    elif case == "device":  # /dev/zero read until MemoryError, which was swallowed: the job was accepted
        cfg.unlink()
        cfg.symlink_to("/dev/null")
    else:  # a FIFO blocked the request thread for ever
        cfg.unlink()
        fifo_writer(cfg)
    for budget in ({"ratio": 0.2}, {"target_params": 1000}):
        err = _err(client.post("/v1/jobs", headers=alice, json={"model": str(model), "budget": budget}), 400,
                   param="model")
        assert needle in err["message"] and "Exceeds the limit" not in err["message"], err
    assert client.get("/v1/jobs", headers=alice).json()["data"] == []  # no job made


def test_a_link_in_an_allowed_model_folder_to_a_file_outside_the_roots_is_refused(env, tiny_llama):
    client, _, _, (alice, _) = env
    model = _model_in_root(tiny_llama, "linked_out")
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to("/etc/passwd")
    outside = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "model": "/etc"}), 400, "model",
                   "model_not_allowed")
    err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "model": str(model)}), 400, "model",
               "model_not_allowed")
    assert err["message"].replace(str(model), "<model>") == outside["message"].replace("/etc", "<model>")
    # A link that stays inside the roots is a model's own business (the Hub cache links every file).
    (model / "tokenizer_config.json").unlink()
    (model / "tokenizer_config.json").symlink_to(tiny_llama / "tokenizer_config.json")
    ok = client.post("/v1/jobs", headers=alice, json={**MIN, "model": str(model)})
    assert ok.status_code == 200, ok.text
