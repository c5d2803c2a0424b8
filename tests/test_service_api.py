"""Every endpoint and error case of the REST API, in-process (httpx through FastAPI's TestClient).
The worker is off here; jobs are moved through their states with the store, as a worker would."""

import hashlib
import io
import json
import time
import tarfile

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.api_errors import assert_error as _err

MIN = {"model": "smollm2-135m", "budget": {"ratio": 0.2}}


@pytest.fixture
def env(tmp_path, tiny_llama):
    settings = Settings(data_dir=tmp_path / "data", worker_slots=0, allowed_model_roots=str(tiny_llama.parent),
                        max_upload_bytes=4096, max_active_jobs_per_key=3)
    app = create_app(settings)
    with TestClient(app) as client:
        store = app.state.store
        keys = [store.create_key(n)[1] for n in ("alice", "bob")]
        yield client, store, settings, [{"Authorization": f"Bearer {k}"} for k in keys]


def _upload(client, headers, name, content, purpose="recovery"):
    return client.post("/v1/files", headers=headers, files={"file": (name, content)}, data={"purpose": purpose})


def test_health_and_docs(env):
    client, *_ = env
    assert client.get("/healthz").json()["status"] == "ok"
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    paths = spec["paths"]
    assert "/v1/jobs/{job_id}/checkpoints/{name}/archive" in paths and "/v1/files" in paths
    # What the schema promises is what is sent: 400 with the error object, never FastAPI's 422;
    # the bearer key is declared, so generated clients and /docs send it.
    assert spec["components"]["securitySchemes"]["APIKey"] == {**spec["components"]["securitySchemes"]["APIKey"],
                                                               "type": "http", "scheme": "bearer"}
    error = {"$ref": "#/components/schemas/ErrorResponse"}
    for path, operations in paths.items():
        for method, op in operations.items():
            assert "422" not in op["responses"], (method, path)
            assert op["responses"]["503"]["content"]["application/json"]["schema"] == error
            assert (op.get("security") == [{"APIKey": []}]) == path.startswith("/v1/"), (method, path)
    assert "507" in paths["/v1/files"]["post"]["responses"] and "507" in paths["/v1/jobs"]["post"]["responses"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]


@pytest.mark.parametrize("method, path, allowed", [
    ("PUT", "/v1/jobs", "GET, POST"), ("PATCH", "/v1/jobs/job_x", "DELETE, GET"),
    ("PUT", "/v1/files/file_x", "DELETE, GET"), ("POST", "/healthz", "GET")])
def test_a_wrong_method_names_every_method_the_path_takes(env, method, path, allowed):
    client, _, _, (alice, _) = env
    r = client.request(method, path, headers=alice)
    _err(r, 405, code="method_not_allowed")
    assert r.headers["allow"] == allowed and allowed in r.json()["error"]["message"]


def test_authentication(env, tmp_path):
    client, _, _, (alice, _) = env
    assert _err(client.get("/v1/jobs"), 401, code="invalid_api_key")["type"] == "authentication_error"
    _err(client.get("/v1/jobs", headers={"Authorization": "Bearer lp-nope"}), 401)
    assert client.get("/v1/jobs", headers=alice).status_code == 200
    open_app = create_app(Settings(data_dir=tmp_path / "open", worker_slots=0, no_auth=True))
    with TestClient(open_app, base_url="http://localhost:8000") as open_client:
        assert open_client.post("/v1/jobs", json=MIN).json()["status"] == "queued"


