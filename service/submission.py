"""Turn a `POST /v1/jobs` body into a Recipe: resolve file ids to the owner's uploads, keep local
models inside the operator's roots, and validate through `llm_prune.recipe.parse_recipe`."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from llm_prune.errors import UserError
from llm_prune.models import ALIASES, ModelSource, load_config, resolve_source
from llm_prune.recipe import Recipe, parse_recipe
from service.schemas import JobCreate
from service.settings import Settings
from service.store import Store

# Removing more than this leaves too little of a model for recovery to repair.
MAX_SERVED_RATIO = 0.9


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith(".gguf") or \
        os.path.exists(spec)


def check_model(spec: str, settings: Settings) -> ModelSource:
    """Aliases and hub ids pass (a hub id must be in the local cache when the server is offline);
    a local path must resolve (symlinks and `..` included) inside one of the allowed model roots
    and hold a model, and so must every file in its folder (a link there to a file elsewhere would
    be read too). Every refusal of a path reads the same, so answers do not tell which
    folders exist on the server."""
    spec = spec.strip()
    if spec.lower() in ALIASES or not looks_like_path(spec):
        source = resolve_source(spec)  # rejects malformed ids
        if not source.is_local and _hub_offline():
            load_config(source)  # offline: the config must be cached, else the job could never start
        return source
    refused = UserError(f"model path {spec} is not a model directory or .gguf file inside the server's allowed "
                        "model roots", param="model", code="model_not_allowed")
    real = _inside_roots(spec, settings, refused)
    try:
        source = resolve_source(str(real))
    except UserError:
        raise refused from None
    _folder_inside_roots(real, settings, refused)
    return source


def check_embedding_model(spec: str, settings: Settings) -> None:
    """PASER's embedding model is loaded on the server too: a path must be a folder inside the
    allowed model roots, refused in the same words whether or not it exists; hub ids pass."""
    spec = spec.strip()
    if not looks_like_path(spec):
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(spec)
        except HFValidationError:
            raise UserError(f"data.embedding_model {spec[:100]!r} is neither a hub id (org/name) nor a model "
                            "directory inside the server's allowed model roots", param="data.embedding_model",
                            code="model_not_allowed") from None
        return
    refused = UserError(f"data.embedding_model path {spec} is not a model directory inside the server's allowed "
                        "model roots", param="data.embedding_model", code="model_not_allowed")
    real = _inside_roots(spec, settings, refused)
    if not any((real / name).is_file() for name in ("config.json", "modules.json")):  # an empty or other folder
        raise refused
    _folder_inside_roots(real, settings, refused)


def _inside_roots(spec: str, settings: Settings, refused: UserError) -> Path:
    """`spec` resolved (symlinks and `..` included), or `refused` unless it lies in a model root."""
    if not os.path.isabs(os.path.expanduser(spec)):
        raise refused
    try:
        real = Path(spec).expanduser().resolve()
    except (OSError, ValueError):  # a NUL byte, a name longer than the file system allows
        raise refused from None
    if not _in_roots(real, settings):
        raise refused
    return real


def _in_roots(real: Path, settings: Settings) -> bool:
    return any(real == root or real.is_relative_to(root) for root in settings.model_roots)


# A model folder holds tens of files; one with more than this is no model folder to walk in a request.
MAX_MODEL_FOLDER_ENTRIES = 10_000


def _folder_inside_roots(folder: Path, settings: Settings, refused: UserError) -> None:
    """`refused` unless every link in the model folder `folder` (its subfolders included) resolves
    inside the model roots: the folder itself was checked, but transformers reads the files in it,
    and a link to /etc or another user's files would be read as the model's."""
    if not folder.is_dir():
        return
    seen = 0
    for dirpath, dirnames, filenames in os.walk(folder):  # links to folders are checked, not followed
        for name in dirnames + filenames:
            seen += 1
            if seen > MAX_MODEL_FOLDER_ENTRIES:
                raise refused
            path = Path(dirpath) / name
            if not path.is_symlink():
                continue
            try:
                target = path.resolve()
            except (OSError, RuntimeError, ValueError):  # a loop of links
                raise refused from None
            if not _in_roots(target, settings):
                raise refused


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@functools.lru_cache(maxsize=64)
def _config(path: str, gguf_file: str | None, is_local: bool):
    return load_config(ModelSource(path, path, gguf_file, is_local))


def _model_config(source: ModelSource):
    """The model's config, or None where only the job can read it: remote code, or a hub id on a
    server that is online (a download at submission could fail for reasons the job would not meet)."""
    if not source.is_local and not _hub_offline():
        return None
    try:
        return _config(source.path, source.gguf_file, source.is_local)
    except (UserError, MemoryError):
        raise
    except Exception:  # noqa: BLE001 - a config only the job can read (remote code): it checks then
        return None


@functools.lru_cache(maxsize=64)
def _dense_params(path: str, gguf_file: str | None, is_local: bool) -> int:
    """Parameter count of a model from its config alone (weights on the meta device)."""
    import torch
    from transformers import AutoModelForCausalLM

    from llm_prune.plan import count_params

    config = _config(path, gguf_file, is_local)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return count_params(model)


def check_budget(body: JobCreate, source: ModelSource) -> None:
    """A `target_params` at or above the model's size can never be met: refuse it now."""
    target = body.budget.target_params
    if target is None:
        return
    try:
        total = _dense_params(source.path, source.gguf_file, source.is_local)
    except UserError:
        raise
    except Exception:  # noqa: BLE001 - a config only the job can read (remote code): it checks then
        return
    if target >= total:
        raise UserError(f"budget.target_params {target:,} is not below the model's {total:,} parameters",
                        param="budget.target_params")


