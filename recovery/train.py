"""The training loop for every recovery method: transformers' Trainer with
- checkpoints holding only the trained tensors (a LoRA/PERP checkpoint of a pruned model is a few
  MB and never re-serialises the base), resumable from the last one;
- an optional distillation term, KL(teacher || student) on the response tokens;
- progress events (step, loss, lr, tokens/s, ETA) instead of console output.
Placement is accelerate's: CPU here, one or several GPUs elsewhere."""

from __future__ import annotations

import errno
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

from llm_prune.errors import UserError
from llm_prune.paths import nearly_full
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from recovery.data import IGNORE_INDEX, ResponseOnlyCollator, TokenizedSplit
from recovery.merge import TRAINABLE_FILE, load_trainable, save_trainable

STAGE = "train"


@dataclass
class TrainSettings:
    max_steps: int = 100
    epochs: float | None = None  # when set, train whole epochs and ignore max_steps
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.05
    micro_batch_size: int = 4
    gradient_accumulation: int = 1
    distill_weight: float = 0.0
    seed: int = 0
    save_steps: int | None = None  # default: about ten checkpoints per run, at least every 10 steps
    save_total_limit: int = 2
    lr_scheduler: str = "cosine"

    @classmethod
    def from_recovery(cls, config) -> "TrainSettings":
        return cls(max_steps=config.max_steps, epochs=config.epochs, learning_rate=config.learning_rate,
                   warmup_ratio=config.warmup_ratio, micro_batch_size=config.micro_batch_size,
                   gradient_accumulation=config.gradient_accumulation, distill_weight=config.distill_weight,
                   seed=config.seed)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
               num_items: torch.Tensor | int | None = None) -> torch.Tensor:
    """Sum of KL(teacher || student) over positions that predict a response token, divided by
    `num_items` (the Trainer's token count over the accumulated batch) or by this batch's count."""
    mask = labels[:, 1:] != IGNORE_INDEX
    s = F.log_softmax(student_logits[:, :-1][mask].float(), dim=-1)
    t = F.log_softmax(teacher_logits[:, :-1][mask].float(), dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="sum")
    denom = num_items if num_items is not None else mask.sum().clamp(min=1)
    return kl / denom


