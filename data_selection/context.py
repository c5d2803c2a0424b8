"""What every selection method shares: the context it runs in, its result, and what the report
plots. Methods (`paser`, `baselines`) import this; `selection.select_records` dispatches to them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_selection.encoding import encode_example
from data_selection.pool import Record
from llm_prune.errors import UserError
from llm_prune.progress import ProgressCallback


@dataclass
class PlotData:
    """What report.png draws: a 2-D projection coloured by cluster and per-cluster bars, or a
    score histogram for methods without clusters."""

    coords: np.ndarray | None = None
    labels: np.ndarray | None = None
    selected: np.ndarray | None = None  # indices into the pool
    cds: list[float] = field(default_factory=list)
    allocation: list[int] = field(default_factory=list)
    scores: np.ndarray | None = None
    score_name: str = ""


@dataclass
class Selection:
    records: list[Record]
    indices: list[int]
    report: dict[str, Any]
    plot: PlotData = field(default_factory=PlotData)


@dataclass
class SelectionContext:
    """What every method may use; models are (model, tokenizer) pairs or None."""

    records: list[Record]
    budget: int
    original: tuple | None
    pruned: tuple | None
    token_budget: int | None
    seed: int
    on_event: ProgressCallback
    cutoff_len: int | None = None  # recovery's cutoff: a record costs (and is scored on) at most this many tokens

    def require_models(self, method: str) -> None:
        if self.original is None or self.pruned is None:
            raise UserError(f"method '{method}' compares the original and the pruned model: "
                            f"give both --original and --pruned", param="original")
        sizes = [m.get_output_embeddings().weight.shape[0] for m, _ in (self.original, self.pruned)]
        if sizes[0] != sizes[1] or len(self.original[1]) != len(self.pruned[1]):
            raise UserError(f"--original and --pruned have different vocabularies ({sizes[0]:,} and {sizes[1]:,} "
                            "logits): the pruned model must come from the original", param="pruned")

    def tokenizer(self):
        for pair in (self.original, self.pruned):
            if pair is not None:
                return pair[1]
        return None

    def token_counts(self, indices=None) -> np.ndarray:
        """Training tokens per record (`encoding.encode_example`): what recovery trains on, so cut at
        `cutoff_len` when it is known."""
        tok = self.tokenizer()
        if tok is None:
            raise UserError("a token budget needs a tokenizer: give --original", param="token_budget")
        idx = range(len(self.records)) if indices is None else indices
        cutoff = self.cutoff_len or 1 << 30
        encoded = (encode_example(tok, self.records[i], cutoff_len=cutoff) for i in idx)
        return np.asarray([min(e.untruncated, cutoff) if e else 0 for e in encoded], dtype=np.int64)


def take_in_order(order, count: int, tokens: np.ndarray | None, token_budget: int | None) -> tuple[list[int], int]:
    """The first `count` of `order` that fit the token budget (a record that does not fit is
    skipped, later smaller ones may still fit). Returns (chosen, skipped)."""
    chosen, used, skipped = [], 0, 0
    smallest = int(tokens.min()) if tokens is not None and len(tokens) else 0
    for i in order:
        if len(chosen) >= count:
            break
        if token_budget is not None:
            if used + tokens[i] > token_budget:
                skipped += 1
                if token_budget - used < smallest:
                    break
                continue
            used += int(tokens[i])
        chosen.append(int(i))
    return chosen, skipped