def test_no_auth_answers_loopback_hosts_and_origins_only(tmp_path):
    """Without keys, a web page could drive the server through its visitor's browser: DNS
    rebinding (the page's own name resolved to 127.0.0.1: Host is that name) and cross-site
    'simple' requests (a form's multipart POST carries the page's Origin)."""
    open_app = create_app(Settings(data_dir=tmp_path / "open", worker_slots=0, no_auth=True))
    with TestClient(open_app, base_url="http://127.0.0.1:8000") as c:
        for host in ("localhost", "localhost:18765", "127.0.0.1:8000", "[::1]:8000", "LocalHost"):
            assert c.get("/v1/jobs", headers={"Host": host}).status_code == 200, host
        for origin in ("http://localhost:3000", "http://127.0.0.1:8000", "https://[::1]"):
            assert c.get("/v1/jobs", headers={"Origin": origin}).status_code == 200, origin
        for host in ("attacker.example:18765", "localhost.attacker.example", "127.0.0.1.nip.io:8000", "[::2]:80"):
            _err(c.get("/v1/jobs", headers={"Host": host}), 400, param="Host", code="invalid_host")
            _err(c.delete("/v1/jobs/job-x", headers={"Host": host}), 400, code="invalid_host")
        for origin in ("https://evil.example", "null", "http://localhost.evil.example", "file://"):
            _err(c.get("/v1/jobs", headers={"Origin": origin}), 403, param="Origin", code="cross_origin_refused")
        r = c.post("/v1/files", files={"file": ("x.txt", b"held-out text\n")}, data={"purpose": "eval"},
                   headers={"Origin": "https://evil.example"})
        assert _err(r, 403, code="cross_origin_refused")["type"] == "permission_error"
        r = c.post("/v1/jobs", content=json.dumps(MIN), headers={"Content-Type": "text/plain",
                                                                 "Origin": "https://evil.example"})
        _err(r, 403, code="cross_origin_refused")
        assert c.get("/v1/files").json()["data"] == [] and c.get("/v1/jobs").json()["data"] == []


def test_files_upload_list_get_delete(env):
    client, _, _, (alice, bob) = env
    pool = (b'{"instruction": "Say hi", "output": "hi"}\n\n{"text": "unknown form"}\n'
            b'{"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}\n')
    f = _upload(client, alice, "pool.jsonl", pool).json()
    assert f["records"] == 2 and f["malformed"] == 1 and f["bytes"] == len(pool) and f["sha256"] == hashlib.sha256(pool).hexdigest()
    text = _upload(client, alice, "eval.txt", b"Some held-out text.\n", "eval").json()
    assert text["purpose"] == "eval" and text["records"] is None
    assert [x["id"] for x in client.get("/v1/files", headers=alice).json()["data"]] == [text["id"], f["id"]]
    assert client.get(f"/v1/files/{f['id']}", headers=alice).json()["filename"] == "pool.jsonl"
    _err(client.get(f"/v1/files/{f['id']}", headers=bob), 404)
    _err(client.delete(f"/v1/files/{f['id']}", headers=bob), 404)
    assert client.get("/v1/files", headers=bob).json()["data"] == []
    assert client.delete(f"/v1/files/{f['id']}", headers=alice).json()["deleted"] is True
    _err(client.get(f"/v1/files/{f['id']}", headers=alice), 404)


@pytest.mark.parametrize("name,content,purpose,fragment", [
    ("pool.jsonl", b'{"text": oops}\n', "recovery", "pool.jsonl:1: invalid JSON"),
    ("pool.jsonl", b'[1, 2]\n', "recovery", "pool.jsonl:1: expected an object"),
    ("pool.jsonl", b'{"title": "no text"}\n', "recovery", "unknown form"),
    ("pool.json", b'[{"instruction": "hi"}]', "recovery", "has 'instruction' but no 'output'"),
    ("pool.txt", b"a,b\n", "recovery", "must be one of"),
    ("pool.jsonl", b"", "recovery", "empty"),
    ("eval.txt", b"\xff\xfe\x00bad", "eval", "UTF-8"),
    ("eval.txt", b"hello", "training", "purpose must be one of"),
])
def test_upload_format_errors(env, name, content, purpose, fragment):
    client, _, settings, (alice, _) = env
    err = _err(_upload(client, alice, name, content, purpose), 400)
    assert fragment in err["message"], err
    assert not any(settings.uploads_dir.iterdir())  # nothing kept of a rejected upload


