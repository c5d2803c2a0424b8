"""Budget allocation: turn importance scores and a parameter budget into a PrunePlan.

`uniform` (LLM-Pruner) prunes every prunable layer at the same ratio; `adaptive` (Adapt-Pruner) is
one step of the incremental update s_l <- clip(s_l + ds - A * I_l, 0, max), where s_l is the layer's
sparsity so far (`prior`, relative to the `reference` widths) and I_l its importance (-cos(x_in,
x_out) over calibration tokens) as (I - mean) / max|I - mean|; prune.py repeats such steps on the
shrinking model. Either way the step ds is solved by bisection so the plan lands on the parameter
target, then MLP widths (the fine-grained knob) absorb the rounding residual. Heads are whole; MLP
widths are multiples of `round_to`; a layer never grows back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from llm_prune.errors import UserError
from llm_prune.importance import Scores
from llm_prune.plan import LayerPlan, PrunePlan, UnitCosts
from llm_prune.recipe import PRUNING_DEFAULTS as _DEFAULT
from llm_prune.recipe import leading_layers_kept


@dataclass
class AllocationConfig:
    allocation: str = _DEFAULT["allocation"]
    round_to: int = _DEFAULT["round_to"]
    skip_first: int | None = _DEFAULT["skip_first"]  # None: the first 10% of layers, at least one
    skip_last: int = _DEFAULT["skip_last"]
    adaptive_strength: float = _DEFAULT["adaptive_strength"]
    prune_attention: bool = _DEFAULT["prune_attention"]
    prune_mlp: bool = _DEFAULT["prune_mlp"]
    prune_layers: int = 0  # a count: prune_model resolves the recipe's unset value to one
    max_layer_sparsity: float = 0.95


def _round_width(width: int, keep_frac: float, multiple: int) -> int:
    keep = round(width * keep_frac / multiple) * multiple
    return int(min(width, max(multiple if width >= multiple else width, keep)))


def normalised_importance(layer_cos: torch.Tensor) -> torch.Tensor:
    """Adapt-Pruner's I_hat = (I - mean) / max|I - mean| with I = -cos(x_in, x_out)."""
    dev = -layer_cos.double() + layer_cos.double().mean()
    peak = dev.abs().max().item()
    return torch.zeros_like(dev) if peak < 1e-12 else dev / peak


def layer_sparsities(scores: Scores, layers: list[int], cfg: AllocationConfig, base: float,
                     prior: dict[int, float] | None = None) -> dict[int, float]:
    prior = prior or {}
    if cfg.allocation == "uniform":
        return {i: max(0.0, prior.get(i, 0.0) + base) for i in layers}
    norm = normalised_importance(scores.layer_cos[layers])
    return {i: float(min(cfg.max_layer_sparsity, max(0.0, prior.get(i, 0.0) + base - cfg.adaptive_strength * n)))
            for i, n in zip(layers, norm.tolist())}


def _widths_for(costs: UnitCosts, sparsity: dict[int, float], cfg: AllocationConfig, reference: UnitCosts):
    kv = {}
    ch = {}
    for i, s in sparsity.items():
        # Heads are whole and coarse (3 KV groups in SmolLM2): a group goes only when the ratio covers
        # all of it; the MLP, in steps of `round_to` channels, absorbs the rest of the budget.
        kv[i] = max(1, math.ceil(reference.num_kv[i] * (1 - s) - 1e-9)) if cfg.prune_attention else costs.num_kv[i]
        ch[i] = _round_width(reference.width[i], 1 - s, cfg.round_to) if cfg.prune_mlp else costs.width[i]
        kv[i], ch[i] = min(kv[i], costs.num_kv[i]), min(ch[i], costs.width[i])
    return kv, ch


def _removed(costs: UnitCosts, kv: dict[int, int], ch: dict[int, int]) -> int:
    return sum((costs.num_kv[i] - kv[i]) * costs.kv_group + (costs.width[i] - ch[i]) * costs.mlp_channel
               for i in kv)


def _drop_layers(scores: Scores, costs: UnitCosts, target_params: int, cfg: AllocationConfig,
                 protect: bool = True) -> tuple[set[int], int]:
    """Depth first: the layers that change the hidden state least go whole. Returns the dropped
    layers and the parameters still to remove from the widths."""
    to_remove = costs.total - target_params
    if to_remove < 0:
        raise UserError(f"target of {target_params:,} parameters is above the model's {costs.total:,}",
                        param="budget")
    dropped: set[int] = set()
    if cfg.prune_layers:
        n_layers = len(costs.layer)
        if cfg.prune_layers >= n_layers:
            raise UserError(f"cannot drop {cfg.prune_layers} of {n_layers} layers", param="pruning.prune_layers")
        # Only layers the allocation may cut are candidates: uniform allocation's protected first and
        # last layers (--skip-first/--skip-last) stay whole (adaptive and portable protect none).
        candidates = set(prunable_layers(n_layers, cfg)) if protect else set(range(n_layers))
        if cfg.prune_layers > len(candidates):
            raise UserError(f"cannot drop {cfg.prune_layers} layers: {len(candidates)} are not protected by "
                            "skip_first/skip_last", param="pruning.prune_layers")
        order = [i for i in torch.argsort(scores.block_influence).tolist() if i in candidates]
        dropped = set(order[:cfg.prune_layers])
        to_remove -= sum(costs.layer[i] for i in dropped)
    return dropped, to_remove


