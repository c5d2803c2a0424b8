"""Service commands: `serve`, `worker`, `keys create|list|revoke`, and `jobs submit|list|status|events|cancel|
delete|download` (a client of a running server)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

import typer

from llm_prune.cli.common import emit_json, human_bytes, table
from llm_prune.cli.recipe_flags import ALL, recipe_flags, recipe_from_data, settings_flags, with_recipe_flags
from llm_prune.errors import UserError
from service.schemas import SERVER_DECIDES, JobCreate
from service.settings import Settings

jobs_app = typer.Typer(no_args_is_help=True, help="Submit and follow jobs on an llm-prune server.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (run on the server machine).")

TERMINAL = ("succeeded", "failed", "cancelled")


# Every server setting is a flag of `serve` (and the relevant ones of `worker` and `keys`), generated
# from the one Settings model; pydantic-settings reads the same fields from LLM_PRUNE_* variables.
_API_ONLY = ("host", "port", "no_auth", "allow_remote_code", "allowed_model_roots", "max_upload_bytes",
                "max_stored_bytes_per_key", "max_active_jobs_per_key")
SERVE_FLAGS = settings_flags(Settings, names={"database_url": "--db"})
WORKER_FLAGS = settings_flags(Settings, exclude=_API_ONLY, names={"database_url": "--db", "worker_slots": "--slots"})
STORE_FLAGS = settings_flags(Settings, include=("data_dir", "database_url"), names={"database_url": "--db"})


def _settings(overrides: dict) -> Settings:
    from pydantic import ValidationError

    from llm_prune.recipe import format_validation_error

    try:
        return Settings(**overrides)
    except ValidationError as exc:
        message, param = format_validation_error(exc)
        # A value from the environment, not from a flag: name the variable to fix.
        env = f"LLM_PRUNE_{param or ''}".upper()
        if param and param not in overrides and any(k.upper() == env for k in os.environ):
            message += f" (from the environment variable {env})"
        raise UserError(f"invalid setting {message}", param=param) from None


def _check_device(settings: Settings) -> None:
    """A worker's --device is checked as a job's would be (cpu, cuda, cuda:N, mps or auto, and present),
    so a bad one fails at start-up instead of failing every job."""
    from llm_prune.models import pick_device

    pick_device(settings.device)


@with_recipe_flags(SERVE_FLAGS, into="settings")
def serve(settings: dict = None) -> None:
    """Start the API with an embedded worker."""
    import uvicorn

    from service.app import create_app
    from service.launch import SERVER_OPTIONS
    from service.settings import LOOPBACK

    settings = _settings(settings)
    if settings.no_auth and settings.host not in LOOPBACK:
        raise UserError(f"--no-auth is only allowed when binding to localhost, not {settings.host}")
    if settings.worker_slots > 0:
        _check_device(settings)
    # The port first: the embedded worker starts with the app, and a server that then failed to
    # bind had already claimed a queued job, which waited out its lease and lost an attempt.
    sock = _listen(settings.host, settings.port)
    app = create_app(settings)
    uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_level="info",
                                  **SERVER_OPTIONS)).run(sockets=[sock])


def _listen(host: str, port: int):
    """A socket bound to HOST:PORT (as uvicorn binds one); an address in use or a host that does
    not resolve is one line."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UserError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}",
                        param="host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {exc.strerror or exc}", param="port") from None
    return sock


@with_recipe_flags(WORKER_FLAGS, into="settings")
def worker(settings: dict = None) -> None:
    """Run a worker that takes jobs from the shared store (give it the server's --db and --data-dir)."""
    from service.worker import Worker

    settings = _settings(settings)
    _check_device(settings)
    settings.prepare()
    w = Worker(settings)
    w.store.check_data_dir(settings.data_dir)
    signal.signal(signal.SIGTERM, lambda *_: w.stop())
    typer.echo(f"worker {w.id} on {settings.device}, store {settings.db_url}", err=True)
    try:
        w.run_forever()
    except KeyboardInterrupt:
        w.stop()


@keys_app.command("create")
@with_recipe_flags(STORE_FLAGS, into="settings")
def keys_create(name: str = typer.Option("", "--name", help="label for the key"), settings: dict = None) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from service.store import Store

    if len(name) > 200:  # the column's width; PostgreSQL refuses longer with a traceback
        raise UserError(f"--name is {len(name)} characters; at most 200", param="name")
    if not name.isprintable():  # a newline broke `keys list`'s table; other bytes than UTF-8 the database
        raise UserError("--name must be printable UTF-8 text (no newlines or control characters)", param="name")
    settings = _settings(settings)
    settings.prepare()
    key_id, secret = Store(settings.db_url).create_key(name)
    typer.echo(secret)
    typer.echo(f"created {key_id}{' (' + name + ')' if name else ''}; this key is not shown again", err=True)