def test_a_pool_that_decodes_to_far_more_than_was_uploaded_is_refused_row_by_row(env, tmp_path):
    """Under 1 KB of Parquet (one long string, dictionary-encoded and compressed, in many rows)
    decoded to 800 MB, all of it held at once in the API server by the upload's check."""
    import resource

    import pyarrow as pa
    import pyarrow.parquet as pq

    client, _, settings, (alice, _) = env
    rows = 20_000
    pq.write_table(pa.table({"instruction": ["q" * 10_000] * rows, "output": ["a"] * rows}),
                   tmp_path / "bomb.parquet", compression="zstd")
    content = (tmp_path / "bomb.parquet").read_bytes()
    assert len(content) < 4096  # under the upload limit, 200 MB once decoded
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = _err(_upload(client, alice, "bomb.parquet", content), 400)
    assert "decode to more than 16 characters per byte uploaded" in err["message"], err
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # KiB: no whole-table read
    assert not any(settings.uploads_dir.iterdir())
    small = tmp_path / "ok.parquet"  # the same shape at a size that decodes within the limit
    pq.write_table(pa.table({"instruction": ["q" * 10] * 20, "output": ["a"] * 20}), small)
    assert _upload(client, alice, "ok.parquet", small.read_bytes()).json()["records"] == 20


def test_upload_size_limit(env):
    client, _, _, (alice, _) = env
    _err(_upload(client, alice, "big.txt", b"x" * 5000, "eval"), 413, code="file_too_large")


def test_submit_minimal_and_full(env, tiny_llama):
    client, _, _, (alice, _) = env
    job = client.post("/v1/jobs", headers=alice, json=MIN).json()
    assert job["status"] == "queued" and job["progress"] == 0 and job["id"].startswith("job-")
    assert job["recipe"]["pruning"]["importance"] == "obs"  # defaults fill the rest (obs unless allocation is adaptive)
    pool = _upload(client, alice, "pool.jsonl", b'{"instruction": "a", "output": "b"}\n').json()
    text = _upload(client, alice, "eval.txt", b"held out\n", "eval").json()
    body = {"model": str(tiny_llama), "budget": {"target_params": 50000},
            "data": {"file_id": pool["id"], "selection": "random", "budget": 0.5},
            "recovery": {"method": "lora", "max_steps": 3}, "evaluation": {"ppl": text["id"]},
            "metadata": {"team": "nlp"}}
    job = client.post("/v1/jobs", headers=alice, json=body).json()
    assert job["recipe"]["data"]["file_id"] == pool["id"] and "pool" not in job["recipe"]["data"]
    _err(client.delete(f"/v1/files/{pool['id']}", headers=alice), 409, code="file_in_use")
    client.post(f"/v1/jobs/{job['id']}/cancel", headers=alice)
    assert client.delete(f"/v1/files/{text['id']}", headers=alice).json()["deleted"]
    assert job["recipe"]["evaluation"]["ppl"] == text["id"]  # ids, never server paths
    assert job["metadata"] == {"team": "nlp"} and "metadata" not in job["recipe"]


