"""`llm-prune prune MODEL --ratio 0.2 -o OUT`: score, allocate, cut and export."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import typer

from llm_prune.cli.common import emit_json, human_bytes, human_count, table
from llm_prune.cli.recipe_flags import recipe_flags, recipe_from_data, with_recipe_flags
from llm_prune.errors import UserError
from llm_prune.paths import STAGING

FLAGS = recipe_flags(("budget", "pruning", "export", "device", "trust_remote_code"))


def register(app: typer.Typer) -> None:
    @app.command("prune")
    @with_recipe_flags(FLAGS)
    def prune_cmd(
        model: str = typer.Argument(..., help="hub id, local HF dir, .gguf file or alias (smollm2-135m)"),
        output: Path = typer.Option(..., "--output", "-o", help="output directory for the pruned checkpoint"),
        plan: Optional[Path] = typer.Option(None, "--plan", help="re-apply this plan.json instead of scoring "
                                            "(the same kept heads and channels, e.g. on another copy)"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
        save_plan: Optional[bool] = typer.Option(None, "--save-plan/--no-save-plan", hidden=True),
        recipe_data: dict = None,
    ) -> None:
        """Prune MODEL structurally to a parameter budget and export a Hugging Face checkpoint."""
        from llm_prune.export import publish_staged, weights_bytes
        from llm_prune.families import layer_shapes
        from llm_prune.paths import check_output_dir
        from llm_prune.progress import TqdmRenderer
        from llm_prune.prune_stage import check_plan_budget, load_plan, peak_rss_bytes, prune_to_checkpoint

        if save_plan is not None:
            typer.echo("warning: --save-plan/--no-save-plan is deprecated and ignored: plan.json is always "
                       "written", err=True)
        saved = load_plan(plan) if plan else None
        if saved is not None and "budget" not in recipe_data:
            recipe_data["budget"] = {"target_params": saved.params_target}
        if "budget" not in recipe_data:
            raise UserError("give --ratio or --target-params", param="budget")
        recipe = recipe_from_data({"model": model, **recipe_data}, FLAGS)
        if saved is not None:
            check_plan_budget(saved, recipe.budget)  # the plan fixes the cut: a budget flag must agree
            _check_no_pruning_flags(recipe_data)
        for unused in recipe.pruning.unused_settings():  # told, not refused, as `run` does
            typer.echo(f"warning: {unused}", err=True)
        recipe.check_files()
        output = check_output_dir(output)
        _check_not_input(model, output)
        _check_output_is_ours(output)
        if recipe.export.gguf:
            from llm_prune.gguf_export import check_exportable
            from llm_prune.models import load_config, resolve_source

            source = resolve_source(model)
            check_exportable(load_config(source), None if source.gguf_file else source.path)  # before the work
        renderer = TqdmRenderer(disable=as_json)
        staged = output / STAGING  # an earlier checkpoint here stays whole until this one is
        shutil.rmtree(staged, ignore_errors=True)  # what an interrupted run left
        try:
            ckpt = prune_to_checkpoint(recipe, staged, on_event=renderer, plan=saved)
            publish_staged(staged, output)
        finally:
            renderer.close()
            shutil.rmtree(staged, ignore_errors=True)
        from llm_prune.models import source_dtype

        bytes_per_param = (source_dtype(model) or next(ckpt.model.parameters()).dtype).itemsize
        summary = {
            "model": model, "output": str(output), "needs_remote_code": ckpt.needs_remote_code,
            "params_before": ckpt.params_before, "params_after": ckpt.params_after,
            "params_target": ckpt.params_target,
            "removed_fraction": 1 - ckpt.params_after / ckpt.params_before,
            "target_error": (ckpt.params_after - ckpt.params_target) / ckpt.params_target,
            "weights_bytes_before": ckpt.params_before * bytes_per_param, "weights_bytes_after": weights_bytes(output),
            "layers_before": [s.as_dict() for s in ckpt.shapes_before],
            "layers_after": [s.as_dict() for s in layer_shapes(ckpt.model)],
            "timings": ckpt.timings, "peak_rss_bytes": peak_rss_bytes(),
        }
        if recipe.export.gguf:
            from llm_prune.gguf_export import export_gguf

            summary["gguf"] = export_gguf(output, output / f"model-{recipe.export.gguf}.gguf",
                                          dtype=recipe.export.gguf, force=True)
        if as_json:
            emit_json(summary)
            return
        typer.echo(render_table(summary))


def _check_no_pruning_flags(recipe_data: dict) -> None:
    """A saved plan fixes every unit and layer and is applied without scoring or reconstruction, so
    a pruning option given with it would be silently ignored."""
    from llm_prune.cli.recipe_flags import flag_for

    given = [flag_for(FLAGS, f"pruning.{key}") or key for key in recipe_data.get("pruning", {})]
    if given:
        raise UserError(f"--plan fixes the cut and is applied without scoring or reconstruction: "
                        f"{', '.join(given)} would not be used; drop {'them' if len(given) > 1 else 'it'}, or prune "
                        "without --plan", param="plan")


def _check_not_input(model: str, output: Path) -> None:
    """Writing the checkpoint into the model's own folder would overwrite the weights being pruned."""
    from llm_prune.models import resolve_source

    source = resolve_source(model)
    if source.is_local and not source.gguf_file and output.exists() \
            and Path(source.path).resolve() == output.resolve():
        raise UserError(f"output {output} is the input model's folder; give another directory", param="output")


