"""Bad service flags a user can give (database URL, data directory, API key, download target,
device) end in one UserError line, never a traceback, and before anything starts."""

import pytest
from typer.testing import CliRunner

from llm_prune.errors import UserError
from tests.test_service_e2e import cli_app


@pytest.fixture(autouse=True)
def _nothing_starts(monkeypatch):
    """serve and worker must fail before they serve or take jobs; if they got that far, say so."""
    import uvicorn

    from service.worker import Worker

    def started(*_a, **_k):
        raise AssertionError("started although the flags were bad")

    monkeypatch.setattr(uvicorn.Server, "run", started)
    monkeypatch.setattr(Worker, "run_forever", started)


def _fails(*args: str) -> str:
    """Runs `llm-prune ARGS`; returns the one-line UserError message it must end with."""
    result = CliRunner().invoke(cli_app(), list(args))
    assert result.exit_code != 0, result.output
    exc = result.exception
    assert isinstance(exc, UserError), f"{type(exc).__name__}: {exc}"
    assert "\n" not in exc.message and exc.message.strip()
    return exc.message


@pytest.mark.parametrize("command", [["keys", "list"], ["keys", "create"], ["serve"], ["worker"]])
def test_db_url_that_does_not_parse(tmp_path, command):
    msg = _fails(*command, "--data-dir", str(tmp_path), "--db", "notaurl")
    assert "invalid database URL 'notaurl'" in msg and "sqlite:///" in msg and "postgresql+psycopg://" in msg
    msg = _fails(*command, "--data-dir", str(tmp_path), "--db", "nosuchdialect://x/y")
    assert "invalid database URL" in msg


@pytest.mark.parametrize("command", [["keys", "list"], ["serve"], ["worker"]])
def test_db_that_cannot_be_opened(tmp_path, command):
    missing = tmp_path / "no" / "such" / "x.db"
    msg = _fails(*command, "--data-dir", str(tmp_path), "--db", f"sqlite:///{missing}")
    assert msg.startswith(f"cannot open database sqlite:///{missing}: ") and "unable to open" in msg
    not_db = tmp_path / "not.db"
    not_db.write_text("not a database\n" * 100)
    assert "not a database" in _fails(*command, "--data-dir", str(tmp_path), "--db", f"sqlite:///{not_db}")


def test_unreachable_postgres_names_it_without_the_password(tmp_path):
    pytest.importorskip("psycopg")
    msg = _fails("keys", "list", "--data-dir", str(tmp_path),
                 "--db", "postgresql+psycopg://user:s3cret@127.0.0.1:1/jobs")
    assert msg.startswith("cannot open database postgresql+psycopg://user:***@127.0.0.1:1/jobs: ")
    assert "s3cret" not in msg


def test_in_memory_sqlite_is_refused(tmp_path):
    assert "in-memory" in _fails("keys", "list", "--data-dir", str(tmp_path), "--db", "sqlite://")


def test_store_errors_at_runtime_are_not_user_errors(tmp_path):
    """Only opening the store maps driver errors; a broken database later stays a bug with its traceback."""
    from sqlalchemy.exc import OperationalError

    from service.store import Store

    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    with store.engine.begin() as conn:
        conn.exec_driver_sql("DROP TABLE api_keys")
    with pytest.raises(OperationalError):
        store.list_keys()
    store.close()


@pytest.mark.parametrize("command", [["keys", "list"], ["keys", "create"], ["serve"], ["worker"]])
def test_data_dir_that_is_a_file(tmp_path, command):
    afile = tmp_path / "afile"
    afile.write_text("x")
    msg = _fails(*command, "--data-dir", str(afile))
    assert str(afile) in msg and "not a directory" in msg
    msg = _fails(*command, "--data-dir", str(afile / "sub"))
    assert f"{afile} is a file, not a directory" in msg
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "files").write_text("in the way")
    assert "not a directory" in _fails(*command, "--data-dir", str(tmp_path / "d"))