@pytest.mark.parametrize("body,param,code", [
    ({"budget": {"ratio": 0.2}}, "model", "missing"),
    ({"model": "smollm2-135m"}, "budget", "missing"),
    ({**MIN, "budget": {"ratio": 0}}, "budget.ratio", None),
    ({**MIN, "budget": {"ratio": 0.95}}, "budget.ratio", None),
    ({**MIN, "budget": {"ratio": 0.2, "target_params": 10}}, "budget", None),
    ({**MIN, "pruning": {"importance": "magic"}}, "pruning.importance", None),
    ({**MIN, "recovery": {"method": "dora"}}, "recovery.method", None),
    ({**MIN, "data": {"file_id": "file-missing"}}, "data.file_id", "file_not_found"),
    ({**MIN, "evaluation": {"ppl": "/etc/passwd"}}, "evaluation.ppl", "file_not_found"),
    ({**MIN, "colour": "red"}, "colour", "extra_forbidden"),
    ({**MIN, "model": "/etc"}, "model", "model_not_allowed"),
    ({**MIN, "model": "relative/dir/model"}, "model", "model_not_allowed"),
    ({**MIN, "model": "nonsense"}, "model", None),
    ({**MIN, "trust_remote_code": True}, "trust_remote_code", "remote_code_not_allowed"),
    ({**MIN, "recovery": {"method": "lora", "max_steps": 0}}, "recovery.max_steps", None),
    ({**MIN, "export": {"gguf": "q4_k"}}, "export.gguf", None),
    ({**MIN, "recovery": {"lora_r": 100000}}, "recovery.lora_r", None),
    ({**MIN, "recovery": {"target_modules": []}}, "recovery.target_modules", None),  # not "all of them"  # above the hidden size: only allocates
    ({**MIN, "recovery": {"cutoff_len": 100000}}, "recovery.cutoff_len", None),
    ({**MIN, "pruning": {"calibration_seq_len": 100000}}, "pruning.calibration_seq_len", None),
    ({**MIN, "recovery": {"max_steps": 3_000_000_000}}, "recovery.max_steps", None),
    ({**MIN, "recovery": {"target_modules": ["q_porj"]}}, "recovery.target_modules", None),
    ({**MIN, "pruning": {"prune_attention": False, "prune_mlp": False}}, "pruning", None),
    ({**MIN, "pruning": {"prune_layers": 1_000_000}}, "pruning.prune_layers", None),
    ({**MIN, "pruning": {"skip_first": 1_000_000}}, "pruning.skip_first", None),
    ({**MIN, "pruning": {"prune_layers": 27}}, "pruning.prune_layers", None),  # 26 of 30 open to uniform
])
def test_submit_validation_errors(env, body, param, code):
    client, _, _, (alice, _) = env
    _err(client.post("/v1/jobs", headers=alice, json=body), 400, param=param, code=code)


@pytest.mark.parametrize("body, param", [
    ({**MIN, "pruning": {"calibration": "\ud800"}}, "pruning.calibration"),
    ({**MIN, "data": {"file_id": "file-x", "embedding_model": "e\udcff"}}, "data.embedding_model"),
    ({**MIN, "recovery": {"target_modules": ["q_proj", "\ud800"]}}, "recovery.target_modules[1]"),
])
def test_recipe_text_that_is_no_unicode_is_a_400(env, body, param):
    """A `\\ud800` escape is JSON but no text (the CLI's non-UTF-8 arguments arrive the same way):
    refused naming the field, not a 500 when the job is written."""
    client, _, _, (alice, _) = env
    r = client.post("/v1/jobs", headers={**alice, "Content-Type": "application/json"}, content=json.dumps(body))
    _err(r, 400, param=param)


def test_a_pool_too_small_for_its_clusters_is_refused_at_submission(env):
    client, _, _, (alice, _) = env
    line = b'{"instruction": "a", "output": "b"}\n'
    three = _upload(client, alice, "three.jsonl", line * 3).json()["id"]
    ten = _upload(client, alice, "ten.jsonl", line * 10).json()["id"]
    err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": three}}), 400, "data.file_id")
    assert "3 records" in err["message"]
    err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": ten, "num_clusters": 6}}),
               400, "data.num_clusters")
    assert err["message"].startswith("data.num_clusters 6 is too many for 10 records"), err
    # Selection without clusters, or no recovery, needs no minimum.
    for extra in ({"data": {"file_id": three, "selection": "random"}},
                  {"data": {"file_id": three}, "recovery": {"method": "none"}},
                  {"data": {"file_id": ten, "num_clusters": 5}}):
        assert client.post("/v1/jobs", headers=alice, json={**MIN, **extra}).status_code == 200


def test_model_path_escape_and_wrong_purpose(env, tiny_llama):
    client, _, _, (alice, bob) = env
    escape = f"{tiny_llama}/../../../../etc"
    _err(client.post("/v1/jobs", headers=alice, json={**MIN, "model": escape}), 400, "model", "model_not_allowed")
    text = _upload(client, alice, "eval.txt", b"text\n", "eval").json()
    err = _err(client.post("/v1/jobs", headers=alice, json={**MIN, "data": {"file_id": text["id"]}}), 400)
    assert "purpose" in err["message"]
    pool = _upload(client, alice, "pool.jsonl", b'{"instruction": "a", "output": "b"}\n').json()
    _err(client.post("/v1/jobs", headers=bob, json={**MIN, "data": {"file_id": pool["id"]}}), 400,
         code="file_not_found")  # another key's file is invisible
    bad = client.post("/v1/jobs", headers={**alice, "content-type": "application/json"}, content=b"{nope")
    _err(bad, 400, code="json_invalid")


