"""Surgery: apply a PrunePlan by replacing projections with physically smaller nn.Linear modules.

Whole KV groups go with their query heads (GQA keeps its query-per-KV ratio, so the attention
module's `num_key_value_groups` is unchanged and its forward reshapes with -1). Dropped layers are
removed from the ModuleList and the remaining ones renumbered for the KV cache. The per-layer
widths are recorded in `config.llm_prune` so export can write a loadable config.
"""

from __future__ import annotations

import torch
from torch import nn

from llm_prune.families import family_for, head_dim, layer_shapes
from llm_prune.plan import PrunePlan


def _slice_linear(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    # skip_init: no random initialisation of weights that are overwritten next.
    new = nn.utils.skip_init(nn.Linear, w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device,
                             dtype=w.dtype)
    new.weight.data.copy_(w)
    if lin.bias is not None:
        b = lin.bias.data if rows is None else lin.bias.data.index_select(0, rows.to(w.device))
        new.bias.data.copy_(b)
    new.weight.requires_grad_(lin.weight.requires_grad)
    return new


def head_rows(groups: list[int], per_group: int, hd: int) -> torch.Tensor:
    """Row indices of the heads belonging to the kept KV groups (each group = per_group heads); also
    the o_proj input columns of those heads."""
    return torch.tensor([g * per_group * hd + j for g in groups for j in range(per_group * hd)], dtype=torch.long)


@torch.no_grad()
def cut_attention(model: nn.Module, layer: nn.Module, keep_kv_groups: list[int]) -> None:
    """Keep only these KV groups of one layer, with their query heads and o_proj columns."""
    fam = family_for(model)
    hd = head_dim(model.config)
    attn = fam.attention(layer)
    q, k, v, o = fam.qkvo(layer)
    if len(keep_kv_groups) == k.out_features // hd:
        return
    n_rep = q.out_features // k.out_features
    q_rows = head_rows(keep_kv_groups, n_rep, hd)
    kv_rows = head_rows(keep_kv_groups, 1, hd)
    setattr(attn, fam.q, _slice_linear(q, rows=q_rows))
    setattr(attn, fam.k, _slice_linear(k, rows=kv_rows))
    setattr(attn, fam.v, _slice_linear(v, rows=kv_rows))
    setattr(attn, fam.o, _slice_linear(o, cols=q_rows))


@torch.no_grad()
def cut_mlp(model: nn.Module, layer: nn.Module, keep_channels: list[int]) -> None:
    """Keep only these MLP channels of one layer (gate/up rows, down_proj columns)."""
    fam = family_for(model)
    mlp = fam.mlp_block(layer)
    gate, up, down = fam.gate_up_down(layer)
    if len(keep_channels) == gate.out_features:
        return
    ch = torch.tensor(keep_channels, dtype=torch.long)
    setattr(mlp, fam.gate, _slice_linear(gate, rows=ch))
    setattr(mlp, fam.up, _slice_linear(up, rows=ch))
    setattr(mlp, fam.down, _slice_linear(down, cols=ch))
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep_channels)


@torch.no_grad()
def apply_plan(model: nn.Module, plan: PrunePlan) -> nn.Module:
    fam = family_for(model)
    layers = fam.layers(model)
    if len(plan.layers) != len(layers):
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {len(layers)}")
    for lp in plan.layers:
        if lp.drop:
            continue
        cut_attention(model, layers[lp.index], lp.keep_kv_groups)
        cut_mlp(model, layers[lp.index], lp.keep_channels)

    dropped = {lp.index for lp in plan.layers if lp.drop}
    if dropped:
        kept = [layer for i, layer in enumerate(layers) if i not in dropped]
        layer_types = getattr(model.config, "layer_types", None)
        for new_idx, layer in enumerate(kept):
            attn = fam.attention(layer)
            attn.layer_idx = new_idx  # the KV cache is indexed by position in the stack
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = new_idx
        fam.set_layers(model, kept)
        model.config.num_hidden_layers = len(kept)
        if layer_types:
            model.config.layer_types = [t for i, t in enumerate(layer_types) if i not in dropped]
    record_shapes(model)
    return model


def record_shapes(model: nn.Module) -> None:
    """Store per-layer widths on the config (the modules are the source of truth)."""
    shapes = layer_shapes(model)
    meta = dict(getattr(model.config, "llm_prune", None) or {})
    meta["layer_shapes"] = [s.as_dict() for s in shapes]
    model.config.llm_prune = meta
