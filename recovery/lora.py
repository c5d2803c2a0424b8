"""LoRA (peft) on every linear layer of the decoder blocks, merged at the end so the published
model is a plain dense checkpoint. Works on structurally pruned models: peft wraps each
nn.Linear at its own width."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from llm_prune.families import family_for
from recovery.merge import Prepared, merge_lora


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    target_modules: list[str] | None = None  # None: q/k/v/o and gate/up/down of every block

    @classmethod
    def from_recovery(cls, config) -> "LoraSettings":
        return cls(r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                   target_modules=list(config.target_modules) if config.target_modules else None)


def default_target_modules(model: nn.Module) -> list[str]:
    fam = family_for(model)
    return [fam.q, fam.k, fam.v, fam.o, fam.gate, fam.up, fam.down]


def check_targets(model: nn.Module, targets: list[str]) -> None:
    from llm_prune.errors import UserError

    leaf_names = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    unknown = [t for t in targets if t not in leaf_names]
    if unknown:
        raise UserError(f"recovery.target_modules: no linear layer named {', '.join(unknown)}; "
                        f"this model has {', '.join(sorted(leaf_names))}", param="recovery.target_modules")


def lora_config(model: nn.Module, settings: LoraSettings):
    from peft import LoraConfig

    targets = settings.target_modules or default_target_modules(model)
    check_targets(model, targets)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=targets, bias="none", task_type="CAUSAL_LM")


def add_lora(model: nn.Module, settings: LoraSettings):
    from peft import get_peft_model

    return get_peft_model(model, lora_config(model, settings))


def prepare(model: nn.Module, settings: LoraSettings) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = add_lora(model, settings)

    def save_adapter(directory: Path) -> None:
        peft_model.save_pretrained(str(directory))

    return Prepared(train_model=peft_model, finish=lambda: merge_lora(peft_model), save_adapter=save_adapter)