@pytest.mark.parametrize("key", ["é", "lp-ключ", "lp-a\nb"])
def test_api_key_must_be_ascii(key):
    msg = _fails("jobs", "--server", "http://127.0.0.1:9", "--api-key", key, "list")
    assert "API key must be printable ASCII" in msg


def test_a_key_with_its_line_end_is_the_key_and_an_empty_server_is_refused():
    from service.client import Client

    assert Client("http://127.0.0.1:9", " lp-x\n").http.headers["authorization"] == "Bearer lp-x"
    assert "the server URL is empty" in _fails("jobs", "--server", " ", "--api-key", "lp-x", "list")


def test_download_out_that_is_a_file_fails_before_any_request(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    # Port 9 (discard) has no server: reaching the network would fail with "cannot reach the server".
    base = ["jobs", "--server", "http://127.0.0.1:9", "--api-key", "lp-x", "download", "job-1"]
    assert f"--out {afile} is a file, not a directory" in _fails(*base, "--out", str(afile))
    msg = _fails(*base, "--out", str(afile / "x" / "y"))
    assert f"{afile} is a file, not a directory" in msg
    assert afile.read_text() == "x"
    assert "--checkpoint '5x': use final (recovered) or pruned" in _fails(*base, "--checkpoint", "5x")


def test_download_out_checked_by_the_client_too(tmp_path):
    from service.client import Client

    afile = tmp_path / "afile"
    afile.write_text("x")
    with Client("http://127.0.0.1:9", "lp-x") as client:
        for out in (afile, afile / "x"):
            with pytest.raises(UserError, match="not a directory"):
                client.download("job-1", out)


@pytest.mark.parametrize("command", [["serve"], ["worker"]])
@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_device_is_validated(tmp_path, command, device):
    msg = _fails(*command, "--data-dir", str(tmp_path), "--device", device)
    assert f"'{device}'" in msg and "device" in msg


def test_worker_slots_past_any_machine_are_refused_before_anything_starts(tmp_path, monkeypatch):
    """`worker --slots 1000000000000` built a thread per slot up front (1 GB in 8 seconds), each
    slot with a job process to start."""
    for args in (["worker", "--slots", "65"], ["serve", "--worker-slots", "1000000000000"]):
        msg = _fails(*args, "--data-dir", str(tmp_path))
        assert "worker_slots" in msg and "less than or equal to 64" in msg, msg
    monkeypatch.setenv("LLM_PRUNE_WORKER_SLOTS", "100")
    assert "less than or equal to 64" in _fails("worker", "--data-dir", str(tmp_path))


def test_good_flags_still_start(tmp_path, monkeypatch):
    """The checks above do not refuse what works: the worker gets to its loop."""
    from service.worker import Worker

    ran = []
    monkeypatch.setattr(Worker, "run_forever", lambda self: ran.append(self.settings.device))
    result = CliRunner().invoke(cli_app(), ["worker", "--data-dir", str(tmp_path / "new"), "--device", "cpu",
                                            "--db", f"sqlite:///{tmp_path / 'jobs.db'}"])
    assert result.exit_code == 0, result.output
    assert ran == ["cpu"]


def _client_on(handler):
    """A Client whose requests go to `handler(request) -> httpx.Response` instead of a socket."""
    import httpx

    from service.client import Client

    client = Client("http://srv.test", api_key="lp-x")
    client.http = httpx.Client(base_url=client.base_url, transport=httpx.MockTransport(handler))
    return client


def test_client_answers_that_are_not_ours_are_one_line_errors():
    import httpx

    from service.client import Client

    with pytest.raises(UserError, match="invalid server URL"):
        Client("http://[::1")
    # A port no socket has, another scheme or no host is the URL's fault, not an unreachable server.
    for url, reason in [("http://127.0.0.1:99999", "port 99999 is out of range"), ("ftp://h:8000", "http or https"),
                        ("http://", "names no host")]:
        with pytest.raises(UserError, match=reason):
            Client(url)
    assert Client("localhost:8000/").base_url == "http://localhost:8000"  # host:port as curl takes it
    seen = []

    def handler(request):
        seen.append(request.url.raw_path.decode())
        if request.url.path.endswith("html"):
            return httpx.Response(200, text="<html>login</html>", headers={"content-type": "text/html"})
        if "nullmsg" in request.url.raw_path.decode():
            return httpx.Response(500, json={"error": {"message": None}})
        if "gzip" in request.url.raw_path.decode():
            return httpx.Response(200, content=b"not gzip", headers={"content-encoding": "gzip"})
        return httpx.Response(404, json={"error": {"message": "no job", "type": "not_found_error", "param": "job_id",
                                                   "code": None}})

    client = _client_on(handler)
    with pytest.raises(UserError, match="give a job id"):
        client.job(" ")
    with pytest.raises(UserError, match="no job"):  # `/`, `?`, `..` stay inside the one path segment
        client.job("../../healthz?x=1")
    assert seen[-1] == "/v1/jobs/..%2F..%2Fhealthz%3Fx%3D1"
    with pytest.raises(UserError, match=r"did not answer as an llm-prune server \(HTTP 200, text/html\)"):
        client.job("html")
    with pytest.raises(UserError, match="^server answered 500"):
        client.job("nullmsg")
    with pytest.raises(UserError, match="cannot reach the server"):
        client.job("gzip")


def test_a_followed_event_stream_resumes_after_a_break(monkeypatch):
    import httpx

    import service.client as client_module

    monkeypatch.setattr(client_module.time, "sleep", lambda s: None)
    afters = []

    def handler(request):
        afters.append(request.url.params.get("after"))
        sse = {"content-type": "text/event-stream"}
        if len(afters) == 1:  # the server restarts after one event
            return httpx.Response(200, headers=sse, text='id: 7\nevent: progress\ndata: {"id": 7, "kind": "progress"}\n\n')
        return httpx.Response(200, headers=sse, text='id: 8\nevent: stage_end\ndata: {"id": 8, "kind": "stage_end"}\n\n'
                                                     'event: end\ndata: {"status": "succeeded"}\n\n')

    got = list(_client_on(handler).stream_events("job-1"))
    assert [e.get("id", e.get("end")) for e in got] == [7, 8, "succeeded"] and afters == [None, "7"]
    afters.clear()
    broken = _client_on(lambda request: afters.append(1) or httpx.Response(
        200, headers={"content-type": "text/event-stream"}, text=": keep-alive\n\n"))
    with pytest.raises(UserError, match=r"lost the event stream .* run `llm-prune jobs events job-1 -f` to continue"):
        list(broken.stream_events("job-1"))
    assert len(afters) == client_module.RECONNECTS + 1
    # A stream the server ends for a revoked key is its 401, said once, not an event nor a reconnect.
    afters.clear()
    revoked = _client_on(lambda request: afters.append(1) or httpx.Response(
        200, headers={"content-type": "text/event-stream"},
        text='id: 3\nevent: progress\ndata: {"id": 3, "kind": "progress"}\n\nevent: error\ndata: {"error": '
             '{"message": "invalid or revoked API key", "code": "invalid_api_key"}}\n\n' if len(afters) == 1 else
             'event: end\ndata: {"status": "succeeded"}\n\n'))
    with pytest.raises(UserError, match="invalid or revoked API key") as caught:
        list(revoked.stream_events("job-1"))
    assert caught.value.code == "invalid_api_key" and afters == [1]


def test_submit_retries_a_lost_answer_with_the_same_idempotency_key(monkeypatch):
    import httpx

    import service.client as client_module

    monkeypatch.setattr(client_module.time, "sleep", lambda s: None)
    keys = []

    def handler(request):
        keys.append(request.headers["Idempotency-Key"])
        if len(keys) == 1:
            raise httpx.ReadTimeout("no answer", request=request)
        return httpx.Response(200, json={"object": "job", "id": "job-1", "status": "queued"})

    assert _client_on(handler).submit({"model": "m"})["id"] == "job-1"
    assert len(keys) == 2 and keys[0] == keys[1]


def test_a_key_name_longer_than_its_column_is_refused(tmp_path):
    assert "--name is 201 characters; at most 200" in _fails("keys", "create", "--data-dir", str(tmp_path),
                                                             "--name", "n" * 201)


def test_waiting_on_a_job_outlasts_a_server_restart(monkeypatch):
    """`jobs submit --wait` and `jobs status --wait` poll through a restart (connections refused
    for a while); they gave up on the first refused poll although the job ran on."""
    import httpx

    import service.client as client_module
    from service.cli import _follow

    monkeypatch.setattr(client_module.time, "sleep", lambda s: None)
    monkeypatch.setattr("service.cli.time.sleep", lambda s: None)
    polls = []

    def handler(request):
        polls.append(request.url.path)
        if 2 <= len(polls) <= 6:  # the server is down for five polls
            raise httpx.ConnectError("connection refused", request=request)
        status = "succeeded" if len(polls) > 7 else "running"
        return httpx.Response(200, json={"object": "job", "id": "job-1", "status": status, "stage": "prune",
                                         "progress": 0.5, "eta_seconds": None})

    assert _follow(_client_on(handler), "job-1")["status"] == "succeeded" and len(polls) == 8

    def down(request):
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(UserError, match=r"cannot reach the server") as info:
        _client_on(down).job("job-1", retries=2)
    assert "submitted" not in str(info.value)  # only a lost POST may have made a job


def test_a_port_in_use_is_one_line_and_takes_no_job(tmp_path):
    """serve binds before its embedded worker starts: a server that cannot listen claims nothing."""
    import socket

    from service.store import Store

    data = tmp_path / "d"
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    store.create_job("k", "m", {}, {"model": "m"}, max_attempts=1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        msg = _fails("serve", "--data-dir", str(data), "--db", f"sqlite:///{tmp_path / 'jobs.db'}",
                     "--port", str(port))
    assert msg.startswith(f"cannot listen on 127.0.0.1:{port}: ") and "in use" in msg
    assert [j.status for j in store.list_jobs("k")[0]] == ["queued"]
    store.close()


def test_job_ids_that_are_path_steps_or_not_utf8_reach_no_other_route():
    """`.` and `..` were resolved by the HTTP client as path steps (`jobs status .` printed the job
    list as the job); an id in another encoding than UTF-8 is sent escaped, as no job's id."""
    from service.client import _segment

    for step in (".", ".."):
        with pytest.raises(UserError, match=f"no job with id '{re_escape(step)}'"):
            _segment(step)
    assert _segment("job-\udce9") == "job-%5Cudce9" and _segment("a/b?c") == "a%2Fb%3Fc"


def re_escape(text):
    import re

    return re.escape(text)


def test_a_web_page_for_an_error_is_one_line():
    import httpx

    page = "<!DOCTYPE HTML>\n<html>\n<head><title>Error 404</title></head>\n<body>Not found</body></html>\n"
    client = _client_on(lambda request: httpx.Response(404, text=page, headers={"content-type": "text/html"}))
    with pytest.raises(UserError) as exc:
        client.job("job-1")
    assert exc.value.message == ("http://srv.test did not answer as an llm-prune server (HTTP 404, text/html); "
                                 "check --server / LLM_PRUNE_SERVER")
    client = _client_on(lambda request: httpx.Response(502, text="bad\ngateway\n"))
    with pytest.raises(UserError, match="^server answered 502: bad gateway$"):
        client.job("job-1")


def test_download_never_unpacks_over_another_checkpoint(tmp_path):
    """A second job's `final` unpacked into a folder holding one mixed their files; a folder in the
    way of the archive is one line."""
    import hashlib
    import io
    import tarfile

    import httpx

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("final/config.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    archive = buf.getvalue()
    ckpt = {"name": "final", "archive_url": "http://srv.test/a.tar", "archive_bytes": len(archive),
            "archive_sha256": hashlib.sha256(archive).hexdigest()}

    def handler(request):
        if request.url.path.endswith("/checkpoints"):
            return httpx.Response(200, json={"object": "list", "data": [ckpt]})
        return httpx.Response(200, content=archive)

    client = _client_on(handler)
    out = tmp_path / "models"
    assert client.download("job-1", out) == out / "final"
    assert sorted(p.name for p in out.iterdir()) == ["final"] and (out / "final" / "config.json").read_text() == "{}"
    (out / "final" / "adapter").mkdir()
    with pytest.raises(UserError, match="already holds 'final'; give another --out or remove"):
        client.download("job-2", out)
    assert (out / "final" / "adapter").is_dir()
    other = tmp_path / "other"
    (other / "job-3-final.tar.part").mkdir(parents=True)
    with pytest.raises(UserError, match="is a directory, where the download goes"):
        client.download("job-3", other)


def test_recipe_values_of_the_wrong_type_are_one_line(tmp_path):
    from service.cli import _upload_named_files

    for body, param in [({"data": {"pool": 5}}, "data.pool"), ({"evaluation": {"ppl": 7}}, "evaluation.ppl"),
                        ({"pruning": {"calibration": ["x"]}}, "pruning.calibration")]:
        with pytest.raises(UserError, match=f"^{param} must be a file path"):
            _upload_named_files(None, body)
    _upload_named_files(None, {"evaluation": [1], "data": {"file_id": "file-1"}})  # left to the body's check


def test_arguments_in_another_encoding_are_one_line(tmp_path, capsys):
    from llm_prune.cli import main

    for argv in (["keys", "create", "--data-dir", str(tmp_path), "--name", "caf\udce9"],
                 ["keys", "revoke", "key-\udce9", "--data-dir", str(tmp_path)]):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        assert "UTF-8" in err and "Traceback" not in err


def test_a_worker_on_another_data_dir_than_its_server_is_refused(tmp_path):
    """Its checkpoints would land where the API never looks, and its jobs end `succeeded` with
    nothing to download: the store records its data directory's id at the first start."""
    from service.app import create_app
    from service.settings import Settings
    from service.store import DATA_DIR_MARKER

    db = f"sqlite:///{tmp_path / 'jobs.db'}"
    create_app(Settings(data_dir=tmp_path / "server", database_url=db, worker_slots=0))
    recorded = (tmp_path / "server" / DATA_DIR_MARKER).read_text().strip()
    create_app(Settings(data_dir=tmp_path / "server", database_url=db, worker_slots=0))  # a restart: the same
    msg = _fails("worker", "--data-dir", str(tmp_path / "elsewhere"), "--db", db)
    assert msg.startswith(f"data directory {tmp_path / 'elsewhere'} is not the one the database") and "missing" in msg
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / DATA_DIR_MARKER).write_text("0" * 32)
    assert "differs" in _fails("serve", "--data-dir", str(tmp_path / "other"), "--db", db)
    assert (tmp_path / "server" / DATA_DIR_MARKER).read_text().strip() == recorded


def test_a_bad_setting_from_the_environment_names_its_variable(tmp_path, monkeypatch):
    """Told only "invalid setting port", a user looked for a --port flag they never gave."""
    monkeypatch.setenv("LLM_PRUNE_PORT", "x")
    assert "(from the environment variable LLM_PRUNE_PORT)" in _fails("serve", "--data-dir", str(tmp_path))
    monkeypatch.delenv("LLM_PRUNE_PORT")
    assert "environment" not in _fails("serve", "--data-dir", str(tmp_path), "--port", "x")
