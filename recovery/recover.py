"""`recover()`: retrain a (pruned) model on prompt/response records with one recovery method and
return the plain dense model to publish. The pipeline calls this; everything method-specific is
in the method's own module."""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from pydantic import ValidationError
from torch import nn

from llm_prune.errors import UserError
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.recipe import RecoveryConfig, format_validation_error
from recovery import full, lora, perp, qlora
from recovery.data import build_examples
from recovery.merge import Prepared, finalize
from recovery.train import STAGE, TrainSettings, train

ADAPTER_DIR = "adapter"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class RecoveryResult:
    model: nn.Module  # merged, frozen, plain transformers model
    metrics: dict[str, Any] = field(default_factory=dict)
    adapter_dir: Path | None = None


def check_config(config: RecoveryConfig | dict) -> RecoveryConfig:
    """Validate before any heavy work; raises UserError with a one-line reason."""
    if isinstance(config, dict):
        try:
            config = RecoveryConfig.model_validate(config)
        except ValidationError as exc:
            message, param = format_validation_error(exc)
            raise UserError(f"invalid recovery settings: {message}",
                            param=f"recovery.{param}" if param else "recovery") from None
    if config.method != "none" and config.max_steps == 0 and config.epochs is None:
        raise UserError("recovery.max_steps is 0 and no epochs given: set --max-steps or --recovery none",
                        param="recovery.max_steps")
    if config.method == "qlora":
        qlora.check_available(config.force)
    return config


def prepare_method(model: nn.Module, config: RecoveryConfig) -> Prepared:
    if config.method == "lora":
        return lora.prepare(model, lora.LoraSettings.from_recovery(config))
    if config.method == "perp":
        return perp.prepare(model, perp.PerpSettings.from_recovery(config))
    if config.method == "perp_lora":
        return perp.prepare_with_lora(model, perp.PerpSettings.from_recovery(config),
                                      lora.LoraSettings.from_recovery(config))
    if config.method == "full":
        return full.prepare(model, full.FullSettings())
    if config.method == "qlora":
        return qlora.prepare(model, qlora.QLoraSettings.from_recovery(config))
    raise UserError(f"unknown recovery method '{config.method}'", param="recovery.method")


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) over distinct parameters (tied weights counted once; 4-bit packed
    weights by their unpacked shape)."""
    def numel(p) -> int:
        state = getattr(p, "quant_state", None)
        return int(state.shape.numel()) if state is not None else p.numel()

    params = list(model.parameters())
    return sum(numel(p) for p in params if p.requires_grad), sum(numel(p) for p in params)


def recover(model: nn.Module, tokenizer, records: Sequence[Any], config: RecoveryConfig | dict,
            output_dir: str | Path, *, teacher: nn.Module | None = None,
            on_event: ProgressCallback = null_callback, keep_checkpoints: bool = False) -> RecoveryResult:
    """Retrain `model` on `records` (objects or mappings with `prompt` and `response`).

    Checkpoints go to OUTPUT_DIR/checkpoints and a rerun with the same arguments resumes from the
    last one; they are removed once training finishes (with `keep_checkpoints`, by the caller, once
    what it makes of the result is safely written: a failure there then loses no training). With
    `config.keep_adapter` the learned adapter (peft LoRA files and/or PERP tensors) is written to
    OUTPUT_DIR/adapter. `teacher` (the dense model) is needed when `config.distill_weight` > 0."""
    config = check_config(config)
    output_dir = Path(output_dir)
    if config.method == "none":
        return RecoveryResult(model=finalize(model), metrics={"steps": 0})
    if config.distill_weight > 0 and teacher is None:
        raise ValueError("recovery.distill_weight > 0 needs the dense model passed as teacher")
    if not records:
        raise UserError("no recovery records: the selected data is empty", param="data.pool")
    config.check_fits(model.config)
    started = time.time()
    split = build_examples(tokenizer, records, config.cutoff_len, config.eval_fraction, seed=config.seed)
    if not split.train:
        raise UserError(f"all {len(records)} recovery records have an empty response: check the data",
                        param="data.pool")
    from transformers import set_seed

    set_seed(config.seed)  # LoRA initialisation is random
    prepared = prepare_method(model, config)
    trainable, total = parameter_counts(prepared.train_model)
    if prepared.notes.get("warning"):
        on_event(ProgressEvent(STAGE, kind="warning", message=prepared.notes["warning"]))
    per_step = config.micro_batch_size * config.gradient_accumulation
    if per_step > len(split.train):  # the Trainer ends a step at the end of the data, silently
        on_event(ProgressEvent(STAGE, kind="warning", message=(
            f"a step asks for {per_step} examples ({config.micro_batch_size} x {config.gradient_accumulation} "
            f"accumulated) but there are {len(split.train)}: each step takes the whole training set once")))
    on_event(ProgressEvent(STAGE, kind="metric", message=f"{config.method}: {trainable:,} of {total:,} "
                           f"parameters train ({trainable / total:.3%})",
                           metrics={"trainable_params": trainable, "trainable_fraction": trainable / total}))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    checkpoint_dir = output_dir / CHECKPOINT_DIR
    try:
        metrics = train(prepared.train_model, split, pad_id, TrainSettings.from_recovery(config), checkpoint_dir,
                        teacher=teacher, on_event=on_event)
    except ValueError as exc:
        if "does not match the model being trained" in str(exc):
            raise UserError(f"{exc} Remove {checkpoint_dir} to start over.", param="recovery") from None
        raise
    adapter_dir = None
    if config.keep_adapter and prepared.save_adapter is not None:
        adapter_dir = output_dir / ADAPTER_DIR
        adapter_dir.mkdir(parents=True, exist_ok=True)
        prepared.save_adapter(adapter_dir)
    merged = prepared.finish()
    if not keep_checkpoints:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    metrics.update(method=config.method, trainable_params=trainable, total_params=total,
                   trainable_fraction=trainable / total, total_wall_s=time.time() - started)
    on_event(ProgressEvent(STAGE, step=metrics["steps"], total=metrics["steps"], kind="stage_end",
                           metrics={k: metrics[k] for k in ("train_loss_last", "eval_loss") if k in metrics}))
    return RecoveryResult(model=merged, metrics=metrics, adapter_dir=adapter_dir)
