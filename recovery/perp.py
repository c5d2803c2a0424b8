"""PERP (Zimmer et al., arXiv 2312.15230): after pruning, retrain only a small expressive subset:
normalisation weights and biases (plus, optionally, the LM head and the embeddings), alone or
together with LoRA. Nothing is added to the model, so there is nothing to merge for the subset."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from recovery import lora
from recovery.merge import PERP_FILE, Prepared, finalize, merge_lora, save_non_lora_trainable


@dataclass
class PerpSettings:
    norms: bool = True
    biases: bool = True
    lm_head: bool = False
    embeddings: bool = False

    @classmethod
    def from_recovery(cls, config) -> "PerpSettings":
        return cls(lm_head=config.perp_train_lm_head, embeddings=config.perp_train_embeddings)


def is_norm(module: nn.Module) -> bool:
    # Families name their norms differently (LlamaRMSNorm, Qwen3RMSNorm, nn.LayerNorm...).
    name = type(module).__name__
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm)) or name.endswith(("RMSNorm", "LayerNorm"))


def perp_parameters(model: nn.Module, settings: PerpSettings) -> list[nn.Parameter]:
    """The PERP subset of a (possibly peft-wrapped) causal LM; LoRA factors are never included."""
    chosen: dict[int, nn.Parameter] = {}
    for mod_name, module in model.named_modules():
        if "lora_" in mod_name:
            continue
        if settings.norms and is_norm(module):
            for p in module.parameters(recurse=False):
                chosen[id(p)] = p
        bias = getattr(module, "bias", None)
        if settings.biases and isinstance(bias, nn.Parameter):
            chosen[id(bias)] = bias
    if settings.lm_head:
        head = model.get_output_embeddings()
        if head is not None:
            chosen[id(head.weight)] = head.weight
    if settings.embeddings:
        emb = model.get_input_embeddings()
        chosen[id(emb.weight)] = emb.weight
    return list(chosen.values())


def mark_trainable(model: nn.Module, settings: PerpSettings) -> int:
    """Unfreeze the PERP subset; returns its parameter count."""
    params = perp_parameters(model, settings)
    for p in params:
        p.requires_grad_(True)
    return sum(p.numel() for p in params)


def prepare(model: nn.Module, settings: PerpSettings) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(False)
    mark_trainable(model, settings)
    return Prepared(train_model=model, finish=lambda: finalize(model),
                    save_adapter=lambda d: save_non_lora_trainable(model, d / PERP_FILE))


def prepare_with_lora(model: nn.Module, settings: PerpSettings, lora_settings: "lora.LoraSettings") -> Prepared:
    for p in model.parameters():
        p.requires_grad_(False)
    peft_model = lora.add_lora(model, lora_settings)
    mark_trainable(peft_model, settings)

    def save_adapter(directory: Path) -> None:
        peft_model.save_pretrained(str(directory))
        save_non_lora_trainable(peft_model, directory / PERP_FILE)

    return Prepared(train_model=peft_model, finish=lambda: merge_lora(peft_model), save_adapter=save_adapter)
