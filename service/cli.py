"""Service commands: `serve`, `worker`, `keys create`, and `jobs submit|list|status|events|cancel|
delete|download` (a client of a running server)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Optional

import typer

from llm_prune.cli.common import emit_json, human_bytes, table
from llm_prune.errors import UserError

jobs_app = typer.Typer(no_args_is_help=True, help="Submit and follow jobs on an llm-prune server.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys (run on the server machine).")

TERMINAL = ("succeeded", "failed", "cancelled")


def _settings(**overrides):
    from service.settings import Settings

    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def serve(host: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_HOST", help="bind address"),
          port: Optional[int] = typer.Option(None, envvar="LLM_PRUNE_PORT"),
          data_dir: Optional[Path] = typer.Option(None, envvar="LLM_PRUNE_DATA_DIR"),
          db: Optional[str] = typer.Option(None, "--db", envvar="LLM_PRUNE_DATABASE_URL"),
          allowed_model_roots: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_ALLOWED_MODEL_ROOTS",
                                                            help="colon-separated"),
          no_auth: bool = typer.Option(False, "--no-auth", help="accept requests without a key (loopback only)"),
          allow_remote_code: bool = typer.Option(False, "--allow-remote-code"),
          worker_slots: Optional[int] = typer.Option(None, "--worker-slots",
                                                     help="jobs the embedded worker runs at once (0: no worker)"),
          device: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_DEVICE")) -> None:
    """Start the API with an embedded worker."""
    import uvicorn

    from service.app import create_app
    from service.settings import LOOPBACK

    settings = _settings(host=host, port=port, data_dir=data_dir, database_url=db,
                         allowed_model_roots=allowed_model_roots, no_auth=no_auth or None,
                         allow_remote_code=allow_remote_code or None, worker_slots=worker_slots, device=device)
    if settings.no_auth and settings.host not in LOOPBACK:
        raise UserError(f"--no-auth is only allowed when binding to localhost, not {settings.host}")
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info")


def worker(db: Optional[str] = typer.Option(None, "--db", envvar="LLM_PRUNE_DATABASE_URL"),
           data_dir: Optional[Path] = typer.Option(None, envvar="LLM_PRUNE_DATA_DIR",
                                                   help="must be the server's data directory"),
           device: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_DEVICE",
                                                help="jobs run here, e.g. cuda:1 (one worker per GPU)"),
           slots: Optional[int] = typer.Option(None, "--slots", help="jobs at once")) -> None:
    """Run a worker that takes jobs from the shared store."""
    from service.worker import Worker

    settings = _settings(database_url=db, data_dir=data_dir, device=device, worker_slots=slots)
    settings.prepare()
    w = Worker(settings)
    signal.signal(signal.SIGTERM, lambda *_: w.stop())
    typer.echo(f"worker {w.id} on {settings.device}, store {settings.db_url}", err=True)
    try:
        w.run_forever()
    except KeyboardInterrupt:
        w.stop()


@keys_app.command("create")
def keys_create(name: str = typer.Option("", "--name", help="label for the key"),
                db: Optional[str] = typer.Option(None, "--db", envvar="LLM_PRUNE_DATABASE_URL"),
                data_dir: Optional[Path] = typer.Option(None, envvar="LLM_PRUNE_DATA_DIR")) -> None:
    """Create an API key and print it once (only its hash is stored)."""
    from service.store import Store

    settings = _settings(database_url=db, data_dir=data_dir)
    settings.prepare()
    key_id, secret = Store(settings.db_url).create_key(name)
    typer.echo(secret)
    typer.echo(f"created {key_id}{' (' + name + ')' if name else ''}; this key is not shown again", err=True)


# --- client ---------------------------------------------------------------------------------
_client_opts: dict = {}


@jobs_app.callback()
def _jobs_opts(server: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_SERVER", help="server URL"),
               api_key: Optional[str] = typer.Option(None, envvar="LLM_PRUNE_API_KEY")) -> None:
    _client_opts.update(base_url=server, api_key=api_key)


def _client():
    from service.client import Client

    return Client(**_client_opts)


def _follow(client, job_id: str) -> dict:
    """Progress bar while polling; returns the finished job."""
    from tqdm.auto import tqdm

    with tqdm(total=100, desc="queued", unit="%", bar_format="{desc:<22}{percentage:3.0f}%|{bar}| {elapsed}") as bar:
        while True:
            job = client.job(job_id)
            bar.set_description_str(f"{job['status']}:{job.get('stage') or '-'}"[:22])
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
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
        typer.echo(f"  {stage}: {shown}")


@jobs_app.command("submit")
def jobs_submit(model: Optional[str] = typer.Option(None, help="hub id, alias or path under the server's roots"),
                ratio: Optional[float] = typer.Option(None, help="fraction of parameters to remove"),
                target_params: Optional[int] = typer.Option(None),
                recipe: Optional[Path] = typer.Option(None, help="recipe YAML/JSON (flags override it)"),
                pool: Optional[Path] = typer.Option(None, help="recovery pool to upload (.jsonl/.json)"),
                selection: Optional[str] = typer.Option(None), data_budget: Optional[float] = typer.Option(None),
                recovery: Optional[str] = typer.Option(None, help="none, lora, perp, ..."),
                max_steps: Optional[int] = typer.Option(None),
                eval_text: Optional[Path] = typer.Option(None, help="text to upload for perplexity"),
                wait: bool = typer.Option(False, "--wait", help="poll with a progress bar until it ends"),
                as_json: bool = typer.Option(False, "--json")) -> None:
    """Submit a job; prints its id."""
    from llm_prune.recipe import deep_merge, load_recipe_file

    body: dict = load_recipe_file(recipe) if recipe else {}
    body.pop("device", None)  # the worker's device decides
    flags: dict = {"model": model, "budget": ({"ratio": ratio} if ratio is not None else
                                              {"target_params": target_params} if target_params else None),
                   "recovery": {k: v for k, v in (("method", recovery), ("max_steps", max_steps)) if v is not None}
                   or None,
                   "data": {k: v for k, v in (("selection", selection), ("budget", data_budget), ("pool", pool))
                            if v is not None} or None,
                   "evaluation": {"ppl": str(eval_text)} if eval_text else None}
    body = deep_merge(body, {k: v for k, v in flags.items() if v is not None})
    if not body.get("model"):
        raise UserError("give --model (or a recipe with `model`)", param="model")
    if not body.get("budget"):
        raise UserError("give --ratio or --target-params (or a recipe with `budget`)", param="budget")
    with _client() as client:
        _upload_named_files(client, body)
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
            data["file_id"] = client.upload(pool, "recovery")["id"]
        elif "file_id" not in data:
            raise UserError("data options need a recovery pool: give --pool", param="data.file_id")
    for section, key in (("evaluation", "ppl"), ("pruning", "calibration")):
        value = (body.get(section) or {}).get(key)
        if value and not str(value).startswith("file-"):
            body[section][key] = client.upload(value, "eval")["id"]


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
            if e["kind"] != "progress":
                render.close() if e["kind"] == "stage_end" else None
                typer.echo(_event_line(e))
            render(ProgressEvent(stage=e["stage"], step=e["step"], total=e["total"], message=e["message"],
                                 metrics=e["metrics"], kind=e["kind"], time=e["created_at"]))


def _event_line(e: dict) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(e["created_at"]))
    step = f" {e['step']}/{e['total']}" if e.get("total") else ""
    metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in e["metrics"].items())
    return f"{when} {e['kind']:<11} {e['stage']}{step} {e['message']} {metrics}".rstrip()


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Stop a job (a running one is signalled and stops within seconds)."""
    with _client() as client:
        _print_job(client.cancel(job_id))


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
