"""Budget allocation across clusters: n_k proportional to the cluster degradation score CDS_k,
capped by what cluster k can still give, with the leftover handed on so exactly B are chosen."""

from __future__ import annotations

import math

import numpy as np

from llm_prune.errors import UserError


def resolve_budget(budget: float, pool_size: int) -> int:
    """A fraction of the pool (0 < budget <= 1) or a record count (> 1), as a count in [1, pool]."""
    if budget is None or not math.isfinite(budget) or budget <= 0:
        raise UserError(f"budget must be > 0 (a fraction <= 1 or a record count), got {budget}", param="budget")
    if budget <= 1:
        return max(1, min(pool_size, int(round(budget * pool_size))))
    if budget != int(budget):
        raise UserError(f"a budget above 1 is a record count and must be whole, got {budget}", param="budget")
    return min(pool_size, int(budget))


def allocate_budget(scores: np.ndarray, caps: np.ndarray, budget: int) -> np.ndarray:
    """Integer n_k with sum = min(budget, sum caps), n_k <= caps_k, n_k ~ scores_k (water-filling:
    clusters that hit their cap drop out and the rest share what is left, by largest remainder)."""
    scores = np.clip(np.nan_to_num(np.asarray(scores, dtype=np.float64)), 0, None)
    caps = np.asarray(caps, dtype=np.int64)
    budget = int(min(budget, caps.sum()))
    n = np.zeros_like(caps)
    if scores[caps > 0].sum() <= 0:
        scores = caps.astype(np.float64)  # no signal: proportional to size
    while n.sum() < budget:
        open_ = n < caps
        left = budget - n.sum()
        weight = np.where(open_, scores, 0.0)
        if weight.sum() <= 0:  # only zero-score clusters have room: fill them by size
            weight = np.where(open_, (caps - n).astype(np.float64), 0.0)
        share = weight / weight.sum() * left
        room = caps - n
        if np.any(share > room):  # saturate the capped clusters first, then share again
            full = share >= room
            n[full] = caps[full]
            continue
        base = np.floor(share).astype(np.int64)
        rest = left - base.sum()
        # Largest remainders get the last records; ties go to the higher score, then lower index.
        order = np.lexsort((np.arange(len(n)), -weight, -(share - base)))
        extra = np.zeros_like(n)
        extra[[k for k in order if open_[k] and base[k] < room[k]][:rest]] = 1
        n += base + extra
    return n