def auto_layer_drops(costs: UnitCosts, target_params: int, layers: list[int], share: float, above: float) -> int:
    """How many whole layers go when the recipe leaves it open. None while cutting the widths of
    `layers` (those the allocation may cut) alone would remove at most `above` of their
    parameters; past that, as many as make up `share` of the parameters to remove, to the nearest
    layer, never so many that the widths would have to grow back. Which layers go is decided later,
    by block influence. On SmolLM2-135M dropping layers cost perplexity at 20% on three seeds and
    gained 11% at 35% and 17-23% at 50% (bench/README.md)."""
    to_remove = costs.total - target_params
    if not layers or to_remove <= 0:
        return 0
    held = sum(costs.layer[i] for i in layers)
    if to_remove <= above * held:
        return 0
    mean = held / len(layers)
    n = math.floor(share * to_remove / mean + 0.5)
    return max(0, min(n, len(layers) - 1, math.floor(to_remove / mean)))


def prunable_layers(n_layers: int, cfg: AllocationConfig) -> list[int]:
    """The layers whose widths the allocation may cut. Uniform allocation leaves the first and last
    layers whole; adaptive allocation decides that itself, from layer importance."""
    if cfg.allocation != "uniform":
        return list(range(n_layers))
    # Pruning the first layers costs far more than their share of parameters.
    return list(range(leading_layers_kept(n_layers, cfg.skip_first), n_layers - cfg.skip_last))


def allocate(scores: Scores, costs: UnitCosts, target_params: int, cfg: AllocationConfig,
             meta: dict | None = None, strict: bool = True, prior: dict[int, float] | None = None,
             reference: UnitCosts | None = None) -> PrunePlan:
    """`strict=False` (intermediate stages) accepts a plan that overshoots the target. `prior` (per
    layer sparsity so far) and `reference` (the widths it refers to) make this one incremental step."""
    reference = reference or costs
    n_layers = len(costs.layer)
    dropped, to_remove = _drop_layers(scores, costs, target_params, cfg)

    prunable = [i for i in prunable_layers(n_layers, cfg) if i not in dropped]
    if (cfg.prune_attention or cfg.prune_mlp) and not prunable and to_remove > 0:
        raise UserError("no prunable layers left: lower skip_first/skip_last", param="pruning")

    # Bisection on the base ratio: removed(s) is monotone in s (negative when a step must spare
    # layers that the importance term alone would cut).
    lo, hi = (-1.0 if prior else 0.0), 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        kv, ch = _widths_for(costs, layer_sparsities(scores, prunable, cfg, mid, prior), cfg, reference)
        if _removed(costs, kv, ch) <= to_remove:
            lo = mid
        else:
            hi = mid
    base = lo
    sparsity = layer_sparsities(scores, prunable, cfg, base, prior)
    kv, ch = _widths_for(costs, sparsity, cfg, reference)

    # Rounding residual: move MLP widths by `round_to` steps, most-pruned-allowed layers first.
    residual = to_remove - _removed(costs, kv, ch)
    step = cfg.round_to * costs.mlp_channel
    if cfg.prune_mlp and prunable:
        order = sorted(prunable, key=lambda i: -sparsity[i])
        guard = 0
        while abs(residual) > step / 2 and guard < 100 * len(order):
            moved = False
            for i in order:
                if abs(residual) <= step / 2:
                    break
                if residual > 0 and ch[i] - cfg.round_to >= cfg.round_to:
                    ch[i] -= cfg.round_to
                    residual -= step
                    moved = True
                elif residual < 0 and ch[i] + cfg.round_to <= costs.width[i]:
                    ch[i] += cfg.round_to
                    residual += step
                    moved = True
            guard += 1
            if not moved:
                break

    layers = []
    for i in range(n_layers):
        if i in dropped:
            layers.append(LayerPlan(i, [], [], drop=True))
            continue
        n_kv = kv.get(i, costs.num_kv[i])
        n_ch = ch.get(i, costs.width[i])
        keep_kv = torch.topk(scores.kv[i], n_kv).indices.sort().values.tolist()
        keep_ch = torch.topk(scores.mlp[i], n_ch).indices.sort().values.tolist()
        layers.append(LayerPlan(i, keep_kv, keep_ch))

    after = costs.total - sum(costs.layer[i] for i in dropped) - _removed(costs, kv, ch)
    if strict and abs(after - target_params) > 0.005 * target_params:
        if after > target_params:
            widths = sorted({costs.width[i] for i in prunable})
            if cfg.prune_mlp and widths and widths[0] < 2 * cfg.round_to:  # hardly a channel can go
                narrowest = min(prunable, key=lambda i: costs.width[i])
                of = (f"already cut to {widths[0]:,} channels (of {reference.width[narrowest]:,})"
                      if reference.width[narrowest] > widths[0] else f"of {widths[0]:,} channels")
                why = f"MLP widths move in steps of --round-to {cfg.round_to}, too coarse for layers {of}: lower --round-to"
            else:
                hint = " or lower skip_first/skip_last" if cfg.allocation == "uniform" else ""
                why = f"the prunable layers hold too little: prune less{hint}"
        elif to_remove < 0:
            why = f"dropping {len(dropped)} whole layers alone removes more: drop fewer (--prune-layers)"
        else:  # the widths move in whole KV groups and round_to channels, and never grow back
            knobs = ["--round-to"] + (["--adaptive-step"] if cfg.allocation == "adaptive" else []) + (
                ["--prune-layers"] if dropped else [])
            why = f"the cut overshoots it in whole KV groups and MLP steps: lower {' or '.join(knobs)}" + (
                " (or use --allocation uniform, whose one step lands on it)" if cfg.allocation == "adaptive" else "")
        raise UserError(f"cannot reach {target_params:,} parameters within 0.5% (best: {after:,}); {why}",
                        param="budget")
    info = {"allocation": cfg.allocation, "base_sparsity": base, "round_to": cfg.round_to,
            "layer_sparsity": {str(i): round(s, 4) for i, s in sparsity.items()}, **(meta or {})}
    return PrunePlan(layers=layers, params_before=costs.total, params_target=target_params,
                     params_after=after, meta=info)