def test_active_limit_list_get_and_isolation(env):
    client, _, _, (alice, bob) = env
    ids = [client.post("/v1/jobs", headers=alice, json=MIN).json()["id"] for _ in range(3)]
    _err(client.post("/v1/jobs", headers=alice, json=MIN), 429, code="too_many_active_jobs")
    page = client.get("/v1/jobs?limit=2", headers=alice).json()
    assert [j["id"] for j in page["data"]] == ids[::-1][:2] and page["has_more"]
    rest = client.get(f"/v1/jobs?limit=2&after={page['last_id']}", headers=alice).json()
    assert [j["id"] for j in rest["data"]] == [ids[0]] and not rest["has_more"]
    _err(client.get("/v1/jobs?limit=0", headers=alice), 400, param="limit")
    assert client.get(f"/v1/jobs/{ids[0]}", headers=alice).json()["status"] == "queued"
    assert client.get("/v1/jobs", headers=bob).json()["data"] == []
    for path in ("", "/events", "/checkpoints"):
        _err(client.get(f"/v1/jobs/{ids[0]}{path}", headers=bob), 404)
    _err(client.post(f"/v1/jobs/{ids[0]}/cancel", headers=bob), 404)
    _err(client.delete(f"/v1/jobs/{ids[0]}", headers=bob), 404)
    _err(client.get("/v1/jobs/job-doesnotexist", headers=alice), 404, param="job_id")


def test_cancel_and_delete(env):
    client, store, settings, (alice, _) = env
    queued = client.post("/v1/jobs", headers=alice, json=MIN).json()
    assert client.post(f"/v1/jobs/{queued['id']}/cancel", headers=alice).json()["status"] == "cancelled"
    running = client.post("/v1/jobs", headers=alice, json=MIN).json()
    store.claim("w", "cpu", 60)
    job = client.post(f"/v1/jobs/{running['id']}/cancel", headers=alice).json()
    assert job["status"] == "running" and job["cancel_requested"]
    _err(client.delete(f"/v1/jobs/{running['id']}", headers=alice), 409, code="job_running")
    store.finish(running["id"], "w", "succeeded")  # its last stage completed as the cancel came in
    late = client.get(f"/v1/jobs/{running['id']}", headers=alice).json()
    assert late["status"] == "cancelled" and late["cancel_requested"]  # the accepted cancel wins
    done = client.post("/v1/jobs", headers=alice, json=MIN).json()
    store.claim("w", "cpu", 60)
    store.finish(done["id"], "w", "succeeded")
    _err(client.post(f"/v1/jobs/{done['id']}/cancel", headers=alice), 409, code="job_not_cancellable")
    assert client.get(f"/v1/jobs/{done['id']}", headers=alice).json()["status"] == "succeeded"
    settings.job_dir(running["id"]).mkdir(parents=True)
    assert client.delete(f"/v1/jobs/{running['id']}", headers=alice).json()["deleted"]
    assert not settings.job_dir(running["id"]).exists()
    _err(client.get(f"/v1/jobs/{running['id']}", headers=alice), 404)