@keys_app.command("list")
@with_recipe_flags(STORE_FLAGS, into="settings")
def keys_list(as_json: bool = typer.Option(False, "--json"), settings: dict = None) -> None:
    """API keys: id, name and creation time (the secrets are not stored)."""
    from service.store import Store

    settings = _settings(settings)
    settings.prepare()
    store = Store(settings.db_url)
    try:
        keys = [{"id": k.id, "name": k.name, "created_at": int(k.created_at)} for k in store.list_keys()]
    finally:
        store.close()
    if as_json:
        return emit_json(keys)
    rows = [[k["id"], k["name"] or "-", time.strftime("%Y-%m-%d %H:%M", time.localtime(k["created_at"]))]
            for k in keys]
    typer.echo(table(rows, ["id", "name", "created"]))


@keys_app.command("revoke")
@with_recipe_flags(STORE_FLAGS, into="settings")
def keys_revoke(key_id: str = typer.Argument(..., help="key id, as `keys list` shows it"),
                settings: dict = None) -> None:
    """Revoke a key: requests with it get 401 at once; its jobs keep running to their end."""
    from service.store import Store

    settings = _settings(settings)
    settings.prepare()
    store = Store(settings.db_url)
    try:
        if not store.revoke_key(key_id):
            raise UserError(f"no API key with id '{key_id}' (see `llm-prune keys list`)", param="key_id")
    finally:
        store.close()
    typer.echo(f"revoked {key_id}")


# --- client ---------------------------------------------------------------------------------
_client_opts: dict = {}


