"""QLoRA: LoRA trained on a 4-bit (NF4, bitsandbytes) copy of the blocks' linear layers, then
merged into the original dense weights, so the published model is not rounded to 4 bits.
Needs CUDA; on CPU it is refused unless forced (bitsandbytes' CPU kernels are slow or missing)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from llm_prune.errors import UserError
from recovery import lora
from recovery.merge import Prepared, transfer_lora


@dataclass
class QLoraSettings:
    lora: lora.LoraSettings = field(default_factory=lora.LoraSettings)
    quant_type: str = "nf4"
    double_quant: bool = True
    force: bool = False

    @classmethod
    def from_recovery(cls, config) -> "QLoraSettings":
        return cls(lora=lora.LoraSettings.from_recovery(config), force=config.force)


def check_available(force: bool) -> None:
    """Fail fast, before any data or model work, when QLoRA cannot run here."""
    if not torch.cuda.is_available() and not force:
        raise UserError("QLoRA needs a CUDA GPU (4-bit bitsandbytes kernels) and none is visible: use "
                        "--recovery lora or perp on this machine, or set recovery.force to try it anyway",
                        param="recovery.method")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UserError("QLoRA needs bitsandbytes: pip install 'llm-prune[cuda]'",
                        param="recovery.method") from None


def compute_dtype() -> torch.dtype:
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16 if torch.cuda.is_available() else torch.float32


def quantize_linears(model: nn.Module, targets: list[str], settings: QLoraSettings) -> int:
    """Replace every targeted nn.Linear with a bitsandbytes Linear4bit holding the same weights;
    returns how many were replaced. Each keeps its own (possibly pruned) shape."""
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if not (isinstance(child, nn.Linear) and child_name in targets):
                continue
            on_gpu = child.weight.device.type == "cuda"
            device = child.weight.device if on_gpu else torch.device("cuda" if torch.cuda.is_available() else "cpu")
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype(), compress_statistics=settings.double_quant,
                                  quant_type=settings.quant_type, device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data.to("cpu"), requires_grad=False,
                                         quant_type=settings.quant_type, compress_statistics=settings.double_quant)
            if child.bias is not None:
                q.bias = nn.Parameter(child.bias.data.to("cpu"), requires_grad=False)
            setattr(parent, child_name, q.to(device))  # moving to the device quantizes
            replaced += 1
    return replaced


def prepare(model: nn.Module, settings: QLoraSettings) -> Prepared:
    from peft import prepare_model_for_kbit_training

    check_available(settings.force)
    targets = settings.lora.target_modules or lora.default_target_modules(model)
    lora.check_targets(model, targets)
    quantized = copy.deepcopy(model)  # the dense original stays untouched for the final merge
    replaced = quantize_linears(quantized, targets, settings)
    quantized = prepare_model_for_kbit_training(quantized, use_gradient_checkpointing=True)
    peft_model = lora.add_lora(quantized, settings.lora)

    def save_adapter(directory: Path) -> None:
        peft_model.save_pretrained(str(directory))

    return Prepared(train_model=peft_model, finish=lambda: transfer_lora(peft_model, model),
                    save_adapter=save_adapter, notes={"quantized_layers": replaced})
