"""Request and response bodies. A job body is the Recipe's sections, except that files are named by
the id of an upload (`data.file_id`, `evaluation.ppl`, `pruning.calibration`) instead of a path on
the server; the route resolves them and validates the result as a `llm_prune.recipe.Recipe`."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from llm_prune.errors import UserError
from llm_prune.recipe import MAX_DEPTH, DataConfig, Recipe

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def storable_json(value: Any) -> None:
    """Refuse what JSON can carry but a job cannot keep: text with unpaired surrogates (a `\\ud800`
    escape; not UTF-8, so neither the database nor a response can hold it), text with a NUL
    character (PostgreSQL's text cannot hold it), NaN or Infinity (not JSON at all, though Python's
    parser reads them), and nesting deeper than `MAX_DEPTH`, anywhere in a body, keys included.
    Iterative: a body may be nested as deep as the parser allowed."""
    stack: list[tuple[str, Any, int]] = [("", value, 0)]
    while stack:
        where, item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _refused(where, "text with an unpaired surrogate is not valid Unicode") from None
            if "\x00" in item:
                raise _refused(where, "text with a NUL character cannot be stored")
        elif isinstance(item, float) and not math.isfinite(item):
            raise _refused(where, f"{item} is not a JSON number")
        elif isinstance(item, (dict, list)) and depth >= MAX_DEPTH:
            raise _refused(where, f"nested deeper than {MAX_DEPTH} levels")
        elif isinstance(item, dict):
            for key, sub in item.items():
                stack.append((where, key, depth))
                stack.append((f"{where}.{key}" if where else str(key), sub, depth + 1))
        elif isinstance(item, list):
            stack.extend((f"{where}[{i}]", sub, depth + 1) for i, sub in enumerate(item))


def _refused(where: str, why: str) -> UserError:
    """A 400 naming the field (a UserError passes through pydantic's validation untouched)."""
    where = where[:200]
    return UserError(f"{where or 'body'}: {why}", param=where or None)


class _Body(_Strict):
    @model_validator(mode="before")
    @classmethod
    def _storable(cls, data: Any) -> Any:
        storable_json(data)
        return data


# The API body is the Recipe, derived from it field by field (a new Recipe field is an API field):
# files are named by upload id, and the worker's device, not the client, decides where a job runs.
SERVER_DECIDES = ("device",)


JobData = create_model(
    "JobData", __base__=_Strict, __doc__="The Recipe's `data` section with the pool named by an upload id.",
    file_id=(str, Field(description="id of an uploaded recovery pool (purpose=recovery)")),
    **{name: (f.annotation, f) for name, f in DataConfig.model_fields.items() if name != "pool"})

_SECTION_NOTES = {"pruning": "`calibration` takes a file id (purpose=eval)",
                  "evaluation": "`ppl` takes a file id (purpose=eval)"}


def _job_fields() -> dict:
    out: dict = {}
    for name, f in Recipe.model_fields.items():
        if name in SERVER_DECIDES:
            continue
        if name == "data":
            out[name] = (JobData | None, Field(None, description=JobData.__doc__))
        elif f.default_factory is not None and isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel):
            note = _SECTION_NOTES.get(name)
            out[name] = (f.annotation | None, Field(None, description=note))
        else:
            out[name] = (f.annotation, f)
    return out


JobCreate = create_model(
    "JobCreate", __base__=_Body, __doc__="The body of `POST /v1/jobs`: a Recipe with files named by upload id.",
    **_job_fields())
JobCreate.model_config["json_schema_extra"] = {"examples": [{"model": "smollm2-135m", "budget": {"ratio": 0.2}}]}
JobCreate.model_rebuild(force=True)


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


def error_responses(*statuses: int) -> dict:
    """OpenAPI `responses` for statuses answered with the error object."""
    return {status: {"model": ErrorResponse} for status in statuses}


# What any `/v1/` route may answer besides its own statuses.
API_ERRORS = error_responses(400, 401, 404, 409, 413, 429, 503)


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
    progress: float = Field(description="fraction of the job's estimated work done, 0 to 1; never decreases")
    eta_seconds: float | None = Field(None, description="remaining work over the current stage's measured "
                                      "throughput")
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
    parent: str | None = Field(None, description="the pipeline stage a sub-stage event belongs to")
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
