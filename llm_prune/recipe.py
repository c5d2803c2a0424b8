"""The Recipe: one pydantic model of everything a job needs. CLI flags, a recipe YAML/JSON file
and the body of `POST /v1/jobs` all become the same Recipe; validation lives here once."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal, get_args

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from llm_prune.errors import NOT_UTF8, UserError, shown_text

Importance = Literal["taylor", "vectorwise", "second_order", "obs", "l1", "l2", "random"]
GRADIENT_IMPORTANCE = ("taylor", "vectorwise", "second_order")  # a backward pass per calibration batch
ACTIVATION_IMPORTANCE = ("obs",)  # forward passes only
Aggregation = Literal["sum", "mean", "max"]
Allocation = Literal["uniform", "adaptive"]
Selection = Literal["paser", "random", "all", "loss"]
RecoveryMethod = Literal["none", "lora", "perp", "perp_lora", "full", "qlora"]
GGUFDtype = Literal["f32", "f16", "q8_0"]
Precision = Literal["auto", "fp32", "bf16"]


class _Strict(BaseModel):
    # NaN and Infinity parse from JSON, YAML and flags alike; no field means anything by them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data):
        # pydantic's lax mode reads true as 1: `target_params: true` pruned to one parameter.
        if isinstance(data, dict):
            for name, value in data.items():
                field = cls.model_fields.get(name) if isinstance(name, str) else None
                kinds = set(get_args(field.annotation) or (field.annotation,)) if field else set()
                if isinstance(value, bool) and kinds & {int, float} and bool not in kinds:
                    raise ValueError(f"{name} must be a number, not {str(value).lower()}")
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _utf8_text(cls, value: Any, info: ValidationInfo) -> Any:
        # A command-line argument in another encoding than UTF-8 arrives as lone surrogates (so does a
        # `\ud800` escape in JSON): no file, log or response can hold it, and recipe.json's writer
        # raised once the job had started. A section validates its own fields (naming them).
        field = cls.model_fields.get(info.field_name or "")
        if field is not None and isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            return value
        bad = _not_utf8(value)
        if bad is not None:
            raise ValueError(f"'{shown_text(bad)}' {NOT_UTF8}")
        if info.field_name in _NAMES_OR_DEFAULT and isinstance(value, str) and not value.strip():
            # `--calibration ''` (an unset shell variable) ran a whole job on the built-in text.
            raise ValueError("is empty: give a file or name, or leave it out for the default")
        return value


# Optional files and names whose absence means a default: an empty value is a mistake, not "unset".
_NAMES_OR_DEFAULT = ("calibration", "pool", "embedding_model", "ppl")


def _not_utf8(value: Any) -> str | None:
    """The first text in `value` (a string, or lists and mappings of them, keys included) that UTF-8
    cannot encode. Iterative: a value may be nested as deep as its parser allowed."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return None


# Nesting a job's data may have, counted from the top of the recipe (a `metadata` object is level 1):
# `llm-prune run` writes it to recipe.json, the service stores it and answers it back, and each
# writer has its own limit (pydantic's serialiser stops near 1000 levels). The service's bodies
# keep the same limit (service.schemas).
MAX_DEPTH = 64

SEED_RANGE = {"ge": 0, "le": 2**32 - 1}  # what numpy's and torch's generators all take

# Upper bounds far above any real job and below what overflows on the way: 10**30 calibration
# tokens passed validation and crashed in torch after the model had loaded.
MAX_TOKENS = 2**31  # a token budget or count
MAX_SEQ_LEN = 2**24  # tokens in one window or training sequence (longer than any model's context)
MAX_LAYERS = 10_000  # a count of decoder layers
MAX_RECORDS = 2**31  # a count of records or windows
MAX_BATCH = 2**16  # sequences per forward pass, micro-batches per step, a LoRA rank
MAX_EPOCHS = 1000  # max_steps stops at 10 million; epochs over a large pool would go on for ever


class Budget(_Strict):
    ratio: float | None = Field(None, gt=0, lt=1, description="fraction of total parameters to remove")
    target_params: int | None = Field(None, gt=0, le=10**15, description="parameter count to land on")

    @model_validator(mode="after")
    def _one_of(self):
        if (self.ratio is None) == (self.target_params is None):
            raise ValueError("give exactly one of ratio or target_params")
        return self


