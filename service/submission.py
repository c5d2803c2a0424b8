"""Turn a `POST /v1/jobs` body into a Recipe: resolve file ids to the owner's uploads, keep local
models inside the operator's roots, and validate through `llm_prune.recipe.parse_recipe`."""

from __future__ import annotations

import os
from pathlib import Path

from llm_prune.errors import UserError
from llm_prune.models import ALIASES, resolve_source
from llm_prune.recipe import Recipe, parse_recipe
from service.schemas import JobCreate
from service.settings import Settings
from service.store import Store

# Removing more than this leaves too little of a model for recovery to repair.
MAX_SERVED_RATIO = 0.9


def looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith(".gguf") or \
        os.path.exists(spec)


def check_model(spec: str, settings: Settings) -> None:
    """Aliases and hub ids pass; a local path must resolve (symlinks and `..` included) inside
    one of the allowed model roots."""
    spec = spec.strip()
    if spec.lower() in ALIASES:
        resolve_source(spec)
        return
    if not looks_like_path(spec):
        resolve_source(spec)  # rejects malformed ids; hub ids are fetched by the worker
        return
    if not os.path.isabs(os.path.expanduser(spec)):
        raise UserError(f"model path must be absolute: {spec}", param="model", code="model_not_allowed")
    real = Path(spec).expanduser().resolve()
    roots = settings.model_roots
    if not any(real == root or real.is_relative_to(root) for root in roots):
        where = ", ".join(str(r) for r in roots) or "none configured (LLM_PRUNE_ALLOWED_MODEL_ROOTS)"
        raise UserError(f"model path {spec} is outside the allowed model roots ({where})", param="model",
                        code="model_not_allowed")
    resolve_source(str(real))


def _file_path(store: Store, owner: str, file_id: str, param: str, purpose: str) -> str:
    row = store.get_file(owner, file_id)
    if row is None:
        raise UserError(f"{param}: no file with id '{file_id}'", param=param, code="file_not_found")
    if row.purpose != purpose:
        raise UserError(f"{param}: file '{file_id}' was uploaded with purpose '{row.purpose}', "
                        f"this needs purpose '{purpose}'", param=param)
    return row.path


def build_recipe(body: JobCreate, owner: str, store: Store, settings: Settings) -> Recipe:
    if body.budget.ratio is not None and body.budget.ratio > MAX_SERVED_RATIO:
        raise UserError(f"budget.ratio must be in (0, {MAX_SERVED_RATIO}], got {body.budget.ratio}",
                        param="budget.ratio")
    if body.trust_remote_code and not settings.allow_remote_code:
        raise UserError("trust_remote_code is disabled on this server", param="trust_remote_code",
                        code="remote_code_not_allowed")
    check_model(body.model, settings)
    recipe = body.model_dump(exclude_none=True, exclude={"data"})
    recipe["budget"] = body.budget.model_dump(exclude_none=True)
    if body.data is not None:
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
    return parsed
