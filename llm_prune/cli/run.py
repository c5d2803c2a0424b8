"""`llm-prune run`: the whole job (prune -> select -> recover -> evaluate -> export) on one machine.
Its options are generated from the Recipe (every field is a flag); with a recipe file (YAML/JSON,
the same object the REST API takes) they become one Recipe, flags winning over the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from llm_prune.cli.common import emit_json, table
from llm_prune.cli.recipe_flags import ALL, recipe_flags, recipe_from_data, with_recipe_flags


FLAGS = recipe_flags(ALL, exclude=("model",))


def register(app: typer.Typer) -> None:
    @app.command("run")
    @with_recipe_flags(FLAGS)
    def run_cmd(
        model: Optional[str] = typer.Argument(None, help="hub id, local dir, .gguf or alias (or in --recipe)"),
        output: Path = typer.Option(..., "--output", "-o", help="job directory (rerun to resume)"),
        recipe: Optional[Path] = typer.Option(None, help="recipe YAML/JSON; flags override it"),
        as_json: bool = typer.Option(False, "--json"),
        recipe_data: dict = None,
    ) -> None:
        """Prune, select recovery data, retrain, evaluate and export, resumable stage by stage."""
        from llm_prune.errors import UserError
        from llm_prune.pipeline import run_recipe
        from llm_prune.progress import TqdmRenderer
        from llm_prune.recipe import deep_merge, load_recipe_file

        merged = deep_merge(load_recipe_file(recipe) if recipe else {}, recipe_data)
        if model is not None:
            merged["model"] = model
        if not merged.get("model"):
            raise UserError("no model: give MODEL or a recipe with `model`", param="model")
        if "budget" not in merged:
            raise UserError("no budget: give --ratio or --target-params (or `budget` in the recipe)",
                            param="budget")
        rec = recipe_from_data(merged, FLAGS)
        renderer = TqdmRenderer(disable=as_json)
        try:
            summary = run_recipe(rec, output, on_event=renderer)
        finally:
            renderer.close()
        if as_json:
            emit_json(summary)
            return
        typer.echo(render_summary(summary))


def _metric_cells(m: dict | None) -> list[str]:
    m = m or {}
    ppl = m.get("ppl", {}).get("ppl") if isinstance(m.get("ppl"), dict) else None
    avg = m.get("average")
    return [f"{m['params']:,}" if "params" in m else "", f"{ppl:.2f}" if ppl else "",
            f"{100 * avg:.2f}" if avg is not None else ""]


def render_summary(summary: dict) -> str:
    rows = [["dense", *_metric_cells(summary.get("baseline"))],
            ["pruned", *_metric_cells(summary["pruned"].get("eval"))]]
    if not summary.get("recovered", {}).get("skipped"):
        rows.append(["recovered", *_metric_cells(summary["final"].get("eval"))])
    out = table(rows, ["model", "params", "ppl", "task avg %"])
    return out + f"\n\ncheckpoint: {summary['checkpoints']['final']}\n" + json.dumps(
        {"recovery": summary.get("recovered"), "selection": summary.get("selection")}, default=str)
