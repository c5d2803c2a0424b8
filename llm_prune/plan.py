"""PrunePlan: which KV groups and MLP channels each decoder layer keeps, and the budget it was
solved for. Pure data: a plan can be saved, shown, diffed and re-applied; computing a plan and
applying it (surgery) are separate steps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from llm_prune.families import Family, base_model_type, family_for, head_dim


@dataclass
class LayerPlan:
    index: int  # layer index in the model the plan applies to
    keep_kv_groups: list[int]
    keep_channels: list[int]
    drop: bool = False  # remove the whole decoder layer


@dataclass
class PrunePlan:
    layers: list[LayerPlan]
    params_before: int
    params_target: int
    params_after: int  # predicted exactly from unit costs
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        layers = [LayerPlan(**lp) for lp in data["layers"]]
        return cls(layers=layers, **{k: v for k, v in data.items() if k != "layers"})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        """Read a `plan.json`; an older file holding the list of per-stage plans is composed.
        The structure is checked first (ValueError saying what is wrong), so a hand-edited file
        fails here and not halfway through surgery."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, list):
            if not data:
                raise ValueError("the list of stage plans is empty")
            for i, d in enumerate(data):
                check_plan_data(d, where=f"stage plan {i + 1}: ")
            return compose([cls.from_dict(d) for d in data])
        check_plan_data(data)
        return cls.from_dict(data)

    def widths(self) -> list[tuple[int, int] | None]:
        """(kv groups, MLP channels) kept per layer; None for a dropped layer."""
        return [None if lp.drop else (len(lp.keep_kv_groups), len(lp.keep_channels)) for lp in self.layers]


_PLAN_INTS = ("params_before", "params_target", "params_after")
_LAYER_KEYS = ("index", "keep_kv_groups", "keep_channels", "drop")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_plan_data(data, where: str = "") -> None:
    """Raise ValueError (one line, naming the field) unless `data` is a well-formed plan: the
    fields and their types, layer indices 0..n-1 each once, unit indices non-negative and
    distinct, every kept layer keeping at least one KV group and one MLP channel, and at least
    one layer kept. Whether the indices fit a given model is checked when the plan is applied."""
    if not isinstance(data, dict):
        raise ValueError(f"{where}expected a JSON object with layers and params_*, got {type(data).__name__}")
    allowed = ("layers", *_PLAN_INTS, "meta")
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ValueError(f"{where}unknown field {unknown[0]!r} (fields: {', '.join(allowed)})")
    for key in ("layers", *_PLAN_INTS):
        if key not in data:
            raise ValueError(f"{where}missing field {key!r}")
    for key in _PLAN_INTS:
        if not _is_int(data[key]) or data[key] <= 0:
            raise ValueError(f"{where}{key} must be a positive integer, got {json.dumps(data[key])[:40]}")
    if not isinstance(data.get("meta", {}), dict):
        raise ValueError(f"{where}meta must be an object")
    layers = data["layers"]
    if not isinstance(layers, list) or not layers:
        raise ValueError(f"{where}layers must be a non-empty list of per-layer entries")
    seen: set[int] = set()
    for pos, lp in enumerate(layers):
        at = f"{where}layers[{pos}]"
        if not isinstance(lp, dict):
            raise ValueError(f"{at} must be an object, got {type(lp).__name__}")
        unknown = [k for k in lp if k not in _LAYER_KEYS]
        if unknown:
            raise ValueError(f"{at}: unknown field {unknown[0]!r} (fields: {', '.join(_LAYER_KEYS)})")
        for key in _LAYER_KEYS[:3]:
            if key not in lp:
                raise ValueError(f"{at}: missing field {key!r}")
        idx = lp["index"]
        if not _is_int(idx) or not 0 <= idx < len(layers):
            raise ValueError(f"{at}.index must be a layer index from 0 to {len(layers) - 1}, "
                             f"got {json.dumps(idx)[:40]}")
        if idx in seen:
            raise ValueError(f"{at}.index {idx} appears twice")
        seen.add(idx)
        drop = lp.get("drop", False)
        if not isinstance(drop, bool):
            raise ValueError(f"{at}.drop must be true or false, got {json.dumps(drop)[:40]}")
        for key in ("keep_kv_groups", "keep_channels"):
            units = lp[key]
            if not isinstance(units, list) or not all(_is_int(u) and u >= 0 for u in units):
                raise ValueError(f"{at}.{key} must be a list of non-negative integers, got {json.dumps(units)[:40]}")
            if len(set(units)) != len(units):
                raise ValueError(f"{at}.{key} lists a unit twice")
            if not drop and not units:
                raise ValueError(f"{at}.{key} is empty: a kept layer needs at least one (or set drop: true)")
    if all(lp.get("drop", False) for lp in layers):
        raise ValueError(f"{where}every layer is dropped: a plan must keep at least one layer")


