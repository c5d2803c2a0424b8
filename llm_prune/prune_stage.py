"""The prune stage: load the model, prune it to the budget (or re-apply a saved plan), and write
the checkpoint with its model card and `plan.json`. `llm-prune prune` and the pipeline's prune
stage are this one function."""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from llm_prune.errors import UserError, first_line
from llm_prune.plan import PrunePlan, compose, count_params
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.recipe import Recipe


@dataclass
class PrunedCheckpoint:
    model: object
    tokenizer: object
    path: Path
    plan: PrunePlan  # against the original model; what `plan.json` holds
    params_before: int
    params_after: int
    params_target: int
    needs_remote_code: bool
    shapes_before: list = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def peak_rss_bytes() -> int:
    """This process's peak resident set. Linux's ru_maxrss survives exec, so a process spawned by a
    large parent reports the parent's peak; the address space's own high-water mark (VmHWM) does not."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def prune_to_checkpoint(recipe: Recipe, out: str | Path, *, on_event: ProgressCallback = null_callback,
                        between_stages: Callable | None = None, plan: PrunePlan | None = None,
                        load: Callable | None = None) -> PrunedCheckpoint:
    """Prune `recipe.model` by `recipe.budget`/`recipe.pruning` (or by `plan`) into `out`."""
    from llm_prune.card import as_run, model_card
    from llm_prune.export import export_checkpoint
    from llm_prune.families import layer_shapes
    from llm_prune.gguf_export import gguf_refusal
    from llm_prune.models import hub_id, load_model, source_dtype, source_license

    out = Path(out)
    t0 = time.perf_counter()
    model, tok = (load or (lambda spec: load_model(spec, device=recipe.device,
                                                   trust_remote_code=recipe.trust_remote_code)))(recipe.model)
    timings = {"load_s": time.perf_counter() - t0}
    shapes_before = layer_shapes(model)
    t1 = time.perf_counter()
    applied = plan is not None
    if plan is None:
        from llm_prune.prune import prune_model

        result = prune_model(model, tok, recipe.budget, recipe.pruning, on_event=on_event,
                             between_stages=between_stages)
        model, plan = result.model, compose(result.plans)
        before, after, target = result.params_before, result.params_after, result.params_target
        timings.update(result.timings)
    else:
        model, before = _apply_saved(model, plan, on_event)
        after, target = count_params(model), plan.params_target
        timings["score_s"] = 0.0
    timings["prune_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    record = recipe.model_dump()
    if applied:  # the pruning settings did not run: the card and config must not claim they did
        record["pruning"] = {"plan": "a saved plan.json re-applied: its kept heads, channels and layers, "
                                     "sliced weights (no scoring, no reconstruction)"}
    meta = {"recipe": record, "base_model": recipe.model}
    saved_dtype = source_dtype(recipe.model)
    info = export_checkpoint(model, tok, out, extra_meta=meta, dtype=saved_dtype)
    if saved_dtype is not None and saved_dtype != next(model.parameters()).dtype:
        import torch

        with torch.no_grad():  # what is measured next (the pruned model's evaluation) is what was saved
            for p in model.parameters():
                p.copy_(p.to(saved_dtype))
    plan.save(out / "plan.json")
    timings["export_s"] = time.perf_counter() - t2
    measured = {"params_before": before, "params_after": after, "removed_fraction": 1 - after / before,
                "timings": timings, "peak_rss_bytes": peak_rss_bytes()}
    (out / "README.md").write_text(model_card(base_model=recipe.model, recipe=record,
                                              shapes=layer_shapes(model), params_before=before,
                                              params_after=after, needs_remote_code=info["needs_remote_code"],
                                              metrics=measured, ran=None if applied else as_run(plan),
                                              license=source_license(recipe.model),
                                              gguf_refusal=gguf_refusal(model.config, out),
                                              base_model_id=hub_id(recipe.model)))
    return PrunedCheckpoint(model=model, tokenizer=tok, path=out, plan=plan, params_before=before,
                            params_after=after, params_target=target, needs_remote_code=info["needs_remote_code"],
                            shapes_before=shapes_before, timings=timings)


def _apply_saved(model, plan: PrunePlan, on_event: ProgressCallback):
    from llm_prune.surgery import apply_plan

    before = count_params(model)
    if before != plan.params_before:
        raise UserError(f"the plan was made for a model with {plan.params_before:,} parameters; this one has "
                        f"{before:,}", param="plan")
    _check_fits(model, plan)
    on_event(ProgressEvent("prune", 0, 1, "applying the saved plan", kind="stage_start"))
    try:
        apply_plan(model, plan)
    except (ValueError, IndexError, TypeError) as exc:
        raise UserError(f"the plan does not fit this model: {exc}", param="plan") from None
    on_event(ProgressEvent("prune", 1, 1, "pruned", kind="stage_end"))
    return model, before


def _check_fits(model, plan: PrunePlan) -> None:
    """Every index of the plan names a layer, KV group and MLP channel this model has (before any
    surgery, so a bad plan leaves the model whole)."""
    from llm_prune.plan import unit_costs

    costs = unit_costs(model)
    n = len(costs.layer)
    if len(plan.layers) != n:
        raise UserError(f"the plan does not fit this model: it has {len(plan.layers)} layers, the model {n}",
                        param="plan")
    for lp in plan.layers:
        if lp.drop:
            continue
        for name, units, limit in (("KV group", lp.keep_kv_groups, costs.num_kv[lp.index]),
                                   ("MLP channel", lp.keep_channels, costs.width[lp.index])):
            bad = [u for u in units if u >= limit]
            if bad:
                raise UserError(f"the plan does not fit this model: layer {lp.index} keeps {name} {bad[0]}, but "
                                f"the layer has {limit} (0 to {limit - 1})", param="plan")


def check_plan_budget(plan: PrunePlan, budget) -> None:
    """The plan fixes the cut: a budget given with it must be the one the plan was solved for."""
    if budget.ratio is not None:
        wanted, flag = int(round(plan.params_before * (1.0 - budget.ratio))), f"--ratio {budget.ratio:g}"
    else:
        wanted, flag = int(budget.target_params), f"--target-params {budget.target_params}"
    if wanted != plan.params_target:
        ratio = 1 - plan.params_target / plan.params_before
        raise UserError(f"{flag} asks for {wanted:,} parameters but the plan was solved for "
                        f"{plan.params_target:,} (ratio {ratio:.4g}); the plan fixes the cut: drop the budget "
                        f"flag, or prune without --plan", param="budget")


def load_plan(path: str | Path) -> PrunePlan:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"plan file not found: {path}", param="plan")
    try:
        return PrunePlan.load(p)
    except UnicodeDecodeError:
        raise UserError(f"{path} is not a plan.json: not UTF-8 text", param="plan") from None
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or exc}", param="plan") from None
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise UserError(f"{path} is not a plan.json: {first_line(exc)}", param="plan") from None
