"""`llm-prune select POOL --original MODEL --pruned PRUNED --budget 0.2 -o OUT`: choose the
recovery data the pruned model needs most (PASER) or a baseline, and write it with a report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from llm_prune.cli.common import emit_json, table
from llm_prune.cli.recipe_flags import recipe_flags, recipe_from_data, with_recipe_flags
from llm_prune.errors import UserError
from llm_prune.pipeline import selection_kwargs


FLAGS = recipe_flags(("data", "recovery.cutoff_len", "recovery.seed", "device", "trust_remote_code"),
                     exclude=("data.pool",),
                     names={"data.selection": "--method", "data.budget": "--budget", "recovery.seed": "--seed"})


def register(app: typer.Typer) -> None:
    @app.command("select")
    @with_recipe_flags(FLAGS)
    def select_cmd(
        pool: Path = typer.Argument(..., help="recovery pool: JSON/JSONL/CSV/Parquet file, a folder of them, "
                                             "or a datasets folder (Alpaca, ShareGPT or chat form)"),
        output: Path = typer.Option(..., "--output", "-o", help="output folder for selected.jsonl and the report"),
        original: Optional[str] = typer.Option(None, help="the model before pruning (hub id, dir, .gguf, alias)"),
        pruned: Optional[str] = typer.Option(None, help="the pruned checkpoint"),
        max_length: Optional[int] = typer.Option(None, "--max-length", hidden=True),
        as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
        recipe_data: dict = None,
    ) -> None:
        """Select recovery data for a pruned model and write selected.jsonl, report.json, report.png.
        PASER scores each record exactly as recovery trains on it (`--cutoff-len` tokens, as `run`)."""
        from data_selection import load_pool, select_records, write_selection
        from data_selection.selection import check_output_beside_pool
        from llm_prune.models import load_model
        from llm_prune.progress import TqdmRenderer
        from llm_prune.recipe import DataConfig, RecoveryConfig

        if max_length is not None:
            typer.echo("warning: --max-length is deprecated; use --cutoff-len (the training cutoff, which PASER "
                       "now scores)", err=True)
            recipe_data.setdefault("recovery", {}).setdefault("cutoff_len", max_length)
        data = recipe_from_data(recipe_data.get("data", {}), FLAGS, DataConfig, ("data",))
        recovery = recipe_from_data(recipe_data.get("recovery", {}), FLAGS, RecoveryConfig, ("recovery",))
        device = recipe_data.get("device", "cpu")
        trust = bool(recipe_data.get("trust_remote_code", False))
        if not pool.exists():
            raise UserError(f"pool not found: {pool}", param="pool")
        from llm_prune.paths import check_output_dir

        output = check_output_dir(output)
        check_output_beside_pool(pool, output)
        _check_output_is_ours(output)
        method = data.selection
        if method in ("paser", "loss") and (original is None or pruned is None):
            raise UserError(f"--method {method} needs --original and --pruned", param="original")
        unused = data.unused_settings(budget_flag="--budget")  # options the method would silently ignore
        if unused:
            raise UserError(unused[0], param="method")
        renderer = TqdmRenderer(disable=as_json)
        loaded = load_pool(pool)
        original_pair = load_model(original, device=device, trust_remote_code=trust) if original else None
        pruned_pair = load_model(pruned, device=device, trust_remote_code=trust) if pruned else None
        if pruned_pair is not None:  # PASER scores --cutoff-len tokens, as training would: the same limits
            recovery.check_fits(pruned_pair[0].config)
        try:
            selection = select_records(loaded.records, original=original_pair, pruned=pruned_pair,
                                       **selection_kwargs(data, recovery), on_event=renderer)
        finally:
            renderer.close()
        selection.report["pool"] = {"path": str(pool), **loaded.summary()}
        selection.report["models"] = {"original": original, "pruned": pruned}
        files = write_selection(selection, output)
        if as_json:
            emit_json({**selection.report, "files": files})
            return
        typer.echo(render_summary(selection.report, files))


def _check_output_is_ours(output: Path) -> None:
    """The selection replaces selected.jsonl, report.json and report.png: an existing folder with
    files is taken only when it holds an earlier selection (selecting again into the same place)."""
    from data_selection.selection import SELECTION_FILES
    from llm_prune.pipeline import DONE

    if not output.is_dir() or not any(output.iterdir()):
        return
    if not (output / SELECTION_FILES[0]).is_file():
        raise UserError(f"output {output} holds other files (no earlier selection), which the selection's "
                        f"{', '.join(SELECTION_FILES)} would overwrite or sit among; give an empty or new folder",
                        param="output")
    if (output / DONE).exists():  # `run` would take the new selection for the stage it finished
        raise UserError(f"output {output} is a finished stage of an `llm-prune run` job; select into another "
                        "folder", param="output")


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
