"""Prune a loaded model to a parameter budget: score, allocate, cut; optionally in stages.

Uniform allocation cuts in one step. Adaptive allocation is Adapt-Pruner's incremental schedule:
many small steps (about `adaptive_step` of the units each), layer importance re-measured on the
partly pruned model every step and units rescored every `rescore_every` steps, the last step landing
on the budget. After the cut, output reconstruction (reconstruct.py) refits the layers towards the
model as it was before the cut. With `stages` T > 1 (Adapt-Accel) all of this happens T times towards
intermediate targets; `between_stages(model, stage)` lets recovery training run between stages.
Calibration is a token budget scored in micro-batches, so memory does not grow with it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn

from llm_prune.allocation import AllocationConfig, allocate, allocate_portable, auto_layer_drops, prunable_layers
from llm_prune.calibration import calibration_ids
from llm_prune.errors import UserError
from llm_prune.families import family_for
from llm_prune.importance import ImportanceScorer, Scores, layer_cosines
from llm_prune.plan import LayerPlan, PrunePlan, UnitCosts, compose, count_params, unit_costs
from llm_prune.precision import calibration_autocast, matmul_dtype_name, resolve
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.reconstruct import LayerTargets, LiveTargets, check_projections, reconstruct
from llm_prune.recipe import Budget, PruningConfig
from llm_prune.surgery import apply_plan, record_shapes


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


def check_finite(model: nn.Module) -> None:
    """A NaN or an infinity in any weight makes every score and refit NaN: the solver then fails with
    an internal assertion that reads like a bug in torch, after minutes of passes."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and p.device.type != "meta" and not torch.isfinite(p).all():
            bad = int((~torch.isfinite(p)).sum())
            raise UserError(f"the model's weights are not finite: {name} holds {bad} NaN or infinite value"
                            f"{'s' if bad > 1 else ''}; prune a model whose weights are numbers", param="model")


