"""Baselines with the same interface as PASER: `random` (seeded), `all`, and `loss` (the records
whose loss rose most from the original to the pruned model)."""

from __future__ import annotations

import time

import numpy as np

from data_selection.degradation import score_records
from data_selection.context import PlotData, Selection, SelectionContext, take_in_order


def _finish(ctx: SelectionContext, chosen: list[int], report: dict, plot: PlotData | None = None) -> Selection:
    order = sorted(chosen)
    plot = plot or PlotData()
    plot.selected = np.array(order)
    return Selection(records=[ctx.records[i] for i in order], indices=order, report=report, plot=plot)


def select_random(ctx: SelectionContext) -> Selection:
    order = np.random.default_rng(ctx.seed).permutation(len(ctx.records))
    tokens = ctx.token_counts() if ctx.token_budget is not None else None
    chosen, skipped = take_in_order(order, ctx.budget, tokens, ctx.token_budget)
    report = {"skipped_over_token_budget": skipped}
    if tokens is not None:
        report["tokens_selected"] = int(tokens[chosen].sum())
    return _finish(ctx, chosen, report)


def select_all(ctx: SelectionContext) -> Selection:
    """Every record (the budget does not apply; a token budget still does, in pool order)."""
    n = len(ctx.records)
    tokens = ctx.token_counts() if ctx.token_budget is not None else None
    chosen, skipped = take_in_order(range(n), n, tokens, ctx.token_budget)
    report = {"note": "method 'all' ignores the record budget", "skipped_over_token_budget": skipped}
    if tokens is not None:
        report["tokens_selected"] = int(tokens[chosen].sum())
    return _finish(ctx, chosen, report)


def select_loss(ctx: SelectionContext) -> Selection:
    ctx.require_models("loss")
    start = time.perf_counter()
    kw = {"max_length": ctx.cutoff_len} if ctx.cutoff_len else {}  # degradation past the cutoff is never trained
    scores = score_records(ctx.records, ctx.original, ctx.pruned, on_event=ctx.on_event, **kw)
    seconds = time.perf_counter() - start
    increase = scores.loss_increase
    tokens = np.minimum(scores.tokens, ctx.cutoff_len) if ctx.cutoff_len else scores.tokens  # as trained
    order = np.lexsort((np.arange(len(increase)), -increase))  # largest increase first, ties by position
    chosen, skipped = take_in_order(order, ctx.budget, tokens if ctx.token_budget else None, ctx.token_budget)
    report = {"scoring": {"mode": "full", "scored": len(ctx.records), "seconds": round(seconds, 2)},
              "loss_increase": {"pool_mean": round(float(increase.mean()), 6),
                                "selected_mean": round(float(increase[chosen].mean()), 6) if chosen else None},
              "tokens_selected": int(tokens[chosen].sum()), "skipped_over_token_budget": skipped}
    return _finish(ctx, chosen, report, PlotData(scores=increase, score_name="loss increase (nats/token)"))


BASELINES = {"random": select_random, "all": select_all, "loss": select_loss}