def test_events_pages_and_stream(env):
    client, store, _, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    store.claim("w", "cpu", 60)
    events = [{"kind": "stage_start", "stage": "train"}] + \
        [{"kind": "progress", "stage": "train", "step": i, "total": 4, "metrics": {"loss": 3.0 - i}} for i in range(4)]
    store.record(job_id, "w", events, stage="train", progress=0.5,
                 metrics={"progress": {"fraction": 0.5, "eta_s": 30.0, "at": time.time()}})
    assert 25 < client.get(f"/v1/jobs/{job_id}", headers=alice).json()["eta_seconds"] <= 30
    first = client.get(f"/v1/jobs/{job_id}/events?limit=2", headers=alice).json()
    assert first["has_more"] and [e["kind"] for e in first["data"]] == ["stage_start", "progress"]
    rest = client.get(f"/v1/jobs/{job_id}/events?after={first['last_id']}", headers=alice).json()
    assert [e["metrics"]["loss"] for e in rest["data"]] == [2.0, 1.0, 0.0] and not rest["has_more"]
    store.finish(job_id, "w", "failed", error={"message": "boom", "type": "server_error", "param": None,
                                               "code": "x"}, events=[{"kind": "warning", "stage": "train"}])
    with client.stream("GET", f"/v1/jobs/{job_id}/events?stream=true&after={first['last_id']}",
                       headers=alice) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        body = "".join(r.iter_text())
    names = [line.split(": ", 1)[1] for line in body.splitlines() if line.startswith("event: ")]
    assert names == ["progress", "progress", "progress", "warning", "end"]
    assert '"status": "failed"' in body
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["error"]["message"] == "boom"


def test_a_stream_ends_only_after_the_events_committed_with_the_end(env, monkeypatch):
    """The job's last events commit with its terminal status: when that happens between the
    stream's read of the events and its read of the status, they still go out before `end`."""
    client, store, _, (alice, _) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    store.claim("w", "cpu", 60)
    store.record(job_id, "w", [{"kind": "stage_start", "stage": "train"}])
    last = client.get(f"/v1/jobs/{job_id}/events", headers=alice).json()["last_id"]
    real_get = store.get_job

    def finished_meanwhile(*args):
        if len(args) == 1:  # the stream's status read (the route's own check passes the owner too)
            monkeypatch.setattr(store, "get_job", real_get)
            store.finish(job_id, "w", "succeeded", result={}, events=[{"kind": "stage_end", "stage": "job"}])
        return real_get(*args)

    monkeypatch.setattr(store, "get_job", finished_meanwhile)
    with client.stream("GET", f"/v1/jobs/{job_id}/events?stream=true&after={last}", headers=alice) as r:
        body = "".join(r.iter_text())
    names = [line.split(": ", 1)[1] for line in body.splitlines() if line.startswith("event: ")]
    assert names == ["stage_end", "end"], body


def _publish(store, settings, job_id, files):
    """A finished job with a `final` checkpoint on disk, as the pipeline leaves it."""
    root = settings.job_dir(job_id) / "run" / "final"
    root.mkdir(parents=True)
    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / ".done").write_text("")
    store.claim("w", "cpu", 60)
    store.finish(job_id, "w", "succeeded", result={"final": str(root)})


def test_checkpoints_range_and_archive(env):
    client, store, settings, (alice, bob) = env
    job_id = client.post("/v1/jobs", headers=alice, json=MIN).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"] == []
    _err(client.get(f"/v1/jobs/{job_id}/checkpoints/final/archive", headers=alice), 404)
    weights = bytes(range(256)) * 40
    files = {"config.json": b'{"model_type": "llama"}', "model.safetensors": weights,
             "eval_results.json": json.dumps({"ppl": 12.5}).encode()}
    _publish(store, settings, job_id, files)
    (ckpt,) = client.get(f"/v1/jobs/{job_id}/checkpoints", headers=alice).json()["data"]
    assert ckpt["name"] == "final" and ckpt["metrics"] == {"ppl": 12.5}
    assert ckpt["bytes"] == sum(map(len, files.values())) and ".done" not in [f["name"] for f in ckpt["files"]]
    entry = next(f for f in ckpt["files"] if f["name"] == "model.safetensors")
    assert entry["sha256"] == hashlib.sha256(weights).hexdigest()

    r = client.get(entry["url"], headers={**alice, "Range": "bytes=1000-4999"})
    assert r.status_code == 206 and r.content == weights[1000:5000]
    assert r.headers["content-range"] == f"bytes 1000-4999/{len(weights)}"
    tail = client.get(entry["url"], headers={**alice, "Range": "bytes=-100"})
    assert tail.status_code == 206 and tail.content == weights[-100:]
    whole = client.get(entry["url"], headers=alice)
    assert whole.status_code == 200 and hashlib.sha256(whole.content).hexdigest() == entry["sha256"]
    assert client.get(entry["url"], headers={**alice, "Range": f"bytes={len(weights) + 10}-"}).status_code == 416
    _err(client.get(f"/v1/jobs/{job_id}/checkpoints/final/files/../../recipe.json", headers=alice), 404)
    _err(client.get(f"/v1/jobs/{job_id}/checkpoints/final/files/.done", headers=alice), 404)
    _err(client.get(f"/v1/jobs/{job_id}/checkpoints/pruned/archive", headers=alice), 404)
    _err(client.get(entry["url"], headers=bob), 404)

    tar_bytes = client.get(ckpt["archive_url"], headers=alice).content
    assert len(tar_bytes) == ckpt["archive_bytes"]
    assert hashlib.sha256(tar_bytes).hexdigest() == ckpt["archive_sha256"]
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
        assert {m.name: tar.extractfile(m).read() for m in tar.getmembers()} == \
            {f"final/{k}": v for k, v in files.items()}


