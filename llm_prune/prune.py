"""Prune a loaded model to a parameter budget: score, allocate, cut; optionally in stages.

With `stages` T > 1 (Adapt-Pruner's incremental schedule) the model is pruned in T steps towards
the final target, rescored each time; `between_stages(model, stage)` lets recovery training run
between steps.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from llm_prune.allocation import AllocationConfig, allocate, allocate_portable
from llm_prune.calibration import calibration_ids
from llm_prune.errors import UserError
from llm_prune.families import family_for
from llm_prune.importance import ImportanceScorer
from llm_prune.plan import PrunePlan, count_params, unit_costs
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.recipe import Budget, PruningConfig
from llm_prune.surgery import apply_plan


@dataclass
class PruneResult:
    model: nn.Module  # the pruned model (a new object if recovery ran between stages)
    plans: list[PrunePlan]
    params_before: int
    params_after: int
    params_target: int
    timings: dict[str, float] = field(default_factory=dict)


def target_params(total: int, budget: Budget) -> int:
    if budget.ratio is not None:
        return int(round(total * (1.0 - budget.ratio)))
    if budget.target_params >= total:
        raise UserError(f"target_params {budget.target_params:,} is not below the model's {total:,} parameters",
                        param="budget.target_params")
    return int(budget.target_params)


def allocation_config(cfg: PruningConfig) -> AllocationConfig:
    return AllocationConfig(allocation=cfg.allocation, round_to=cfg.round_to, skip_first=cfg.skip_first,
                            skip_last=cfg.skip_last, adaptive_strength=cfg.adaptive_strength,
                            prune_attention=cfg.prune_attention, prune_mlp=cfg.prune_mlp)


def prune_model(model: nn.Module, tokenizer, budget: Budget, cfg: PruningConfig,
                on_event: ProgressCallback = null_callback,
                between_stages: Callable[[nn.Module, int], nn.Module | None] | None = None) -> PruneResult:
    family_for(model)  # unsupported families fail before any work
    total = count_params(model)
    final_target = target_params(total, budget)
    if not (cfg.prune_attention or cfg.prune_mlp or cfg.prune_layers):
        raise UserError("nothing to prune: enable attention, MLP or layer pruning", param="pruning")
    timings = {"calibration_s": 0.0, "score_s": 0.0, "allocate_s": 0.0, "surgery_s": 0.0}
    t0 = time.perf_counter()
    ids = calibration_ids(tokenizer, cfg.calibration, cfg.calibration_samples, cfg.calibration_seq_len, cfg.seed)
    timings["calibration_s"] = time.perf_counter() - t0
    scorer = ImportanceScorer(cfg.importance, cfg.aggregation, cfg.seed)
    plans = []
    for stage in range(1, cfg.stages + 1):
        on_event(ProgressEvent("prune", stage - 1, cfg.stages, f"stage {stage}/{cfg.stages}", kind="stage_start"))
        stage_target = int(round(total - (total - final_target) * stage / cfg.stages))
        t = time.perf_counter()
        scores = scorer.score(model, ids, on_event=on_event)
        timings["score_s"] += time.perf_counter() - t
        t = time.perf_counter()
        alloc = allocation_config(cfg)
        # Depth pruning happens once, in the first stage.
        alloc.prune_layers = cfg.prune_layers if stage == 1 else 0
        allocator = allocate_portable if cfg.portable else allocate  # portable: equal widths, stock config
        plan = allocator(scores, unit_costs(model), stage_target, alloc,
                        meta={"stage": stage, "stages": cfg.stages, "importance": cfg.importance,
                              "aggregation": cfg.aggregation, "calibration_loss": scores.loss},
                        strict=stage == cfg.stages)
        timings["allocate_s"] += time.perf_counter() - t
        t = time.perf_counter()
        apply_plan(model, plan)
        timings["surgery_s"] += time.perf_counter() - t
        plans.append(plan)
        on_event(ProgressEvent("prune", stage, cfg.stages, f"stage {stage}/{cfg.stages} done",
                               {"params": count_params(model), "target": stage_target}, kind="progress"))
        if between_stages is not None and stage < cfg.stages:
            model = between_stages(model, stage) or model
    on_event(ProgressEvent("prune", cfg.stages, cfg.stages, "pruned", kind="stage_end"))
    return PruneResult(model=model, plans=plans, params_before=total, params_after=count_params(model),
                       params_target=final_target, timings=timings)