class RecoveryTrainer(Trainer):
    def __init__(self, *args, teacher: nn.Module | None = None, distill_weight: float = 0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.distill_weight = distill_weight

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.teacher is None or self.distill_weight == 0:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        labels = inputs["labels"]
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        device = outputs.logits.device
        if next(self.teacher.parameters()).device != device:
            self.teacher.to(device)
        with torch.no_grad():
            t_logits = self.teacher(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        if t_logits.shape[-1] != outputs.logits.shape[-1]:
            raise ValueError(f"teacher vocabulary ({t_logits.shape[-1]}) differs from the model's "
                             f"({outputs.logits.shape[-1]})")
        # Normalise like the CE term so gradient accumulation and multi-device scaling stay consistent.
        shared = self.model_accepts_loss_kwargs and num_items_in_batch is not None
        kl = distill_kl(outputs.logits, t_logits, labels, num_items_in_batch if shared else None)
        if shared and self.args.average_tokens_across_devices:
            kl = kl * self.accelerator.num_processes
        loss = loss + self.distill_weight * kl
        return (loss, outputs) if return_outputs else loss

    # Checkpoints: only the trained tensors, by name (see recovery.merge).
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if self.args.should_save:
            save_trainable(self.model, Path(output_dir or self.args.output_dir) / TRAINABLE_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load_trainable(model or self.model, Path(resume_from_checkpoint) / TRAINABLE_FILE)


class ProgressReporter(TrainerCallback):
    """Trainer logs -> ProgressEvents: one per optimizer step, plus eval metrics."""

    def __init__(self, on_event: ProgressCallback = null_callback):
        self.on_event = on_event
        self._t0 = time.time()
        self._step0 = 0
        self._tokens0 = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._step0, self._tokens0 = time.time(), state.global_step, state.num_input_tokens_seen
        self.on_event(ProgressEvent(STAGE, step=state.global_step, total=state.max_steps, kind="stage_start",
                                    message="resuming" if state.global_step else "training"))

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_loss" in logs:
            self.on_event(ProgressEvent(STAGE, step=state.global_step, total=state.max_steps, kind="metric",
                                        metrics={"eval_loss": float(logs["eval_loss"])}))
        if "loss" not in logs:
            return
        elapsed = max(time.time() - self._t0, 1e-9)
        done = state.global_step - self._step0
        metrics: dict[str, Any] = {"loss": float(logs["loss"]), "lr": float(logs.get("learning_rate", 0.0)),
                                   "tokens_per_s": (state.num_input_tokens_seen - self._tokens0) / elapsed}
        if done > 0 and state.max_steps:
            metrics["eta_s"] = elapsed / done * max(state.max_steps - state.global_step, 0)
        self.on_event(ProgressEvent(STAGE, step=state.global_step, total=state.max_steps, metrics=metrics))


def training_arguments(settings: TrainSettings, checkpoint_dir: Path, has_eval: bool) -> TrainingArguments:
    on_gpu = torch.cuda.is_available()
    steps = settings.max_steps if settings.epochs is None else -1
    save_steps = settings.save_steps or max(10, steps // 10 if steps > 0 else 50)
    # A float < 1 is a ratio, rounded up: a single step would be all warmup, at learning rate 0.
    warmup = settings.warmup_ratio if steps <= 0 or steps * settings.warmup_ratio >= 1 else 0
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=steps, num_train_epochs=settings.epochs or 1.0,
        per_device_train_batch_size=settings.micro_batch_size,
        per_device_eval_batch_size=settings.micro_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation,
        learning_rate=settings.learning_rate, warmup_steps=warmup,
        lr_scheduler_type=settings.lr_scheduler, weight_decay=0.0,
        logging_steps=1, save_strategy="steps", save_steps=save_steps,
        save_total_limit=settings.save_total_limit, eval_strategy="no", do_eval=has_eval,
        include_num_input_tokens_seen="non_padding",
        bf16=on_gpu and torch.cuda.is_bf16_supported(), use_cpu=not on_gpu,
        seed=settings.seed, data_seed=settings.seed, report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, label_names=["labels"],
    )


def train(model: nn.Module, split: TokenizedSplit, pad_token_id: int, settings: TrainSettings,
          checkpoint_dir: Path, *, teacher: nn.Module | None = None,
          on_event: ProgressCallback = null_callback) -> dict[str, Any]:
    """Train `model` in place (its trainable parameters), resuming from the last checkpoint in
    `checkpoint_dir` when there is one. Returns the training metrics."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    last = last_complete_checkpoint(checkpoint_dir, on_event)
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    trainer = RecoveryTrainer(
        model=model, args=training_arguments(settings, checkpoint_dir, bool(split.eval)),
        train_dataset=split.train, eval_dataset=split.eval or None,
        data_collator=ResponseOnlyCollator(pad_token_id), callbacks=[ProgressReporter(on_event)],
        teacher=teacher if settings.distill_weight > 0 else None, distill_weight=settings.distill_weight)
    trainer.remove_callback(PrinterCallback)  # stages never print; progress goes to on_event
    start = time.time()
    finished = _finished_state(last)
    if finished is not None:
        # Killed after its last checkpoint but before the stage was marked done: the Trainer would
        # take one more step past max_steps on resume, so the checkpoint is the result.
        trainer._load_from_checkpoint(last)
        trainer.state = finished
        out = None
    else:
        try:
            out = trainer.train(resume_from_checkpoint=last)
        except RuntimeError as exc:
            # torch.save reports a full disk as a failed stream ("file write failed", "unexpected
            # pos"), without the OS's errno: say it is the disk when the disk is indeed full.
            if nearly_full(checkpoint_dir):
                raise OSError(errno.ENOSPC, "No space left on device", str(checkpoint_dir)) from exc
            raise
    wall = time.time() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics: dict[str, Any] = {
        "steps": trainer.state.global_step, "tokens": int(trainer.state.num_input_tokens_seen),
        "train_loss_first": losses[0] if losses else None, "train_loss_last": losses[-1] if losses else None,
        # Over every step's logged loss, the resumed run's earlier ones included (its state holds
        # them): the Trainer's own mean covers only the steps since the resume.
        "train_loss_mean": sum(losses) / len(losses) if losses else out and float(out.training_loss),
        "wall_s": wall, "resumed_from_step": _step_of(last),
        "train_examples": len(split.train), "eval_examples": len(split.eval), "dropped_records": split.dropped,
    }
    if split.eval:
        metrics["eval_loss"] = float(trainer.evaluate()["eval_loss"])
    bad = [k for k in ("train_loss_last", "eval_loss") if metrics.get(k) is not None and not math.isfinite(metrics[k])]
    if bad:  # the weights are then NaN or Inf too: nothing worth publishing as a recovered model
        raise UserError(f"recovery training diverged ({bad[0]} is {metrics[bad[0]]} after "
                        f"{metrics['steps']} steps at learning rate {settings.learning_rate:g}): lower --lr",
                        param="recovery.learning_rate")
    return metrics


def last_complete_checkpoint(checkpoint_dir: Path, on_event: ProgressCallback = null_callback) -> str | None:
    """The newest checkpoint a resume can load. The Trainer writes a checkpoint's files in place and
    `trainer_state.json` last, so a job killed while saving leaves a newer folder without it (or
    with a cut-off file): that one is removed, with a warning, and the one before it is used."""
    import json
    import shutil

    from safetensors import SafetensorError, safe_open
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    found = [p for p in checkpoint_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if p.is_dir() and p.name.split("-")[-1].isdigit()]
    for path in sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
            with safe_open(str(path / TRAINABLE_FILE), "pt"):
                pass
            return str(path)
        except (OSError, ValueError, SafetensorError):
            on_event(ProgressEvent(STAGE, kind="warning", message=f"checkpoint {path.name} is incomplete (the job "
                                   "stopped while saving it): removed, resuming from the one before"))
            shutil.rmtree(path, ignore_errors=True)
    return None


def _finished_state(checkpoint: str | None):
    """The TrainerState of `checkpoint` when it is the run's last step, else None."""
    if checkpoint is None:
        return None
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(Path(checkpoint) / "trainer_state.json"))
    return state if state.max_steps and state.global_step >= state.max_steps else None


def _step_of(checkpoint: str | None) -> int:
    return int(checkpoint.rsplit("-", 1)[-1]) if checkpoint else 0