@jobs_app.callback()
def _jobs_opts(server: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_SERVER", help="server URL"),
               api_key: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_API_KEY")) -> None:
    _client_opts.update(base_url=server, api_key=api_key)


def _client():
    from service.client import Client

    return Client(**_client_opts)


RESTART_RETRIES = 9


def _follow(client, job_id: str) -> dict:
    """Progress bar while polling; returns the finished job."""
    from tqdm.auto import tqdm

    fmt = "{desc:<22}{percentage:3.0f}%|{bar}| {elapsed}{postfix}"
    with tqdm(total=100, desc="queued", unit="%", bar_format=fmt) as bar:
        while True:
            job = client.job(job_id, retries=RESTART_RETRIES)  # about 45 s of a server restarting
            bar.set_description_str(f"{job['status']}:{job.get('stage') or '-'}"[:22])
            bar.set_postfix_str(f"eta {job['eta_seconds']:.0f} s" if job.get("eta_seconds") is not None else "",
                                refresh=False)
            bar.n = round(job["progress"] * 100)
            bar.refresh()
            if job["status"] in TERMINAL:
                return job
            time.sleep(1.0)


def _print_job(job: dict) -> None:
    typer.echo(f"{job['id']}  {job['status']}  stage={job.get('stage') or '-'}  "
               f"progress={job['progress']:.0%}  model={job['model']}")
    if job.get("eta_seconds"):
        typer.echo(f"eta: {job['eta_seconds']:.0f} s")
    if job.get("error"):
        typer.echo(f"error: {job['error']['message']}")
    for stage, metrics in (job.get("metrics") or {}).items():
        if stage == "progress":  # shown above as progress and eta
            continue
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        typer.echo(f"  {stage}: {shown}")


SUBMIT_FLAGS = recipe_flags(ALL, exclude=SERVER_DECIDES, names={"data.pool": "--pool", "evaluation.ppl": "--eval-text"})


@jobs_app.command("submit")
@with_recipe_flags(SUBMIT_FLAGS)
def jobs_submit(recipe: Optional[Path] = typer.Option(None, help="recipe YAML/JSON (flags override it)"),
                wait: bool = typer.Option(False, "--wait", help="poll with a progress bar until it ends"),
                as_json: bool = typer.Option(False, "--json"),
                recipe_data: dict = None) -> None:
    """Submit a job (local files the recipe names are uploaded first); prints its id."""
    from llm_prune.recipe import deep_merge, load_recipe_file

    body: dict = load_recipe_file(recipe) if recipe else {}
    for key in SERVER_DECIDES:
        body.pop(key, None)  # the worker's device decides
    body = deep_merge(body, recipe_data)
    if not body.get("model"):
        raise UserError("give --model (or a recipe with `model`)", param="model")
    if not body.get("budget"):
        raise UserError("give --ratio or --target-params (or a recipe with `budget`)", param="budget")
    with _client() as client:
        _upload_named_files(client, body)
        # Checked here as the server will check it, so a bad flag fails before anything is sent.
        body = recipe_from_data(body, SUBMIT_FLAGS, JobCreate).model_dump(mode="json", exclude_unset=True)
        job = client.submit(body)
        if wait:
            job = _follow(client, job["id"])
    if as_json:
        emit_json(job)
    else:
        _print_job(job) if wait else typer.echo(job["id"])
    if wait and job["status"] != "succeeded":
        raise typer.Exit(1)


def _upload_named_files(client, body: dict) -> None:
    """Local files a recipe names (data.pool, evaluation.ppl, pruning.calibration) are uploaded
    and replaced by their file ids; values that already are ids pass through."""
    data = body.get("data")
    if isinstance(data, dict):
        pool = data.pop("pool", None)
        if pool:
            path = _local_file(pool, "data.pool")
            data["file_id"] = client.upload(path, "recovery")["id"]
        elif "file_id" not in data:
            raise UserError("data options need a recovery pool: give --pool", param="data.file_id")
    for section, key in (("evaluation", "ppl"), ("pruning", "calibration")):
        options = body.get(section)
        value = options.get(key) if isinstance(options, dict) else None  # another shape: the body check says
        if value and not (isinstance(value, str) and value.startswith("file-")):
            path = _local_file(value, f"{section}.{key}")
            options[key] = client.upload(path, "eval")["id"]


def _local_file(value, param: str) -> str:
    if not isinstance(value, str):
        raise UserError(f"{param} must be a file path (or an uploaded file's id), not {type(value).__name__}",
                        param=param)
    return value


@jobs_app.command("list")
def jobs_list(limit: int = typer.Option(20), after: Optional[str] = typer.Option(None),
              as_json: bool = typer.Option(False, "--json")) -> None:
    """Jobs of this key, newest first."""
    with _client() as client:
        page = client.list_jobs(after, limit)
    if as_json:
        return emit_json(page)
    rows = [[j["id"], j["status"], j.get("stage") or "-", f"{j['progress']:.0%}", j["model"],
             time.strftime("%Y-%m-%d %H:%M", time.localtime(j["created_at"]))] for j in page["data"]]
    typer.echo(table(rows, ["id", "status", "stage", "progress", "model", "created"]))
    if page["has_more"]:
        typer.echo(f"more: --after {page['last_id']}")


@jobs_app.command("status")
def jobs_status(job_id: str, wait: bool = typer.Option(False, "--wait"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """One job; `--wait` polls with a progress bar until it ends."""
    with _client() as client:
        job = _follow(client, job_id) if wait else client.job(job_id)
    emit_json(job) if as_json else _print_job(job)


@jobs_app.command("events")
def jobs_events(job_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="stream until the job ends"),
                after: Optional[int] = typer.Option(None), limit: int = typer.Option(100)) -> None:
    """Stage changes, training steps, eval results and warnings."""
    from tqdm.auto import tqdm

    from llm_prune.progress import ProgressEvent, TqdmRenderer

    with _client() as client:
        if not follow:
            for e in client.events(job_id, after, limit)["data"]:
                typer.echo(_event_line(e))
            return
        render = TqdmRenderer()
        for e in client.stream_events(job_id, after):
            if "end" in e:
                render.close()
                typer.echo(f"job {job_id} {e['end']}")
                return
            if e["kind"] not in ("progress", "warning") and not e.get("parent"):
                tqdm.write(_event_line(e))  # stage changes of the job; the renderer draws one bar per stage
            render(ProgressEvent(stage=e["stage"], step=e["step"], total=e["total"], message=e["message"],
                                 metrics=e["metrics"], kind=e["kind"], time=e["created_at"],
                                 parent=e.get("parent")))


def _event_line(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e["created_at"]))
    step = f" {e['step']}/{e['total']}" if e.get("total") else ""
    metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e["metrics"].items())
    stage = f"{e['parent']}/{e['stage']}" if e.get("parent") else e["stage"]
    return f"{when} {e['kind']:<11} {stage}{step} {e['message']} {metrics}".rstrip()


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Stop a job (a running one is signalled and stops within seconds)."""
    with _client() as client:
        _print_job(client.cancel(job_id))


@jobs_app.command("retry")
def jobs_retry(job_id: str) -> None:
    """Queue a failed job again; it resumes after its last finished stage."""
    with _client() as client:
        _print_job(client.retry(job_id))


@jobs_app.command("delete")
def jobs_delete(job_id: str) -> None:
    """Delete a finished job and its artifacts."""
    with _client() as client:
        client.delete(job_id)
    typer.echo(f"deleted {job_id}")


@jobs_app.command("download")
def jobs_download(job_id: str, out: Path = typer.Option(Path("."), help="directory to unpack into"),
                  checkpoint: str = typer.Option("final", help="final (recovered) or pruned")) -> None:
    """Download a checkpoint (.tar, sha256 checked) and unpack it."""
    from tqdm.auto import tqdm

    from llm_prune.paths import check_output_dir

    if checkpoint not in ("final", "pruned"):  # the server would refuse it, after the progress bar was drawn
        raise UserError(f"--checkpoint {checkpoint!r}: use final (recovered) or pruned", param="checkpoint")
    out = check_output_dir(out, param="out", label="--out")  # before the progress bar and any request
    with _client() as client, tqdm(unit="B", unit_scale=True, desc=checkpoint) as bar:
        def progress(n: int, total: int) -> None:
            bar.total = total
            bar.update(n)

        path = client.download(job_id, out, checkpoint, progress=progress)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    typer.echo(f"{path}  ({human_bytes(size)})")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)
    app.command("worker")(worker)
    app.add_typer(keys_app, name="keys")
    app.add_typer(jobs_app, name="jobs")
