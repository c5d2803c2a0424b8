"""The Recipe: one pydantic model of everything a job needs. CLI flags, a recipe YAML/JSON file
and the body of `POST /v1/jobs` all become the same Recipe; validation lives here once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from llm_prune.errors import UserError

Importance = Literal["taylor", "vectorwise", "second_order", "l1", "l2", "random"]
Aggregation = Literal["sum", "mean", "max"]
Allocation = Literal["uniform", "adaptive"]
Selection = Literal["paser", "random", "all", "loss"]
RecoveryMethod = Literal["none", "lora", "perp", "perp_lora", "full", "qlora"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Budget(_Strict):
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of total parameters to remove")
    target_params: int | None = Field(None, gt=0, description="parameter count to land on")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.ratio is None) == (self.target_params is None):
            raise ValueError("give exactly one of ratio or target_params")
        return self


class PruningConfig(_Strict):
    importance: Importance = "taylor"
    aggregation: Aggregation = "sum"
    allocation: Allocation = "uniform"
    stages: int = Field(1, ge=1, le=20)
    round_to: int = Field(8, ge=1, description="MLP widths are multiples of this")
    skip_first: int | None = Field(None, ge=0, description="leading layers left unpruned (uniform allocation); "
                                   "default: the first 10% of layers, at least one")
    skip_last: int = Field(1, ge=0, description="trailing layers left unpruned (uniform allocation)")
    adaptive_strength: float = Field(0.02, ge=0, description="A in s_l = s_base - A * I_l")
    prune_attention: bool = True
    prune_mlp: bool = True
    prune_layers: int = Field(0, ge=0, description="whole decoder layers removed by block influence")
    calibration: str | None = Field(None, description="text file for calibration; default: built-in text")
    calibration_samples: int = Field(10, ge=1)
    calibration_seq_len: int = Field(64, ge=8)
    seed: int = 0


class DataConfig(_Strict):
    pool: str | None = Field(None, description="recovery pool: file or datasets directory")
    selection: Selection = "paser"
    budget: float = Field(0.2, gt=0, description="fraction of the pool (<= 1) or a record count (> 1)")
    token_budget: int | None = Field(None, gt=0)
    num_clusters: int | None = Field(None, ge=2)
    embedding_model: str | None = None
    sample_per_cluster: int | None = Field(None, ge=1, description="PASER: estimate each cluster's degradation "
                                           "from this many samples and score only ranking candidates")


class RecoveryConfig(_Strict):
    method: RecoveryMethod = "lora"
    max_steps: int = Field(100, ge=0)
    epochs: float | None = Field(None, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    warmup_ratio: float = Field(0.05, ge=0, lt=1)
    micro_batch_size: int = Field(4, ge=1)
    gradient_accumulation: int = Field(1, ge=1)
    cutoff_len: int = Field(256, ge=16)
    lora_r: int = Field(8, ge=1)
    lora_alpha: int = Field(16, ge=1)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | None = None
    perp_train_lm_head: bool = False
    perp_train_embeddings: bool = False
    keep_adapter: bool = False
    distill_weight: float = Field(0.0, ge=0, description="weight of KL to the dense model's logits")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5)
    force: bool = Field(False, description="allow QLoRA without CUDA")
    seed: int = 0


class EvaluationConfig(_Strict):
    ppl: str | None = Field(None, description="text file for perplexity")
    seq_len: int = Field(128, ge=8)
    max_windows: int | None = Field(None, ge=1)
    tasks: list[str] = Field(default_factory=list)
    limit: int | None = Field(None, ge=1)
    speed: bool = False


class Recipe(_Strict):
    model: str
    budget: Budget
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    device: str = "cpu"
    trust_remote_code: bool = False
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("model must not be empty")
        return v.strip()

    def check_files(self) -> None:
        """Fail before heavy work when a named file is missing."""
        for param, value in (("data.pool", self.data.pool), ("evaluation.ppl", self.evaluation.ppl),
                             ("pruning.calibration", self.pruning.calibration)):
            if value and not Path(value).exists():
                raise UserError(f"{param}: file not found: {value}", param=param)
        if self.recovery.method != "none" and self.recovery.max_steps == 0 and self.recovery.epochs is None:
            raise UserError("recovery.max_steps is 0 and no epochs given: set --max-steps or --recovery none",
                            param="recovery.max_steps")


def format_validation_error(exc: ValidationError) -> tuple[str, str | None]:
    """One line for the user, plus the dotted parameter name it concerns."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if p != "__root__")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    return (f"{loc}: {msg}" if loc else msg), (loc or None)


def parse_recipe(data: dict[str, Any]) -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        message, param = format_validation_error(exc)
        raise UserError(f"invalid recipe: {message}", param=param) from None


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.exists():
        raise UserError(f"recipe file not found: {path}", param="recipe")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"recipe file {path} is not valid {p.suffix.lstrip('.') or 'JSON'}: "
                        f"{str(exc).splitlines()[0]}", param="recipe") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe file {path} must hold a mapping at the top level", param="recipe")
    return data


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """CLI flags override recipe-file values, section by section."""
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