def allocate_portable(scores: Scores, costs: UnitCosts, target_params: int, cfg: AllocationConfig,
                      meta: dict | None = None, strict: bool = True) -> PrunePlan:
    """The portable layout: every kept layer gets the same number of KV groups and MLP channels, so
    the checkpoint's config.json is stock. Each layer keeps its own most important units; only the
    counts are shared. KV groups follow the same whole-group rule as `allocate`; the MLP width (in
    steps of `round_to` channels in every layer at once) lands the budget."""
    n_layers = len(costs.layer)
    if len(set(costs.num_kv)) > 1 or len(set(costs.width)) > 1:
        raise UserError("portable: the model's layers already differ in width; prune the dense model instead",
                        param="pruning.portable")
    dropped, to_remove = _drop_layers(scores, costs, target_params, cfg, protect=False)
    kept = [i for i in range(n_layers) if i not in dropped]
    n_kv, width = costs.num_kv[0], costs.width[0]
    per_layer = max(0, to_remove) / len(kept)
    kv = n_kv
    if cfg.prune_attention:
        unit_params = (n_kv * costs.kv_group + width * costs.mlp_channel) if cfg.prune_mlp else n_kv * costs.kv_group
        s = min(1.0, per_layer / unit_params)
        # A stock config needs the hidden size to be a multiple of the head count (transformers
        # refuses it otherwise, even with head_dim given): only such KV-group counts are candidates.
        strict_heads = costs.hidden and costs.hidden % (n_kv * costs.n_rep) == 0  # else the family does not ask it
        valid = [k for k in range(1, n_kv + 1) if not strict_heads or costs.hidden % (k * costs.n_rep) == 0]
        if costs.fixed_heads:  # engines would read another head_dim from the stock config: the MLP takes the cut
            valid = [n_kv]
        if cfg.prune_mlp:  # the fewest groups the ratio allows; the MLP absorbs the rest
            kv = min(k for k in valid if k >= max(1, math.ceil(n_kv * (1 - s) - 1e-9)))
        else:
            kv = min(valid, key=lambda k: abs((n_kv - k) * costs.kv_group - per_layer))
    ch = width
    if cfg.prune_mlp:
        drop_ch = (per_layer - (n_kv - kv) * costs.kv_group) / costs.mlp_channel
        ch = width - round(drop_ch / cfg.round_to) * cfg.round_to
        ch = int(min(width, max(min(cfg.round_to, width), ch)))
    removed = len(kept) * ((n_kv - kv) * costs.kv_group + (width - ch) * costs.mlp_channel)
    after = costs.total - sum(costs.layer[i] for i in dropped) - removed
    if strict and abs(after - target_params) > 0.005 * target_params:
        raise UserError(f"portable layout cannot reach {target_params:,} parameters within 0.5% (best: {after:,}): "
                        f"all {len(kept)} layers move together in steps of {cfg.round_to} MLP channels; "
                        f"lower --round-to", param="budget")
    layers = []
    for i in range(n_layers):
        if i in dropped:
            layers.append(LayerPlan(i, [], [], drop=True))
            continue
        keep_kv = torch.topk(scores.kv[i], kv).indices.sort().values.tolist()
        keep_ch = torch.topk(scores.mlp[i], ch).indices.sort().values.tolist()
        layers.append(LayerPlan(i, keep_kv, keep_ch))
    info = {"allocation": "portable", "kv_groups": kv, "mlp_channels": ch, "round_to": cfg.round_to, **(meta or {})}
    return PrunePlan(layers=layers, params_before=costs.total, params_target=target_params,
                     params_after=after, meta=info)