def check_metadata(metadata: dict, limit: int) -> None:
    size = len(json.dumps(metadata, separators=(",", ":"), default=str).encode())
    if size > limit:
        raise UserError(f"metadata is {size} bytes as JSON; the limit is {limit}", param="metadata",
                        code="metadata_too_large")


def check_clusters(recipe: Recipe, records: int | None) -> None:
    """A pool too small for PASER's clusters would fail the job on the worker: refuse it now, in the
    API's field names. `records` is the upload's usable record count (None: not counted)."""
    if records is None or recipe.recovery.method == "none" or recipe.data.selection != "paser":
        return
    from data_selection.cluster import check_cluster_count

    try:
        check_cluster_count(records, recipe.data.num_clusters)
    except UserError as exc:
        param = "data.num_clusters" if exc.param == "num_clusters" else "data.file_id"
        raise UserError(exc.message.replace("--clusters", "data.num_clusters").replace("the pool", "the pool file"),
                        param=param) from None


def _file_path(store: Store, owner: str, file_id: str, param: str, purpose: str) -> str:
    row = store.get_file(owner, file_id)
    if row is None:
        raise UserError(f"{param}: no file with id '{file_id}'", param=param, code="file_not_found")
    if row.purpose != purpose:
        raise UserError(f"{param}: file '{file_id}' was uploaded with purpose '{row.purpose}', "
                        f"this needs purpose '{purpose}'", param=param)
    if not Path(row.path).is_file():  # removed on the server behind the API's back; its path stays private
        raise UserError(f"{param}: the content of file '{file_id}' is no longer on the server; upload it again",
                        param=param, code="file_not_found")
    return row.path


def build_recipe(body: JobCreate, owner: str, store: Store, settings: Settings) -> Recipe:
    if body.budget.ratio is not None and body.budget.ratio > MAX_SERVED_RATIO:
        raise UserError(f"budget.ratio must be in (0, {MAX_SERVED_RATIO}], got {body.budget.ratio}",
                        param="budget.ratio")
    if body.trust_remote_code and not settings.allow_remote_code:
        raise UserError("trust_remote_code is disabled on this server", param="trust_remote_code",
                        code="remote_code_not_allowed")
    check_metadata(body.metadata, settings.max_metadata_bytes)
    source = check_model(body.model, settings)
    check_budget(body, source)
    recipe = body.model_dump(exclude_none=True, exclude={"data"})
    recipe["budget"] = body.budget.model_dump(exclude_none=True)
    if body.data is not None:
        if body.data.embedding_model:
            check_embedding_model(body.data.embedding_model, settings)
        data = body.data.model_dump(exclude_none=True, exclude={"file_id"})
        data["pool"] = _file_path(store, owner, body.data.file_id, "data.file_id", "recovery")
        recipe["data"] = data
    if body.evaluation is not None and body.evaluation.ppl:
        recipe["evaluation"]["ppl"] = _file_path(store, owner, body.evaluation.ppl, "evaluation.ppl", "eval")
    if body.pruning is not None and body.pruning.calibration:
        recipe["pruning"]["calibration"] = _file_path(store, owner, body.pruning.calibration,
                                                      "pruning.calibration", "eval")
    parsed = parse_recipe(recipe)
    parsed.check_files()
    if body.data is not None:
        check_clusters(parsed, store.get_file(owner, body.data.file_id).records)
    config = _model_config(source)
    if config is not None:
        parsed.check_fits(config)
    return parsed