DEFAULT_CALIBRATION_TOKENS = 4096


class PruningConfig(_Strict):
    importance: Importance | None = Field(None, description="how a unit's importance is scored: taylor, vectorwise, "
                                          "second_order (gradients); obs (Optimal Brain Surgeon error from "
                                          "activations; with reconstruction on, reconstruction chooses the kept "
                                          "units); l1, l2, random. Default: obs, taylor with adaptive allocation")
    aggregation: Aggregation = Field("sum", description="how a group's element scores are combined")
    allocation: Allocation = Field("uniform", description="uniform (LLM-Pruner) or adaptive (Adapt-Pruner) "
                                   "per-layer sparsity")
    stages: int = Field(1, ge=1, le=20, description="prune in T steps, rescoring each time (recovery in "
                        "between when the job has a pool)")
    round_to: int = Field(8, ge=1, le=2**16, description="MLP widths are multiples of this")
    skip_first: int | None = Field(None, ge=0, le=MAX_LAYERS, description="leading layers left unpruned (uniform allocation); "
                                   "default: the first 10% of layers, at least one")
    skip_last: int = Field(1, ge=0, le=MAX_LAYERS, description="trailing layers left unpruned (uniform allocation)")
    adaptive_strength: float = Field(2.0, ge=0, le=1000, description="A in Adapt-Pruner's per-step update "
                                     "s_l <- clip(s_l + ds - A * I_l, 0, 0.95) (adaptive allocation; 2 measured "
                                     "best on SmolLM2-135M, bench/README.md)")
    # At least 0.005: each step is a scoring pass, so a smaller step turns one job into hundreds of them.
    adaptive_step: float = Field(0.05, ge=0.005, le=1, description="ds: fraction of the prunable units removed "
                                 "per incremental step (adaptive); the number of steps follows from the budget")
    rescore_every: int = Field(1, ge=1, le=1000, description="adaptive: rescore units (gradients) every k incremental steps; "
                               "layer importance is re-measured on the current model at every step")
    prune_attention: bool = Field(True, description="prune KV groups (with their query heads)")
    prune_mlp: bool = Field(True, description="prune MLP channels")
    prune_layers: int | None = Field(None, ge=0, le=MAX_LAYERS, description="whole decoder layers removed, lowest block "
                                     "influence first; default: none while cutting widths alone would remove at "
                                     "most depth_above of the prunable layers' parameters, else as many as take "
                                     "depth_share of the cut (one-step cuts; none in staged or adaptive pruning)")
    depth_above: float = Field(0.4, ge=0, le=1, description="with prune_layers unset, whole layers go only when "
                               "cutting widths alone would remove more than this fraction of the prunable layers' "
                               "parameters (SmolLM2-135M: 29% at a 20% cut, 51% at 35%)")
    depth_share: float = Field(0.55, ge=0, lt=1, description="with prune_layers unset and depth_above exceeded, "
                               "the share of the parameters to remove that goes as whole layers (to the nearest "
                               "layer), the widths cutting the rest; 0: widths only (bench/README.md)")
    calibration: str | None = Field(None, description="text file for calibration; default: built-in text")
    calibration_tokens: int | None = Field(None, ge=8, le=MAX_TOKENS, description="calibration budget in tokens, cut into "
                                           f"windows of calibration_seq_len (default {DEFAULT_CALIBRATION_TOKENS})")
    calibration_samples: int | None = Field(None, ge=1, le=MAX_RECORDS, description="number of calibration windows; when "
                                            "given, it replaces the token budget")
    calibration_seq_len: int = Field(128, ge=8, le=MAX_SEQ_LEN, description="tokens per calibration window")
    calibration_batch_tokens: int = Field(512, ge=8, le=MAX_TOKENS, description="tokens per scoring micro-batch: peak memory "
                                          "depends on this, not on the calibration budget")
    calibration_precision: Precision = Field("auto", description="matmul precision of the calibration passes "
                                             "(scoring, reconstruction): auto = bf16 autocast for a float32 model "
                                             "on hardware with native bf16 (AMX/AVX512-BF16 CPUs, most GPUs), else "
                                             "fp32; the model keeps its dtype")
    reconstruct: bool = Field(True, description="after cutting, refit each layer's o_proj and down_proj (ridge "
                              "least squares on the kept inputs) so the pruned layer reproduces the unpruned "
                              "layer's output on reconstruct_tokens calibration tokens")
    reconstruct_tokens: int = Field(20480, ge=8, le=MAX_TOKENS, description="calibration tokens the reconstruction regresses on "
                                    "(forward passes only; the Gram matrices need several times the projections' "
                                    "input width, far more than scoring does); a shorter calibration text gives "
                                    "what it has")
    reconstruct_damp: float = Field(0.1, ge=0, le=1e6, description="ridge term of the reconstruction (towards the sliced "
                                    "weights), as a fraction of the mean diagonal of the inputs' Gram matrix")
    reconstruct_correction: float = Field(0.35, ge=0, le=1, description="how much of the upstream error each "
                                          "refit is asked to undo: its target is the uncut layer's output on the "
                                          "pruned model's input plus this fraction of the way to the unpruned "
                                          "model's output (1: all of it, 0: imitate the uncut layer)")
    seed: int = Field(0, **SEED_RANGE, description="seed of calibration sampling and random importance")
    portable: bool = Field(False, description="every layer keeps the same widths (KV groups, MLP channels) "
                           "within the same budget, so config.json is stock and vLLM, TGI, SGLang, MLX and "
                           "transformers load it without remote code; it replaces allocation and skip_first/skip_last")

    @model_validator(mode="after")
    def _default_importance(self):
        # OBS measured better than Taylor on SmolLM2-135M in one cut (uniform allocation), with
        # reconstruction choosing the units by the full Hessian and without it (diagonal estimate);
        # Adapt-Pruner's intermediate steps cut by the diagonal estimate without a refit in
        # between, where gradients choose better at 20% (bench/README.md).
        if self.importance is None:
            self.importance = "taylor" if self.allocation == "adaptive" and not self.portable else "obs"
        return self

    @property
    def reconstruction_chooses(self) -> bool:
        """Reconstruction chooses the kept units (activation importance: greedy OBS on the refit
        objective), not the scores."""
        return self.reconstruct and self.importance in ACTIVATION_IMPORTANCE

    @property
    def needs_scores(self) -> bool:
        """Whether unit scores decide anything: not when reconstruction chooses the units and the
        widths follow from the budget alone (uniform or portable, one step, no depth pruning,
        which ranks layers by the scoring pass's cosines)."""
        one_step = self.allocation == "uniform" or self.portable
        # Unset prune_layers is resolved to a count before pruning (prune_model); until then it may drop.
        return not (self.reconstruction_chooses and one_step and self.prune_layers == 0)

    @property
    def calibration_windows(self) -> int:
        if self.calibration_samples is not None:
            return self.calibration_samples
        tokens = self.calibration_tokens or DEFAULT_CALIBRATION_TOKENS
        return max(1, -(-tokens // self.calibration_seq_len))

    @property
    def reconstruct_windows(self) -> int:
        return max(1, -(-self.reconstruct_tokens // self.calibration_seq_len))

    @property
    def micro_batch(self) -> int:
        """Calibration windows per scoring micro-batch."""
        return max(1, self.calibration_batch_tokens // self.calibration_seq_len)


    def unused_settings(self) -> list[str]:
        """Options given that this cut never reads (see `Recipe.unused_settings`), one line each."""
        given = {n for n, f in PruningConfig.model_fields.items() if getattr(self, n) != f.default}
        out = []

        def unused(names, why: str) -> None:
            if names := [n for n in PruningConfig.model_fields if n in given and n in names]:
                out.append(f"{', '.join(_flag('pruning', n) for n in names)}: not used {why}")

        adaptive = self.allocation == "adaptive" and not self.portable
        if self.portable:
            unused(("allocation", "skip_first", "skip_last"), "with --portable, which sets every layer's widths")
        elif adaptive:
            unused(("skip_first", "skip_last"), "with --allocation adaptive, which decides every layer's sparsity")
        if not adaptive:
            unused(("adaptive_strength", "adaptive_step", "rescore_every"), "without --allocation adaptive")
        if self.prune_layers is not None:
            unused(("depth_above", "depth_share"), "with --prune-layers, which gives the number of layers to drop")
        elif adaptive or self.stages > 1:
            unused(("depth_above", "depth_share"), "in staged or adaptive pruning: whole layers go there only as "
                   "many as --prune-layers says")
        if not self.reconstruct:
            unused(("reconstruct_tokens", "reconstruct_damp", "reconstruct_correction"), "with --no-reconstruct")
        if self.calibration_samples is not None:
            unused(("calibration_tokens",), "with --calibration-samples, which replaces the token budget")
        return out

    @model_validator(mode="after")
    def _something_to_prune(self):
        if not (self.prune_attention or self.prune_mlp or self.prune_layers):
            raise ValueError("nothing to prune: enable attention or MLP pruning, or give prune_layers")
        return self

    def check_fits(self, model_config) -> None:
        """What only the model's config can refuse (`Recipe.check_fits`)."""
        limit = getattr(model_config, "max_position_embeddings", None)
        if limit and self.calibration_seq_len > limit:  # untrained positions; attention quadratic in the window
            raise UserError(f"--calibration-seq-len {self.calibration_seq_len} is longer than the model's context "
                            f"of {limit} tokens", param="pruning.calibration_seq_len")
        n_layers = getattr(model_config, "num_hidden_layers", None)
        if not isinstance(n_layers, int):
            return
        if self.prune_layers is not None and self.prune_layers >= n_layers:
            raise UserError(f"--prune-layers {self.prune_layers}: the model has {n_layers} layers, and at least one "
                            "must stay", param="pruning.prune_layers")
        if self.allocation != "uniform" or self.portable:
            return
        first = leading_layers_kept(n_layers, self.skip_first)
        open_layers = max(0, n_layers - first - self.skip_last)
        if not open_layers and (self.prune_attention or self.prune_mlp):
            raise UserError(f"--skip-first {first} and --skip-last {self.skip_last} leave none of the model's "
                            f"{n_layers} layers to prune", param="pruning.skip_first")
        # Uniform allocation drops whole layers only among those it may cut (allocation._drop_layers).
        if self.prune_layers is not None and self.prune_layers > open_layers:
            raise UserError(f"--prune-layers {self.prune_layers}: --skip-first {first} and --skip-last "
                            f"{self.skip_last} leave {open_layers} of the model's {n_layers} layers to drop",
                            param="pruning.prune_layers")


def leading_layers_kept(n_layers: int, skip_first: int | None) -> int:
    """Uniform allocation's protected first layers: `skip_first`, or by default the first 10%
    (at least one), which change the hidden state most (cos(h_in, h_out) near 0 for layer 0)."""
    return max(1, round(0.1 * n_layers)) if skip_first is None else skip_first


# Each pruning field's default, for code that takes it as a keyword default (not a copy).
PRUNING_DEFAULTS = {name: f.default for name, f in PruningConfig.model_fields.items()}


class DataConfig(_Strict):
    pool: str | None = Field(None, description="recovery pool: JSON/JSONL/CSV/Parquet file or datasets directory")
    selection: Selection = Field("paser", description="how recovery data is chosen from the pool")
    budget: float = Field(0.2, gt=0, le=MAX_RECORDS, description="fraction of the pool (<= 1) or a record count (> 1)")
    token_budget: int | None = Field(None, gt=0, le=MAX_TOKENS, description="cap on selected prompt+response tokens, each "
                                     "record counted as trained (at most cutoff_len)")
    num_clusters: int | None = Field(None, ge=2, le=MAX_RECORDS, description="PASER clusters; default: eigengap")
    embedding_model: str | None = Field(None, description="sentence-transformers dir or hub id for PASER's "
                                        "clustering; default: all-MiniLM-L6-v2")
    sample_per_cluster: int | None = Field(None, ge=1, le=MAX_RECORDS, description="PASER: estimate each cluster's degradation "
                                           "from this many samples and score only ranking candidates")
    conflict_filter: bool = Field(True, description="PASER: reject samples that contradict ones already chosen")

    def unused_settings(self, budget_flag: str = "--data-budget") -> list[str]:
        """PASER's options given to another selection method, and a budget to `all` (see
        `Recipe.unused_settings`); `budget_flag` is the budget's name in the command asking."""
        if self.selection == "all" and self.budget != DataConfig.model_fields["budget"].default:
            return [f"{budget_flag}: selection 'all' takes the whole pool"]
        if self.selection == "paser":
            return []
        given = [name for name, value in (("--clusters", self.num_clusters),
                                          ("--embedding-model", self.embedding_model),
                                          ("--sample-per-cluster", self.sample_per_cluster),
                                          ("--no-conflict-filter", not self.conflict_filter or None)) if value]
        return [f"{', '.join(given)}: only PASER uses them, not {self.selection}"] if given else []


class RecoveryConfig(_Strict):
    method: RecoveryMethod = Field("lora", description="recovery training method")
    max_steps: int = Field(100, ge=0, le=10_000_000, description="optimizer steps (the total over all stages)")
    epochs: float | None = Field(None, gt=0, le=MAX_EPOCHS, description="train for this many epochs instead of max_steps")
    learning_rate: float = Field(2e-4, gt=0, description="peak learning rate")
    warmup_ratio: float = Field(0.05, ge=0, lt=1, description="fraction of steps with linear warmup")
    micro_batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="sequences per forward pass")
    gradient_accumulation: int = Field(1, ge=1, le=MAX_BATCH, description="micro-batches per optimizer step")
    cutoff_len: int = Field(256, ge=16, le=MAX_SEQ_LEN, description="tokens per training sequence; PASER scores the same tokens")
    lora_r: int = Field(8, ge=1, le=MAX_BATCH, description="LoRA rank")
    lora_alpha: int = Field(16, ge=1, le=10_000, description="LoRA alpha (LoRA scales its update by alpha / r)")
    lora_dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | None = Field(None, description="modules LoRA adapts (comma list on the CLI); "
                                             "default: all linear layers of the decoder")
    perp_train_lm_head: bool = Field(False, description="PERP: also train the LM head")
    perp_train_embeddings: bool = Field(False, description="PERP: also train the embeddings")
    keep_adapter: bool = Field(False, description="keep the adapter (LoRA files, PERP tensors) in the final "
                                       "checkpoint's adapter/ folder, beside the merged weights")
    distill_weight: float = Field(0.0, ge=0, le=1000, description="weight of KL to the dense model's logits")
    eval_fraction: float = Field(0.05, ge=0, lt=0.5, description="held-out fraction of the selected data")
    force: bool = Field(False, description="allow QLoRA without CUDA")
    seed: int = Field(0, **SEED_RANGE, description="seed of data selection and training")

    @field_validator("target_modules")
    @classmethod
    def _some_modules(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not [m for m in v if m.strip()]:  # not silently "all of them"
            raise ValueError("names no module; leave it out to adapt every linear layer of the decoder")
        return v

    def check_fits(self, model_config) -> None:
        """What only the model's config can refuse (`Recipe.check_fits`)."""
        if self.method == "none":
            return
        context = getattr(model_config, "max_position_embeddings", None)
        if context and self.cutoff_len > context:  # positions the model never learnt
            raise UserError(f"--cutoff-len {self.cutoff_len} is longer than the model's context of {context} tokens",
                            param="recovery.cutoff_len")
        hidden = getattr(model_config, "hidden_size", None)
        # Every projection of a decoder block has the hidden size on one side, so no LoRA update can
        # have a higher rank: a larger r only allocates (2 r (in + out) per layer: gigabytes).
        if hidden and self.method in LORA_METHODS and self.lora_r > hidden:
            raise UserError(f"--lora-r {self.lora_r} is above the model's hidden size of {hidden}, the highest rank "
                            "a LoRA update of its projections can have", param="recovery.lora_r")
        if self.target_modules and self.method in LORA_METHODS:
            _check_target_modules(self.target_modules, model_config)


LORA_METHODS = ("lora", "perp_lora", "qlora")


def _check_target_modules(targets: list[str], model_config) -> None:
    """LoRA's module names exist in the model, built on the meta device from its config (no weights),
    so a misspelt name is refused before pruning (and at submission), not after it."""
    import torch
    from transformers import AutoModelForCausalLM

    from recovery.lora import check_targets

    try:
        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(model_config)
    except Exception:  # noqa: BLE001 - a config only the model's own code builds: recovery checks it then
        return
    check_targets(skeleton, targets)


class EvaluationConfig(_Strict):
    ppl: str | None = Field(None, description="text file for perplexity")
    seq_len: int = Field(128, ge=8, le=MAX_SEQ_LEN, description="perplexity window length")
    max_windows: int | None = Field(None, ge=1, le=MAX_RECORDS, description="cap on perplexity windows")
    tasks: list[str] = Field(default_factory=list, description="zero-shot tasks (comma list on the CLI, or 'all')")
    limit: int | None = Field(None, ge=1, le=MAX_RECORDS, description="items per task")
    speed: bool = Field(False, description="measure prefill/decode throughput and memory")

    def check_fits(self, model_config) -> None:
        """What only the model's config can refuse (`Recipe.check_fits`)."""
        context = getattr(model_config, "max_position_embeddings", None)
        if self.ppl and context and self.seq_len > context:  # found only after the dense model's evaluation
            raise UserError(f"--seq-len {self.seq_len} is longer than the model's context of {context} tokens",
                            param="evaluation.seq_len")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, v: list[str]) -> list[str]:
        from llm_prune.evaluate.tasks import parse_tasks  # a job naming no such task fails at submission

        try:
            parse_tasks(v)
        except UserError as exc:
            raise ValueError(exc.message) from None
        return v


class ExportConfig(_Strict):
    gguf: GGUFDtype | None = Field(None, description="also write the final checkpoint as model-<dtype>.gguf for "
                                   "llama.cpp / Ollama / LM Studio (llama and mistral families)")


class Recipe(_Strict):
    model: str = Field(description="hub id, local directory, .gguf file or alias (smollm2-135m)")
    budget: Budget
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    recovery: RecoveryConfig = Field(default_factory=RecoveryConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    device: str = Field("cpu", description="cpu, cuda, cuda:N or auto (shard over all GPUs)")
    trust_remote_code: bool = Field(False, description="let transformers run the model's own code")
    metadata: dict[str, Any] = Field(default_factory=dict, description="free-form labels kept with the job "
                                     "(JSON object on the CLI)")

    @field_validator("metadata")
    @classmethod
    def _metadata_is_json(cls, v: dict) -> dict:
        stack: list[tuple[Any, int]] = [(v, 1)]  # iterative: a value may be nested as deep as its parser allowed
        while stack:
            value, depth = stack.pop()
            if isinstance(value, float) and not math.isfinite(value):  # written bare, no JSON reader takes it
                raise ValueError(f"{value} is not a JSON number")
            if isinstance(value, (dict, list)) and depth >= MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH} levels")
            for item in value.values() if isinstance(value, dict) else value if isinstance(value, list) else ():
                stack.append((item, depth + 1))
        return v

    @field_validator("model")
    @classmethod
    def _model_nonempty(cls, v: str) -> str:
        if not v or not v.strip():
            raise ValueError("model must not be empty")
        return v.strip()

    @model_validator(mode="after")
    def _steps_cover_the_stages(self):
        # Adapt-Accel splits max_steps over the stages, one step at least each: fewer would overrun it.
        stages, rec = self.pruning.stages, self.recovery
        if stages > 1 and self.data.pool and rec.method != "none" and rec.epochs is None \
                and 0 < rec.max_steps < stages:
            raise ValueError(f"recovery.max_steps {rec.max_steps} is the total over {stages} pruning stages (one "
                             f"recovery between each, one after selection): give at least {stages}")
        return self

    def unused_settings(self) -> list[str]:
        """Settings given that this recipe never reads (told, not refused: a recipe may carry them for
        another method). Each is one line for a warning."""
        rec, data, out = self.recovery, self.data, self.pruning.unused_settings()
        given = {name for name, f in RecoveryConfig.model_fields.items() if getattr(rec, name) != f.default}
        flag = lambda names: ", ".join(_flag("recovery", n) for n in sorted(names))  # noqa: E731
        if rec.method == "none":  # nothing is selected or trained
            unused = [_flag("recovery", n) for n in sorted(given - {"method", "seed"})]
            unused += [_flag("data", n) for n, f in DataConfig.model_fields.items() if getattr(data, n) != f.default]
            if unused:
                out.append(f"{', '.join(unused)}: recovery is off (--recovery none)")
            return out
        if not data.pool:
            out.append("no recovery pool (--data): recovery is skipped, the final model is the pruned one")
            return out
        if rec.keep_adapter and rec.method == "full":
            out.append("--keep-adapter: full fine-tuning trains the weights themselves, there is no adapter to keep")
        perp = given & {"perp_train_lm_head", "perp_train_embeddings"}
        if perp and rec.method not in ("perp", "perp_lora"):
            out.append(f"{flag(perp)}: only PERP uses them, not {rec.method}")
        lora = given & {"lora_r", "lora_alpha", "lora_dropout", "target_modules"}
        if lora and rec.method not in LORA_METHODS:
            out.append(f"{flag(lora)}: only LoRA methods use them, not {rec.method}")
        return out + data.unused_settings()

    def check_fits(self, model_config) -> None:
        """Settings only the model's config (transformers' PretrainedConfig) can refuse, checked before
        any heavy work: by the job service at submission and by `llm-prune run` before it prunes.
        Pruning and recovery check the same on the model they are given."""
        self.pruning.check_fits(model_config)
        self.recovery.check_fits(model_config)
        self.evaluation.check_fits(model_config)

    def check_files(self) -> None:
        """Fail before heavy work when a named file is missing."""
        for param, value in (("data.pool", self.data.pool), ("evaluation.ppl", self.evaluation.ppl),
                             ("pruning.calibration", self.pruning.calibration)):
            if value and not Path(value).exists():
                raise UserError(f"{param}: file not found: {value}", param=param)
            if value and not (Path(value).is_file() or Path(value).is_dir()):  # a pipe would block the read
                raise UserError(f"{param}: {value} is not a regular file (a pipe or a device)", param=param)
        if self.recovery.method != "none" and self.recovery.max_steps == 0 and self.recovery.epochs is None:
            raise UserError("recovery.max_steps is 0 and no epochs given: set --max-steps or --recovery none",
                            param="recovery.max_steps")


def _flag(section: str, name: str) -> str:
    return CLI_NAMES.get(f"{section}.{name}", "--" + name.replace("_", "-"))


# Command-line names of fields whose flag is not `--<field-name>` (the names users already type, and
# the fields whose plain names would clash); every other field gets `--<field-name>` automatically.
CLI_NAMES: dict[str, str] = {
    "pruning.prune_attention": "--attention",
    "pruning.prune_mlp": "--mlp",
    "data.pool": "--data",
    "data.budget": "--data-budget",
    "data.num_clusters": "--clusters",
    "recovery.method": "--recovery",
    "recovery.learning_rate": "--lr",
    "recovery.micro_batch_size": "--micro-batch",
    "recovery.distill_weight": "--distill",
    "recovery.seed": "--recovery-seed",
    "evaluation.ppl": "--eval-ppl",
}


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
    if not p.is_file():
        raise UserError(f"recipe file not found: {path}" if not p.exists() else f"recipe {path} is not a file",
                        param="recipe")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read recipe file {path}: {str(exc).splitlines()[0]}", param="recipe") from None
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.load(text, Loader=_unique_keys_loader())
        else:
            data = json.loads(text, object_pairs_hook=_unique_keys)
    except Exception as exc:  # noqa: BLE001 - any parse failure is the user's file
        raise UserError(f"recipe file {path} is not valid {p.suffix.lstrip('.') or 'JSON'}: "
                        f"{str(exc).splitlines()[0]}", param="recipe") from None
    if not isinstance(data, dict):
        raise UserError(f"recipe file {path} must hold a mapping at the top level", param="recipe")
    return data


def _unique_keys(pairs: list[tuple]) -> dict:
    """A mapping that names a key twice is refused: both parsers keep the last silently, so
    `budget: {ratio: 0.2}` written again below as 0.3 pruned at 0.3 without a word."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"the key '{key}' is given twice in one mapping")
        seen[key] = value
    return seen


def _unique_keys_loader():
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            # Before `<<:` merges are flattened in: a key written here may override a merged one.
            _unique_keys([(self.construct_object(k, deep=deep), None) for k, _ in node.value
                          if k.tag != "tag:yaml.org,2002:merge"])
            return super().construct_mapping(node, deep=deep)

    return Loader


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """CLI flags override recipe-file values, section by section."""
    out = dict(base)
    for k, v in override.items():
        # The budget is one choice (ratio or target_params): a flag for either replaces the file's.
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "budget":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out
