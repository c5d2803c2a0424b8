"""`llm-prune run`: the whole job (prune -> select -> recover -> evaluate -> export) on one machine.
Flags and a recipe file (YAML/JSON, the same object the REST API takes) become one Recipe; flags
win over the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from llm_prune.cli.common import emit_json, table


def _flags_to_recipe(**flags) -> dict:
    """Only flags the user gave (not None) go into the recipe, in their sections."""
    sections = {
        "budget": {"ratio": "ratio", "target_params": "target_params"},
        "pruning": {"importance": "importance", "allocation": "allocation", "stages": "stages",
                    "round_to": "round_to", "calibration": "calibration", "prune_layers": "prune_layers",
                    "prune_attention": "attention"},
        "data": {"pool": "data", "selection": "selection", "budget": "data_budget",
                 "token_budget": "token_budget", "num_clusters": "clusters"},
        "recovery": {"method": "recovery", "max_steps": "max_steps", "learning_rate": "lr",
                     "micro_batch_size": "micro_batch", "cutoff_len": "cutoff_len", "lora_r": "lora_r",
                     "distill_weight": "distill"},
        "evaluation": {"ppl": "eval_ppl", "tasks": "tasks", "limit": "limit", "max_windows": "max_windows",
                       "seq_len": "seq_len"},
    }
    out: dict = {}
    for section, mapping in sections.items():
        values = {key: flags[flag] for key, flag in mapping.items() if flags.get(flag) is not None}
        if values:
            out[section] = values
    for key in ("model", "device"):
        if flags.get(key) is not None:
            out[key] = flags[key]
    return out


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        model: Optional[str] = typer.Argument(None, help="hub id, local dir, .gguf or alias (or in --recipe)"),
        output: Path = typer.Option(..., "--output", "-o", help="job directory (rerun to resume)"),
        recipe: Optional[Path] = typer.Option(None, help="recipe YAML/JSON; flags override it"),
        ratio: Optional[float] = typer.Option(None, help="fraction of total parameters to remove"),
        target_params: Optional[int] = typer.Option(None, "--target-params"),
        importance: Optional[str] = typer.Option(None),
        allocation: Optional[str] = typer.Option(None, help="uniform | adaptive"),
        stages: Optional[int] = typer.Option(None, help="prune in T steps with recovery in between"),
        round_to: Optional[int] = typer.Option(None, "--round-to"),
        prune_layers: Optional[int] = typer.Option(None, "--prune-layers"),
        attention: Optional[bool] = typer.Option(None, "--attention/--no-attention"),
        calibration: Optional[str] = typer.Option(None),
        data: Optional[str] = typer.Option(None, help="recovery pool (JSON/JSONL/CSV/Parquet/datasets dir)"),
        selection: Optional[str] = typer.Option(None, help="paser | random | all | loss"),
        data_budget: Optional[float] = typer.Option(None, "--data-budget", help="fraction (<=1) or count"),
        token_budget: Optional[int] = typer.Option(None, "--token-budget"),
        clusters: Optional[int] = typer.Option(None, "--clusters"),
        recovery: Optional[str] = typer.Option(None, help="none | lora | perp | perp_lora | full | qlora"),
        max_steps: Optional[int] = typer.Option(None, "--max-steps"),
        lr: Optional[float] = typer.Option(None, "--lr"),
        micro_batch: Optional[int] = typer.Option(None, "--micro-batch"),
        cutoff_len: Optional[int] = typer.Option(None, "--cutoff-len"),
        lora_r: Optional[int] = typer.Option(None, "--lora-r"),
        distill: Optional[float] = typer.Option(None, "--distill", help="weight of KL to the dense model"),
        eval_ppl: Optional[str] = typer.Option(None, "--eval-ppl", help="text file for perplexity"),
        tasks: Optional[str] = typer.Option(None, help="comma list of zero-shot tasks, or 'all'"),
        limit: Optional[int] = typer.Option(None, help="items per task"),
        max_windows: Optional[int] = typer.Option(None, "--max-windows"),
        seq_len: Optional[int] = typer.Option(None, "--seq-len"),
        device: Optional[str] = typer.Option(None),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Prune, select recovery data, retrain, evaluate and export, resumable stage by stage."""
        from llm_prune.errors import UserError
        from llm_prune.pipeline import run_recipe
        from llm_prune.progress import TqdmRenderer
        from llm_prune.recipe import deep_merge, load_recipe_file, parse_recipe

        base = load_recipe_file(recipe) if recipe else {}
        task_list = [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None
        flags = _flags_to_recipe(model=model, device=device, ratio=ratio, target_params=target_params,
                                 importance=importance, allocation=allocation, stages=stages, round_to=round_to,
                                 calibration=calibration, prune_layers=prune_layers, attention=attention, data=data,
                                 selection=selection, data_budget=data_budget, token_budget=token_budget,
                                 clusters=clusters, recovery=recovery, max_steps=max_steps, lr=lr,
                                 micro_batch=micro_batch, cutoff_len=cutoff_len, lora_r=lora_r, distill=distill,
                                 eval_ppl=eval_ppl, tasks=task_list, limit=limit, max_windows=max_windows,
                                 seq_len=seq_len)
        merged = deep_merge(base, flags)
        if "model" not in merged:
            raise UserError("no model: give MODEL or a recipe with `model`", param="model")
        if "budget" not in merged:
            raise UserError("no budget: give --ratio or --target-params (or `budget` in the recipe)",
                            param="budget")
        rec = parse_recipe(merged)
        renderer = TqdmRenderer(disable=as_json)
        summary = run_recipe(rec, output, on_event=renderer)
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