def compose(plans: list[PrunePlan]) -> PrunePlan:
    """One plan, against the original model, with the same effect on its structure as applying
    `plans` one after another (each indexes the model the previous one left)."""
    if len(plans) == 1:
        return plans[0]
    kv: dict[int, list[int]] = {}
    ch: dict[int, list[int]] = {}
    dropped: set[int] = set()
    n = len(plans[0].layers)
    for stage, plan in enumerate(plans, 1):
        survivors = [i for i in range(n) if i not in dropped]
        if len(plan.layers) != len(survivors):
            raise ValueError(f"stage plan {stage} has {len(plan.layers)} layers; the model left by the stages "
                             f"before it has {len(survivors)}")
        for lp in plan.layers:
            orig = survivors[lp.index]
            if lp.drop:
                dropped.add(orig)
                continue
            try:
                kv[orig] = [kv[orig][g] for g in lp.keep_kv_groups] if orig in kv else list(lp.keep_kv_groups)
                ch[orig] = [ch[orig][c] for c in lp.keep_channels] if orig in ch else list(lp.keep_channels)
            except IndexError:
                raise ValueError(f"stage plan {stage}, layer {lp.index}: keeps a KV group or MLP channel the "
                                 f"stages before it already removed") from None
    layers = [LayerPlan(i, kv.get(i, []), ch.get(i, []), drop=i in dropped) for i in range(n)]
    return PrunePlan(layers=layers, params_before=plans[0].params_before, params_target=plans[-1].params_target,
                     params_after=plans[-1].params_after,
                     meta={**plans[-1].meta, "stage_plans": [p.meta for p in plans]})


@dataclass
class UnitCosts:
    """Parameter cost of each prunable unit of one model, for exact budget accounting."""

    total: int
    kv_group: int  # q rows of the group's heads + k,v rows + o columns (+ their biases)
    mlp_channel: int  # gate and up rows + down column (+ biases)
    layer: list[int]  # all parameters of each decoder layer
    num_kv: list[int]
    width: list[int]
    n_rep: int
    hidden: int = 0  # hidden size (0: unknown); a stock config's head count must divide it
    fixed_heads: bool = False  # serving engines derive head_dim as hidden // heads: a stock config keeps every head


def count_params(model: nn.Module) -> int:
    """Parameters counted once each (tied embeddings count once), embeddings included."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def unit_costs(model: nn.Module, family: Family | None = None) -> UnitCosts:
    fam = family or family_for(model)
    cfg = model.config
    hidden, hd = cfg.hidden_size, head_dim(cfg)
    layers = fam.layers(model)
    q, k, v, o = fam.qkvo(layers[0])
    gate, up, down = fam.gate_up_down(layers[0])
    n_rep = q.out_features // k.out_features
    kv_cost = hd * hidden * (n_rep + 2) + n_rep * hd * hidden
    kv_cost += sum(hd * (n_rep if lin is q else 1) for lin in (q, k, v) if lin.bias is not None)
    ch_cost = 3 * hidden + sum(1 for lin in (gate, up) if lin.bias is not None)
    return UnitCosts(
        total=count_params(model), kv_group=kv_cost, mlp_channel=ch_cost,
        layer=[sum(p.numel() for p in layer.parameters()) for layer in layers],
        num_kv=[fam.qkvo(layer)[1].out_features // hd for layer in layers],
        width=[fam.gate_up_down(layer)[0].out_features for layer in layers],
        n_rep=n_rep, hidden=hidden, fixed_heads=base_model_type(cfg) in HEAD_DIM_FROM_HIDDEN,
    )


# Families whose implementations in serving engines (vLLM's and MLX's Qwen2) ignore config.head_dim
# and take hidden_size // num_attention_heads: with fewer heads their stock config would load wrongly.
HEAD_DIM_FROM_HIDDEN = ("qwen2",)
