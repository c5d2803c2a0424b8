"""Full fine-tuning: every parameter trains. Meant for small models; the optimizer state costs
about twice the weights again, so larger models should use LoRA or PERP."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from recovery.merge import Prepared, finalize


@dataclass
class FullSettings:
    # Above this size the CLI warns that LoRA/PERP is the cheaper choice.
    warn_above_params: int = 1_000_000_000


def prepare(model: nn.Module, settings: FullSettings) -> Prepared:
    for p in model.parameters():
        p.requires_grad_(True)
    n = sum(p.numel() for p in model.parameters())
    notes = {}
    if n > settings.warn_above_params:
        notes["warning"] = (f"full fine-tuning of {n / 1e9:.1f}B parameters needs ~4x their memory for "
                            f"optimizer state; LoRA or PERP is much cheaper")
    # The whole model is the result: there is no separate adapter to keep.
    return Prepared(train_model=model, finish=lambda: finalize(model), save_adapter=None, notes=notes)