def _check_output_is_ours(output: Path) -> None:
    """The checkpoint replaces config.json, README.md and plan.json, and saving it deletes weight
    shards of another model: an existing folder with files is taken only when it is an earlier
    llm-prune checkpoint (pruning again into the same place)."""
    if not output.is_dir() or not any(p.name != STAGING for p in output.iterdir()):
        return
    from llm_prune.model_files import read_config

    try:  # a config.json that is a FIFO or a link to a device is not ours, and is not waited on
        ours = "llm_prune" in read_config(output / "config.json")
    except UserError:
        ours = False
    if not ours:
        raise UserError(f"output {output} holds other files (it is not an llm-prune checkpoint), which the checkpoint "
                        "would overwrite or delete; give an empty or new folder", param="output")
    from llm_prune.pipeline import DONE

    if (output / DONE).exists():  # `run` would take the new model for the stage it finished
        raise UserError(f"output {output} is a finished stage of an `llm-prune run` job; prune into another folder",
                        param="output")


def _width_summary(layers: list[dict]) -> str:
    kv = [lay["num_key_value_heads"] for lay in layers]
    mlp = [lay["intermediate_size"] for lay in layers]
    return f"{len(layers)} layers, KV {min(kv)}-{max(kv)}, MLP {min(mlp)}-{max(mlp)}"


def render_table(s: dict) -> str:
    rows = [
        ["parameters", human_count(s["params_before"]), human_count(s["params_after"]),
         f"{-100 * s['removed_fraction']:+.2f}%"],
        ["weights on disk", human_bytes(s["weights_bytes_before"]), human_bytes(s["weights_bytes_after"]),
         f"{100 * (s['weights_bytes_after'] / s['weights_bytes_before'] - 1):+.2f}%"],
        ["layer widths", _width_summary(s["layers_before"]), _width_summary(s["layers_after"]), ""],
    ]
    t = s["timings"]
    out = table(rows, ["", "before", "after", "change"])
    out += (f"\n\ntarget {s['params_target']:,} params, got {s['params_after']:,} "
            f"({100 * s['target_error']:+.3f}%)"
            f"\ntime: load {t['load_s']:.1f}s, prune {t['prune_s']:.1f}s (score {t['score_s']:.1f}s), "
            f"export {t['export_s']:.1f}s; peak RSS {human_bytes(s['peak_rss_bytes'])}"
            f"\nsaved to {s['output']}" + (" (load with trust_remote_code=True)" if s["needs_remote_code"] else "")
            + (f"\nGGUF: {s['gguf']['path']} ({s['gguf']['architecture']})" if s.get("gguf") else ""))
    return out
