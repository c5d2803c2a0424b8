"""Turning a trained model back into the published one: LoRA merged into plain dense Linears
(structured pruning leaves dense matrices, so an ordinary merge is exact), trainable tensors
saved by name for checkpoints and for the optional kept adapter."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

TRAINABLE_FILE = "trainable.safetensors"
PERP_FILE = "perp_params.safetensors"


@dataclass
class Prepared:
    """A model set up for one recovery method.

    `train_model` is what the Trainer optimises; `finish()` returns the plain dense model to publish;
    `save_adapter(dir)` writes what was learned on top of the base (only when the user keeps it;
    None for methods whose result is the whole model)."""

    train_model: nn.Module
    finish: Callable[[], nn.Module]
    save_adapter: Callable[[Path], None] | None
    notes: dict = field(default_factory=dict)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors being trained, by their name in `model` (tied weights appear once)."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def save_trainable(model: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(model), str(path), metadata={"format": "pt"})


def load_trainable(model: nn.Module, path: Path) -> None:
    """Load a `save_trainable` file back; every trained tensor must be present, nothing extra."""
    from safetensors.torch import load_file

    state = load_file(str(path))
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, extra = expected - set(state), set(state) - expected
    if missing or extra:
        raise ValueError(f"checkpoint {path} does not match the model being trained "
                         f"({len(missing)} tensors missing, {len(extra)} unexpected); "
                         f"was it written for another method or model?")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


def base_name(peft_name: str) -> str:
    """Parameter name in the plain model for a name inside a peft-wrapped model."""
    name = peft_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def save_non_lora_trainable(model: nn.Module, path: Path) -> None:
    """Trained tensors that are not LoRA factors (PERP's norms/biases/head), named as in the base
    model, so they can be loaded into it with `load_state_dict(strict=False)`."""
    from safetensors.torch import save_file

    state = {base_name(n): t for n, t in trainable_state(model).items() if "lora_" not in n}
    if state:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(path), metadata={"format": "pt"})


def merge_lora(peft_model) -> nn.Module:
    """Fold the LoRA factors into the base weights and drop the peft wrappers."""
    merged = peft_model.merge_and_unload(progressbar=False, safe_merge=True)
    return finalize(merged)


def finalize(model: nn.Module) -> nn.Module:
    """Published models are frozen and in eval mode; no peft module may remain."""
    leftovers = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if leftovers:
        raise RuntimeError(f"merge left adapter modules in the model: {leftovers[:3]}")
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def transfer_lora(trained_peft, dense_model: nn.Module) -> nn.Module:
    """Merge LoRA factors trained on one copy of a model (e.g. its 4-bit quantization) into the
    dense weights of another copy, so the published weights are not rounded to 4 bits."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = trained_peft.peft_config["default"]
    state = get_peft_model_state_dict(trained_peft)
    for p in dense_model.parameters():
        p.requires_grad_(False)
    dense_peft = get_peft_model(dense_model, config)
    result = set_peft_model_state_dict(dense_peft, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RuntimeError(f"LoRA transfer left {len(missing)} factors unset, e.g. {missing[0]}")
    return merge_lora(dense_peft)
