"""How much work each pipeline stage is, in one unit for all of them: token forward passes (a
training token, forward and backward, counts 3). A stage declares its phases' units when it starts;
the job's plan is the same numbers for every stage, computed once from the Recipe, so progress
(`llm_prune.progress.WorkTracker`) is a fraction of estimated work and the ETA is the remaining
work over the throughput measured in the current stage."""

from __future__ import annotations

import os

from llm_prune.recipe import ACTIVATION_IMPORTANCE, GRADIENT_IMPORTANCE, Recipe

TRAIN = 3.0  # forward + backward of a training token, in forward-token units
TASK_ITEM_TOKENS = 4 * 48  # a zero-shot item: ~4 choices of ~48 tokens
FULL_TASK_ITEMS = 2000  # a task without --limit (the sets run from 500 to 10k items)
SPEED_UNITS = 8192.0


def adapt_accel_steps(r) -> tuple[int, int]:
    """Adapt-Accel: max_steps is the whole budget. Each of the T-1 runs between pruning stages gets
    an equal share; the recovery after data selection gets the rest."""
    per_stage = max(1, r.recovery.max_steps // r.pruning.stages)
    return per_stage, max(1, r.recovery.max_steps - (r.pruning.stages - 1) * per_stage)


def budget_count(budget: float, n: int) -> int:
    return max(1, int(round(budget * n))) if budget <= 1 else min(n, int(budget))


def evaluation_work(recipe: Recipe) -> dict[str, float]:
    ev, work = recipe.evaluation, {}
    if ev.ppl:
        tokens = os.path.getsize(ev.ppl) / 4 if os.path.exists(ev.ppl) else 0.0  # ~4 bytes a token
        if ev.max_windows:
            tokens = min(tokens, ev.max_windows * ev.seq_len)
        work["ppl"] = tokens
    if ev.tasks:
        from llm_prune.evaluate.tasks import parse_tasks

        work["eval"] = float(len(parse_tasks(list(ev.tasks))) * (ev.limit or FULL_TASK_ITEMS) * TASK_ITEM_TOKENS)
    if ev.speed:
        work["speed"] = SPEED_UNITS
    return work


def training_work(recipe: Recipe, steps: int) -> float:
    rc = recipe.recovery
    return float(steps * rc.micro_batch_size * rc.gradient_accumulation * rc.cutoff_len) * TRAIN


def _steps(recipe: Recipe, pool_records: int) -> tuple[int, int]:
    """(steps of each recovery between pruning stages, steps of the recovery stage)."""
    r = recipe
    if r.recovery.epochs is not None:  # epochs over the selected records
        seqs = budget_count(r.data.budget, max(pool_records, 1)) * r.recovery.epochs
        return 0, int(seqs / (r.recovery.micro_batch_size * r.recovery.gradient_accumulation)) + 1
    if r.pruning.stages > 1 and r.data.pool:
        return adapt_accel_steps(r)
    return 0, r.recovery.max_steps


def stage_work(recipe: Recipe, pool_records: int = 0) -> dict[str, dict[str, float]]:
    """{pipeline stage: {phase: units}}; a phase is the prefix of the event stages it covers."""
    r = recipe
    recovers = r.recovery.method != "none" and bool(r.data.pool)
    between, steps = _steps(r, pool_records)
    p = r.pruning
    score = p.calibration_windows * p.calibration_seq_len * p.stages * (
        TRAIN if p.importance in GRADIENT_IMPORTANCE else 1.0 if p.importance in ACTIVATION_IMPORTANCE else 0.1
    ) if p.needs_scores else 0.0
    prune = {"score": float(score), **evaluation_work(r)}
    if p.reconstruct:  # the targets' pass and one refit pass, forward only
        prune["reconstruct"] = float(p.reconstruct_windows * p.calibration_seq_len * p.stages * 2)
    if recovers and p.stages > 1:
        prune["train"] = training_work(r, between) * (p.stages - 1)
    selection: dict[str, float] = {}
    if recovers and r.data.selection in ("paser", "loss"):
        models = 2 if r.data.selection == "paser" else 1
        selection["score"] = float(pool_records * r.recovery.cutoff_len * models)
        if r.data.selection == "paser":
            selection["embed"] = pool_records * 64 * 0.5  # a small encoder over short texts
    return {
        "baseline": evaluation_work(r),
        "pruned": prune,
        "selection": selection,
        "recovered": {"train": training_work(r, steps)} if recovers else {},
        "final": evaluation_work(r) if recovers else {},
    }