def test_cli_keys_create(tmp_path):
    from typer.testing import CliRunner

    from service.store import Store
    from tests.test_service_e2e import cli_app

    result = CliRunner().invoke(cli_app(), ["keys", "create", "--name", "ci", "--data-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    secret = result.stdout.strip().splitlines()[0]
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    assert secret.startswith("lp-") and store.key_owner(secret) is not None
    store.close()


def test_upload_limit_refused_before_reading(env):
    client, _, _, (alice, _) = env
    r = client.post("/v1/files", headers={**alice, "content-length": str(10**9), "content-type": "multipart/form-data"},
                    content=b"")
    _err(r, 413, param="file", code="file_too_large")
    ok = _upload(client, alice, "..", b"held-out text\n", "eval").json()
    assert ok["filename"] == "upload"


def test_no_auth_refused_on_public_address(tmp_path):
    from typer.testing import CliRunner

    from tests.test_service_e2e import cli_app

    result = CliRunner().invoke(cli_app(), ["serve", "--no-auth", "--host", "0.0.0.0", "--data-dir", str(tmp_path)])
    assert result.exit_code != 0 and "only allowed when binding to localhost" in str(result.exception)


def test_cli_submit_uploads_named_files(env, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import service.cli
    from service.client import Client
    from tests.test_service_e2e import cli_app

    class Borrowed(Client):  # the CLI closes its client; the test's in-process one stays open
        def close(self):
            pass

    client, _, _, (alice, _) = env
    api = Borrowed("http://testserver", api_key="")
    api.http = client
    client.headers.update(alice)
    monkeypatch.setattr(service.cli, "_client", lambda: api)
    (tmp_path / "pool.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "held.txt").write_text("held-out text\n")
    (tmp_path / "recipe.yaml").write_text(f"model: smollm2-135m\nbudget: {{ratio: 0.3}}\n"
                                          f"evaluation: {{ppl: {tmp_path / 'held.txt'}, seq_len: 64}}\n")
    result = CliRunner().invoke(cli_app(), ["jobs", "submit", "--recipe", str(tmp_path / "recipe.yaml"),
                                            "--pool", str(tmp_path / "pool.jsonl"), "--selection", "random",
                                            "--json"])
    assert result.exit_code == 0, result.output
    recipe = json.loads(result.stdout)["recipe"]
    assert recipe["budget"]["ratio"] == 0.3 and recipe["data"]["selection"] == "random"
    files = {f["filename"]: f["id"] for f in client.get("/v1/files").json()["data"]}
    assert recipe["data"]["file_id"] == files["pool.jsonl"] and recipe["evaluation"]["ppl"] == files["held.txt"]
    assert recipe["evaluation"]["seq_len"] == 64
    assert len(client.get("/v1/files").json()["data"]) == 2
    missing = CliRunner().invoke(cli_app(), ["jobs", "submit", "--model", "smollm2-135m", "--ratio", "0.2",
                                             "--selection", "random"])
    assert missing.exit_code != 0 and "give --pool" in str(missing.exception)
