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

    monkeypatch.setattr(uvicorn, "run", started)
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


def test_download_out_that_is_a_file_fails_before_any_request(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    # Port 9 (discard) has no server: reaching the network would fail with "cannot reach the server".
    base = ["jobs", "--server", "http://127.0.0.1:9", "--api-key", "lp-x", "download", "job-1"]
    assert f"--out {afile} is a file, not a directory" in _fails(*base, "--out", str(afile))
    msg = _fails(*base, "--out", str(afile / "x" / "y"))
    assert f"{afile} is a file, not a directory" in msg
    assert afile.read_text() == "x"


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


def test_good_flags_still_start(tmp_path, monkeypatch):
    """The checks above do not refuse what works: the worker gets to its loop."""
    from service.worker import Worker

    ran = []
    monkeypatch.setattr(Worker, "run_forever", lambda self: ran.append(self.settings.device))
    result = CliRunner().invoke(cli_app(), ["worker", "--data-dir", str(tmp_path / "new"), "--device", "cpu",
                                            "--db", f"sqlite:///{tmp_path / 'jobs.db'}"])
    assert result.exit_code == 0, result.output
    assert ran == ["cpu"]
