"""The selection entry point shared by every method: resolve the budget, run the method, and
write the chosen records with a report."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from data_selection.allocate import resolve_budget
from data_selection.pool import Record, format_example
from llm_prune.errors import UserError
from llm_prune.progress import ProgressCallback, null_callback

METHODS = ("paser", "random", "all", "loss")


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

    def require_models(self, method: str) -> None:
        if self.original is None or self.pruned is None:
            raise UserError(f"method '{method}' compares the original and the pruned model: "
                            f"give both --original and --pruned", param="original")

    def tokenizer(self):
        for pair in (self.original, self.pruned):
            if pair is not None:
                return pair[1]
        return None

    def token_counts(self, indices=None) -> np.ndarray:
        """Training tokens (prompt + response, as formatted) per record."""
        tok = self.tokenizer()
        if tok is None:
            raise UserError("a token budget needs a tokenizer: give --original", param="token_budget")
        idx = range(len(self.records)) if indices is None else indices
        out = []
        for i in idx:
            prompt, response = format_example(tok, self.records[i])
            out.append(len(tok(prompt + response, add_special_tokens=False)["input_ids"]))
        return np.asarray(out, dtype=np.int64)


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


def select_records(records: list[Record], *, method: str = "paser", budget: float = 0.2, original=None,
                   pruned=None, token_budget: int | None = None, num_clusters: int | None = None,
                   embedding_model: str | None = None, seed: int = 0, on_event: ProgressCallback = null_callback,
                   **method_kwargs) -> Selection:
    """Choose `budget` records (a fraction <= 1 or a count > 1) from `records` with `method`."""
    if method not in METHODS:
        raise UserError(f"unknown selection method '{method}': use {', '.join(METHODS)}", param="method")
    if not records:
        raise UserError("the pool is empty", param="pool")
    if token_budget is not None and token_budget <= 0:
        raise UserError(f"token budget must be > 0, got {token_budget}", param="token_budget")
    ctx = SelectionContext(records, resolve_budget(budget, len(records)), original, pruned, token_budget,
                           seed, on_event)
    start = time.perf_counter()
    if method == "paser":
        from data_selection.paser import PaserConfig, select_paser

        try:
            config = PaserConfig(num_clusters=num_clusters, embedding_model=embedding_model, **method_kwargs)
        except TypeError as exc:
            raise UserError(f"unknown PASER option: {exc}", param="method") from None
        selection = select_paser(ctx, config)
    else:
        from data_selection import baselines

        if method_kwargs:
            raise UserError(f"method '{method}' takes no options ({', '.join(method_kwargs)})", param="method")
        selection = baselines.BASELINES[method](ctx)
    selection.report = {"method": method, "pool_size": len(records), "budget": budget,
                        "budget_records": ctx.budget, "token_budget": token_budget, "selected": len(selection.records),
                        "seed": seed, **selection.report,
                        "seconds_total": round(time.perf_counter() - start, 2)}
    return selection


def write_selection(selection: Selection, out_dir: str | Path) -> dict[str, str]:
    """Write selected.jsonl (normalised records with source ids), report.json and report.png."""
    from data_selection.report import plot_report

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (out / "selected.jsonl").open("w", encoding="utf-8") as fh:
        for record in selection.records:
            fh.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
    (out / "report.json").write_text(json.dumps(selection.report, indent=2, default=float) + "\n")
    plot_report(selection, out / "report.png")
    return {"selected": str(out / "selected.jsonl"), "report": str(out / "report.json"),
            "plot": str(out / "report.png")}
