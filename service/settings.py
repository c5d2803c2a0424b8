"""Service configuration, one model: pydantic-settings reads each field from an `LLM_PRUNE_*`
variable, and `service.cli` generates a `serve` flag for every field (and `worker`/`keys` flags for
the ones they use), with the field's description as help."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME", os.path.expanduser("~/.local/share"))
    return Path(base) / "llm-prune"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LLM_PRUNE_", extra="ignore")

    data_dir: Path = Field(default_factory=default_data_dir, description="store, uploads and artifacts")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default: SQLite file in data_dir")
    allowed_model_roots: str = Field("", description="colon-separated directories local models may come from")
    allow_remote_code: bool = Field(False, description="let jobs set trust_remote_code")
    no_auth: bool = Field(False, description="accept requests without a key (loopback binding only)")
    host: str = Field("127.0.0.1", description="bind address")
    port: int = Field(8000, ge=0, le=65535, description="TCP port")
    max_upload_bytes: int = Field(2 * 1024**3, gt=0, description="largest accepted upload")
    max_stored_bytes_per_key: int = Field(20 * 1024**3, gt=0, le=2**60, description="total bytes of uploads one key "
                                          "may keep; deleting files frees them")
    max_json_bytes: int = Field(1024**2, gt=0, description="largest JSON request body; counted as it streams in")
    max_metadata_bytes: int = Field(16 * 1024, ge=0, description="largest job `metadata`, as compact JSON")
    max_active_jobs_per_key: int = Field(4, ge=1, le=1_000_000, description="queued or running jobs one key may have")
    # Upper bounds: attempts are a 32-bit database column; a wait past a day is no wait a worker
    # could keep (and past threading's limit an idle worker's wait raised and stopped it).
    max_attempts: int = Field(3, ge=1, le=1000, description="runs of a job before a lost worker fails it")
    lease_seconds: float = Field(30.0, gt=0, le=86_400, allow_inf_nan=False,
                                 description="a job whose worker stops renewing for this long is requeued")
    heartbeat_seconds: float = Field(2.0, gt=0, le=3600, allow_inf_nan=False,
                                     description="lease renewal and cancel check interval")
    poll_seconds: float = Field(1.0, gt=0, le=3600, allow_inf_nan=False,
                                description="how often an idle worker looks for jobs")
    cancel_grace_seconds: float = Field(3.0, ge=0, le=3600, allow_inf_nan=False,
                                        description="SIGTERM to SIGKILL delay on cancel")
    device: str = Field("cpu", description="device the worker pins its jobs to: cpu, cuda:N or auto")
    prestart_runner: bool = Field(True, description="keep a job process with the libraries imported, "
                                                    "ready for the next job")
    # At most 64: each slot is a thread and a job process (pre-started), all made at start-up.
    worker_slots: int = Field(1, ge=0, le=64, description="jobs a worker runs at once; for serve, 0 runs no "
                              "embedded worker (a standalone worker runs at least one)")

    @field_validator("data_dir", mode="before")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, str) and not value.strip():  # Path("") is the current directory
            raise ValueError("data_dir is empty; give a directory")
        return value

    @model_validator(mode="after")
    def _lease_outlives_heartbeats(self):
        # A lease renewed less often than it lasts expires under a healthy job, which another worker
        # (or the same one) then runs again until its attempts are used up.
        if self.lease_seconds < 2 * self.heartbeat_seconds:
            raise ValueError(f"lease_seconds ({self.lease_seconds:g}) must be at least twice heartbeat_seconds "
                             f"({self.heartbeat_seconds:g}), or a healthy job loses its lease")
        return self

    @property
    def db_url(self) -> str:
        if self.database_url:
            return self.database_url
        # Built, not formatted: a '?' or '%' in the path would otherwise be read as URL syntax.
        return URL.create("sqlite", database=str(self.data_dir / "jobs.db")).render_as_string(hide_password=False)

    @property
    def model_roots(self) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in self.allowed_model_roots.split(":") if p.strip()]

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    def job_dir(self, job_id: str) -> Path:
        return self.jobs_dir / job_id

    def prepare(self) -> None:
        """Create the data directories; a path that cannot be one is the user's error, said in one line."""
        from llm_prune.errors import UserError
        from llm_prune.paths import check_output_dir

        for d in (self.uploads_dir, self.jobs_dir):
            check_output_dir(d, param="data_dir", label="data directory")
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as exc:  # a read-only file system, a race with another process
                raise UserError(f"cannot create data directory {d}: {exc.strerror or exc}",
                                param="data_dir") from None
