"""PrunePlan: which KV groups and MLP channels each decoder layer keeps, and the budget it was
solved for. Pure data: a plan can be saved, shown, diffed and re-applied; computing a plan and
applying it (surgery) are separate steps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from torch import nn

from llm_prune.families import Family, family_for, head_dim


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
        """Read a `plan.json`; an older file holding the list of per-stage plans is composed."""
        data = json.loads(Path(path).read_text())
        if isinstance(data, list):
            return compose([cls.from_dict(d) for d in data])
        return cls.from_dict(data)

    def widths(self) -> list[tuple[int, int] | None]:
        """(kv groups, MLP channels) kept per layer; None for a dropped layer."""
        return [None if lp.drop else (len(lp.keep_kv_groups), len(lp.keep_channels)) for lp in self.layers]


def compose(plans: list[PrunePlan]) -> PrunePlan:
    """One plan, against the original model, with the same effect on its structure as applying
    `plans` one after another (each indexes the model the previous one left)."""
    if len(plans) == 1:
        return plans[0]
    kv: dict[int, list[int]] = {}
    ch: dict[int, list[int]] = {}
    dropped: set[int] = set()
    n = len(plans[0].layers)
    for plan in plans:
        survivors = [i for i in range(n) if i not in dropped]
        for lp in plan.layers:
            orig = survivors[lp.index]
            if lp.drop:
                dropped.add(orig)
                continue
            kv[orig] = [kv[orig][g] for g in lp.keep_kv_groups] if orig in kv else list(lp.keep_kv_groups)
            ch[orig] = [ch[orig][c] for c in lp.keep_channels] if orig in ch else list(lp.keep_channels)
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
        n_rep=n_rep,
    )
