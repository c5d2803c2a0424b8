"""The selection entry point shared by every method: resolve the budget, run the method, and
write the chosen records with a report."""

from __future__ import annotations

import json
import time
from pathlib import Path

from data_selection.allocate import resolve_budget
from data_selection.context import Selection, SelectionContext
from data_selection.pool import Record
from llm_prune.errors import UserError
from llm_prune.progress import ProgressCallback, null_callback

METHODS = ("paser", "random", "all", "loss")


def select_records(records: list[Record], *, method: str = "paser", budget: float = 0.2, original=None,
                   pruned=None, token_budget: int | None = None, num_clusters: int | None = None,
                   embedding_model: str | None = None, seed: int = 0, on_event: ProgressCallback = null_callback,
                   cutoff_len: int | None = None, **method_kwargs) -> Selection:
    """Choose `budget` records (a fraction <= 1 or a count > 1) from `records` with `method`.
    `cutoff_len` (recovery's): records are scored and counted against a token budget as trained."""
    if method not in METHODS:
        raise UserError(f"unknown selection method '{method}': use {', '.join(METHODS)}", param="method")
    if not records:
        raise UserError("the pool is empty", param="pool")
    if token_budget is not None and token_budget <= 0:
        raise UserError(f"token budget must be > 0, got {token_budget}", param="token_budget")
    ctx = SelectionContext(records, resolve_budget(budget, len(records)), original, pruned, token_budget,
                           seed, on_event, cutoff_len)
    start = time.perf_counter()
    if method == "paser":
        from data_selection.paser import PaserConfig, select_paser

        try:
            if cutoff_len is not None:
                method_kwargs.setdefault("max_length", cutoff_len)
            config = PaserConfig(num_clusters=num_clusters, embedding_model=embedding_model, **method_kwargs)
        except TypeError as exc:
            raise UserError(f"unknown PASER option: {exc}", param="method") from None
        selection = select_paser(ctx, config)
    else:
        from data_selection import baselines

        if method_kwargs:
            raise UserError(f"method '{method}' takes no options ({', '.join(method_kwargs)})", param="method")
        selection = baselines.BASELINES[method](ctx)
    if not selection.records and token_budget is not None:  # else recovery fails later on an empty file
        smallest = int(ctx.token_counts().min())
        raise UserError(f"token budget {token_budget} fits no record of the pool (the smallest takes {smallest} "
                        "training tokens)", param="token_budget")
    selection.report = {"method": method, "pool_size": len(records), "budget": budget,
                        "budget_records": ctx.budget, "token_budget": token_budget, "selected": len(selection.records),
                        "seed": seed, **selection.report,
                        "seconds_total": round(time.perf_counter() - start, 2)}
    return selection


SELECTION_FILES = ("selected.jsonl", "report.json", "report.png")


def check_output_beside_pool(pool: str | Path, out_dir: str | Path) -> None:
    """Refuse an output that would overwrite the pool (re-selecting from a selection in place) or
    sit inside a pool folder, where the next read of the pool would take the outputs in as records."""
    from llm_prune.errors import UserError

    src, out = Path(pool).resolve(), Path(out_dir).expanduser().resolve()
    if src.is_dir() and (out == src or src in out.parents):
        raise UserError(f"output {out_dir} is inside the pool folder {pool}: its files would be read as records "
                        "the next time; write it elsewhere", param="output")
    if src.is_file() and src in {out / name for name in SELECTION_FILES}:
        raise UserError(f"output {out_dir} would overwrite the pool {pool} with the selection; write it elsewhere",
                        param="output")


def write_selection(selection: Selection, out_dir: str | Path) -> dict[str, str]:
    """Write selected.jsonl (normalised records with source ids), report.json and report.png."""
    from data_selection.report import plot_report

    from llm_prune.paths import make_dir

    out = make_dir(out_dir)
    # Written beside and renamed into place: a failure midway leaves an earlier selection whole.
    staged = {name: out / f".{Path(name).stem}.partial{Path(name).suffix}" for name in SELECTION_FILES}
    try:
        with staged["selected.jsonl"].open("w", encoding="utf-8") as fh:
            for record in selection.records:
                fh.write(json.dumps(record.to_dict(), ensure_ascii=False) + "\n")
        staged["report.json"].write_text(json.dumps(selection.report, indent=2, default=float) + "\n")
        plot_report(selection, staged["report.png"])
        for name, path in staged.items():
            path.replace(out / name)
    finally:
        for path in staged.values():
            path.unlink(missing_ok=True)
    return {"selected": str(out / "selected.jsonl"), "report": str(out / "report.json"),
            "plot": str(out / "report.png")}
