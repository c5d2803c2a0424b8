"""Request and response bodies. A job body is the Recipe's sections, except that files are named by
the id of an upload (`data.file_id`, `evaluation.ppl`, `pruning.calibration`) instead of a path on
the server; the route resolves them and validates the result as a `llm_prune.recipe.Recipe`."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from llm_prune.recipe import Budget, EvaluationConfig, PruningConfig, RecoveryConfig, Selection

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class JobData(_Strict):
    file_id: str = Field(description="id of an uploaded recovery pool (purpose=recovery)")
    selection: Selection = "paser"
    budget: float = Field(0.2, gt=0, description="fraction of the pool (<= 1) or a record count (> 1)")
    token_budget: int | None = Field(None, gt=0)
    num_clusters: int | None = Field(None, ge=2)


class JobCreate(_Strict):
    model: str = Field(description="hub id, alias (smollm2-135m) or a directory under the allowed model roots")
    budget: Budget
    data: JobData | None = None
    pruning: PruningConfig | None = Field(None, description="`calibration` takes a file id")
    recovery: RecoveryConfig | None = None
    evaluation: EvaluationConfig | None = Field(None, description="`ppl` takes a file id (purpose=eval)")
    trust_remote_code: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)

    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"model": "smollm2-135m", "budget": {"ratio": 0.2}}]})


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    sha256: str
    records: int | None = Field(None, description="usable records of a recovery pool")
    malformed: int = Field(0, description="records a job will skip (reported, not fatal)")
    created_at: int


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileObject]


class JobObject(BaseModel):
    id: str
    object: Literal["job"] = "job"
    model: str
    status: JobStatus
    stage: str | None = None
    progress: float = Field(description="0 to 1")
    eta_seconds: float | None = None
    metrics: dict[str, Any] = Field(default_factory=dict)
    result: dict[str, Any] | None = None
    error: ErrorBody | None = None
    created_at: int
    started_at: int | None = None
    finished_at: int | None = None
    attempts: int
    device: str | None = None
    cancel_requested: bool = False
    recipe: dict[str, Any]
    metadata: dict[str, Any] = Field(default_factory=dict)


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None


class EventObject(BaseModel):
    id: int
    object: Literal["job.event"] = "job.event"
    created_at: float
    kind: str
    stage: str
    step: int
    total: int | None = None
    message: str = ""
    metrics: dict[str, Any] = Field(default_factory=dict)


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool
    last_id: int | None = None


class CheckpointFile(BaseModel):
    name: str
    bytes: int
    sha256: str
    url: str


class Checkpoint(BaseModel):
    name: str = Field(description="pruned or final")
    object: Literal["checkpoint"] = "checkpoint"
    bytes: int
    files: list[CheckpointFile]
    metrics: dict[str, Any] = Field(default_factory=dict)
    archive_url: str
    archive_bytes: int
    archive_sha256: str = Field(description="sha256 of the .tar the archive URL streams")


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Checkpoint]


class Deleted(BaseModel):
    id: str
    object: str
    deleted: bool = True