def prune_model(model: nn.Module, tokenizer, budget: Budget, cfg: PruningConfig,
                on_event: ProgressCallback = null_callback,
                between_stages: Callable[[nn.Module, int], nn.Module | None] | None = None) -> PruneResult:
    family_for(model)  # unsupported families fail before any work
    cfg.check_fits(model.config)
    check_finite(model)
    if cfg.reconstruct:
        check_projections(model)
    total = count_params(model)
    final_target = target_params(total, budget)
    cfg = resolve_layer_drops(model, final_target, cfg)
    if not (cfg.prune_attention or cfg.prune_mlp or cfg.prune_layers):
        raise UserError("nothing to prune: enable attention, MLP or layer pruning", param="pruning")
    timings = {"calibration_s": 0.0, "score_s": 0.0, "allocate_s": 0.0, "surgery_s": 0.0, "reconstruct_s": 0.0}
    t0 = time.perf_counter()
    ids = calibration_ids(tokenizer, cfg.calibration, cfg.calibration_windows, cfg.calibration_seq_len, cfg.seed)
    timings["calibration_s"] = time.perf_counter() - t0
    timings["calibration_tokens"] = ids.numel()
    rec_ids = None
    if cfg.reconstruct:  # the regression needs more tokens than scoring; they cost forward passes only
        rec_ids = calibration_ids(tokenizer, cfg.calibration, cfg.reconstruct_windows, cfg.calibration_seq_len,
                                  cfg.seed, at_least=cfg.calibration_windows)
        timings["reconstruct_tokens"] = rec_ids.numel()
    scorer = ImportanceScorer(cfg.importance, cfg.aggregation, cfg.seed)
    plans = []
    for stage in range(1, cfg.stages + 1):
        on_event(ProgressEvent("prune", stage - 1, cfg.stages, f"stage {stage}/{cfg.stages}", kind="stage_start"))
        stage_target = int(round(total - (total - final_target) * stage / cfg.stages))
        t = time.perf_counter()
        # Forward passes only, no activations kept: 2,048-token batches keep the CPU's matmuls large.
        rec_batch = max(1, 2048 // cfg.calibration_seq_len)
        # One cut and no layer drops: every layer reaches reconstruction uncut, so its targets are
        # computed in the same sweep; Adapt-Pruner's steps cut before it, so they are recorded first.
        n_steps = incremental_steps(unit_costs(model), count_params(model), stage_target, cfg)
        live = n_steps == 1 and not (stage == 1 and cfg.prune_layers)
        with calibration_autocast(model, cfg.calibration_precision):
            targets = (LiveTargets if live else LayerTargets)(
                model, rec_ids, rec_batch, resolve(model, cfg.calibration_precision)) if cfg.reconstruct else None
        timings["reconstruct_s"] += time.perf_counter() - t
        try:
            plan = _prune_stage(model, ids, scorer, stage, stage_target, n_steps, cfg, timings, on_event, targets)
        finally:
            if targets is not None:
                targets.close()
        plans.append(plan)
        on_event(ProgressEvent("prune", stage, cfg.stages, f"stage {stage}/{cfg.stages} done",
                               {"params": count_params(model), "target": stage_target}, kind="progress"))
        if between_stages is not None and stage < cfg.stages:
            model = between_stages(model, stage) or model
    on_event(ProgressEvent("prune", cfg.stages, cfg.stages, "pruned", kind="stage_end"))
    return PruneResult(model=model, plans=plans, params_before=total, params_after=count_params(model),
                       params_target=final_target, timings=timings)


def resolve_layer_drops(model: nn.Module, target: int, cfg: PruningConfig) -> PruningConfig:
    """The recipe with `prune_layers` a count. Left unset, whole layers go only in a one-step cut
    (uniform or portable, one stage), as `auto_layer_drops` decides from depth_above/depth_share:
    Adapt-Pruner's steps and staged pruning cut a share of the budget at a time and set their own
    per-layer sparsities."""
    if cfg.prune_layers is not None:
        return cfg
    costs = unit_costs(model)
    n = 0
    if cfg.stages == 1 and incremental_steps(costs, count_params(model), target, cfg) == 1 and \
            (cfg.prune_attention or cfg.prune_mlp):
        n_layers = len(costs.layer)
        layers = list(range(n_layers)) if cfg.portable else prunable_layers(n_layers, allocation_config(cfg))
        n = auto_layer_drops(costs, target, layers, cfg.depth_share, cfg.depth_above)
    return cfg.model_copy(update={"prune_layers": n})


def incremental_steps(reference: UnitCosts, params_now: int, target: int, cfg: PruningConfig) -> int:
    """Adapt-Pruner's number of steps: each removes about `adaptive_step` of the prunable units."""
    if cfg.allocation != "adaptive" or cfg.portable:
        return 1
    fraction = (params_now - target) / max(1, sum(reference.layer))
    return max(1, math.ceil(fraction / cfg.adaptive_step - 1e-9))


def _prune_stage(model: nn.Module, ids, scorer: ImportanceScorer, stage: int, stage_target: int, n_steps: int,
                 cfg: PruningConfig, timings: dict, on_event: ProgressCallback,
                 targets: LayerTargets | LiveTargets | None = None) -> PrunePlan:
    """Cut the model to `stage_target` in `n_steps` steps (`incremental_steps`: one for uniform,
    Adapt-Pruner's incremental steps for adaptive), each re-measuring layer importance on the
    current model, then reconstruct towards `targets`; returns the stage's composed plan. With
    reconstruction on, the last step's cut is made by reconstruction (each layer's uncut outputs on
    the pruned inputs are part of its target); with `obs` importance that step only fixes the
    widths and reconstruction chooses the units."""
    stage_reference = reference = unit_costs(model)
    deferred = targets is not None
    prior: dict[int, float] = {}
    scores, step_plans = None, []
    for step in range(1, n_steps + 1):
        now = count_params(model)  # the remaining cut is spread over the remaining steps
        step_target = min(now, int(round(now - (now - stage_target) / (n_steps - step + 1))))
        t = time.perf_counter()
        if not cfg.needs_scores:  # reconstruction chooses the units; the budget sets the widths
            scores = Scores.unranked(unit_costs(model))
        elif scores is None or (step - 1) % cfg.rescore_every == 0:
            # Uniform allocation never cuts its skipped layers: they need no gradients.
            n_layers = len(family_for(model).layers(model))
            only = None if cfg.portable else set(prunable_layers(n_layers, allocation_config(cfg)))
            with calibration_autocast(model, cfg.calibration_precision):
                scores = scorer.score(model, ids, batch_size=cfg.micro_batch, on_event=on_event, only=only)
        else:
            with calibration_autocast(model, cfg.calibration_precision):
                scores.layer_cos = layer_cosines(model, ids[:cfg.micro_batch], cfg.micro_batch)
        timings["score_s"] += time.perf_counter() - t
        t = time.perf_counter()
        alloc = allocation_config(cfg)
        # Depth pruning happens once, in the first step of the first stage.
        alloc.prune_layers = cfg.prune_layers if stage == 1 and step == 1 else 0
        meta = {"stage": stage, "stages": cfg.stages, "importance": cfg.importance,
                "aggregation": cfg.aggregation, "calibration_loss": scores.loss, "step": step, "steps": n_steps,
                "calibration_matmuls": matmul_dtype_name(model, cfg.calibration_precision)}
        strict = stage == cfg.stages and step == n_steps
        costs = unit_costs(model)
        if cfg.portable:  # equal widths everywhere, stock config: one step, no per-layer schedule
            plan = allocate_portable(scores, costs, step_target, alloc, meta=meta, strict=strict)
        else:
            plan = allocate(scores, costs, step_target, alloc, meta=meta, strict=strict, prior=prior,
                            reference=reference)
            if step < n_steps and plan.params_after < stage_target - 0.005 * stage_target:
                # At a small cut one step's whole KV groups can pass the stage's budget, and no later
                # step grows them back: this step becomes the stage's last and cuts to the budget.
                n_steps = step
                meta["steps"] = step
                plan = allocate(scores, costs, stage_target, alloc, meta=meta, strict=stage == cfg.stages,
                                prior=prior, reference=reference)
        timings["allocate_s"] += time.perf_counter() - t
        t = time.perf_counter()
        apply_plan(model, _drops_only(plan, costs) if deferred and step == n_steps else plan)
        timings["surgery_s"] += time.perf_counter() - t
        step_plans.append(plan)
        if step < n_steps:
            on_event(ProgressEvent("prune", step, n_steps, f"step {step}/{n_steps}",
                                   {"params": count_params(model), "target": step_target}, kind="progress"))
            kept = [lp for lp in plan.layers if not lp.drop]
            old = [lp.index for lp in kept]
            sparsity = {int(k): v for k, v in plan.meta["layer_sparsity"].items()}
            prior = {new: sparsity.get(i, 0.0) for new, i in enumerate(old)}
            reference = replace(reference, layer=[reference.layer[i] for i in old],
                                num_kv=[reference.num_kv[i] for i in old], width=[reference.width[i] for i in old])
            # Kept units keep their scores until the next rescoring.
            scores = Scores(kv=[scores.kv[lp.index][lp.keep_kv_groups] for lp in kept],
                            mlp=[scores.mlp[lp.index][lp.keep_channels] for lp in kept],
                            layer_cos=scores.layer_cos[old], loss=scores.loss)
        else:
            break  # the last step (or one that became it)
    timings["steps"] = timings.get("steps", 0) + n_steps
    if targets is not None:
        t = time.perf_counter()
        last = [lp for lp in plan.layers if not lp.drop]
        stage_plan = compose(step_plans)
        kept = [lp.index for lp in stage_plan.layers if not lp.drop]
        changed = {lp.index for lp in stage_plan.layers if not lp.drop and (
            len(lp.keep_kv_groups) < stage_reference.num_kv[lp.index]
            or len(lp.keep_channels) < stage_reference.width[lp.index])}
        choose = cfg.reconstruction_chooses
        with calibration_autocast(model, cfg.calibration_precision):
            chosen = reconstruct(model, targets, kept, changed, cfg.reconstruct_damp, cfg.reconstruct_correction,
                                 on_event, keep={j: (lp.keep_kv_groups, lp.keep_channels) for j, lp in enumerate(last)},
                                 choose=choose)
        if choose:  # the last step's plan records the units reconstruction chose
            for j, lp in enumerate(last):
                lp.keep_kv_groups, lp.keep_channels = chosen[j]
        record_shapes(model)
        timings["reconstruct_s"] += time.perf_counter() - t
    return compose(step_plans)


def _drops_only(plan: PrunePlan, costs: UnitCosts) -> PrunePlan:
    """`plan`'s layer drops with every unit of the remaining layers kept."""
    layers = [LayerPlan(lp.index, list(range(costs.num_kv[lp.index])), list(range(costs.width[lp.index])), lp.drop)
              for lp in plan.layers]
    return replace(plan, layers=layers)
