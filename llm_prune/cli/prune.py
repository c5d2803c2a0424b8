"""`llm-prune prune MODEL --ratio 0.2 -o OUT`: score, allocate, cut and export."""

from __future__ import annotations

import resource
import time
from pathlib import Path
from typing import Optional

import typer
from pydantic import ValidationError

from llm_prune.cli.common import emit_json, human_bytes, human_count, table
from llm_prune.errors import UserError
from llm_prune.recipe import Budget, PruningConfig, format_validation_error


def build_budget(ratio: float | None, target_params: int | None) -> Budget:
    try:
        return Budget(ratio=ratio, target_params=target_params)
    except ValidationError as exc:
        msg, param = format_validation_error(exc)
        if param == "ratio" or (ratio is not None and param is None):
            msg = f"--ratio must be in (0, 1), got {ratio}" if ratio is not None else msg
        raise UserError(msg.replace("ratio or target_params", "--ratio or --target-params"), param="budget") from None


def build_pruning(**kwargs) -> PruningConfig:
    try:
        return PruningConfig(**{k: v for k, v in kwargs.items() if v is not None})
    except ValidationError as exc:
        msg, param = format_validation_error(exc)
        raise UserError(f"--{(param or '').replace('_', '-')}: {msg.split(': ', 1)[-1]}", param=param) from None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def register(app: typer.Typer) -> None:
    @app.command("prune")
    def prune_cmd(
        model: str = typer.Argument(..., help="hub id, local HF dir, .gguf file or alias (smollm2-135m)"),
        output: Path = typer.Option(..., "--output", "-o", help="output directory for the pruned checkpoint"),
        ratio: Optional[float] = typer.Option(None, help="fraction of TOTAL parameters to remove"),
        target_params: Optional[int] = typer.Option(None, "--target-params", help="parameter count to land on"),
        importance: str = typer.Option("taylor", help="taylor|vectorwise|second_order|l1|l2|random"),
        aggregation: str = typer.Option("sum", help="group aggregation: sum|mean|max"),
        allocation: str = typer.Option("uniform", help="uniform (LLM-Pruner) | adaptive (Adapt-Pruner)"),
        stages: int = typer.Option(1, help="prune in T steps, rescoring each time"),
        round_to: int = typer.Option(8, "--round-to", help="MLP widths are multiples of this"),
        skip_first: Optional[int] = typer.Option(None, help="leading layers left unpruned (uniform; "
                                                 "default 10% of layers, at least 1)"),
        skip_last: int = typer.Option(1, help="trailing layers left unpruned (uniform)"),
        adaptive_strength: float = typer.Option(0.02, help="A in s_l = s_base - A*I_l (adaptive)"),
        prune_layers: int = typer.Option(0, help="also drop this many whole layers (block influence)"),
        attention: bool = typer.Option(True, "--attention/--no-attention", help="prune KV groups"),
        mlp: bool = typer.Option(True, "--mlp/--no-mlp", help="prune MLP channels"),
        calibration: Optional[Path] = typer.Option(None, help="calibration text file (default: LAMBADA passages)"),
        calibration_samples: int = typer.Option(10, help="N calibration samples"),
        calibration_seq_len: int = typer.Option(64, help="L tokens per sample"),
        device: str = typer.Option("cpu", help="cpu | cuda | cuda:N | auto (shard over all GPUs)"),
        seed: int = typer.Option(0),
        save_plan: bool = typer.Option(True, help="write plan.json next to the checkpoint"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    ) -> None:
        """Prune MODEL structurally to a parameter budget and export a Hugging Face checkpoint."""
        from llm_prune.card import model_card
        from llm_prune.export import export_checkpoint, weights_bytes
        from llm_prune.families import layer_shapes
        from llm_prune.models import load_model
        from llm_prune.progress import TqdmRenderer
        from llm_prune.prune import prune_model

        budget = build_budget(ratio, target_params)
        cfg = build_pruning(importance=importance, aggregation=aggregation, allocation=allocation, stages=stages,
                            round_to=round_to, skip_first=skip_first, skip_last=skip_last,
                            adaptive_strength=adaptive_strength, prune_layers=prune_layers,
                            prune_attention=attention, prune_mlp=mlp,
                            calibration=str(calibration) if calibration else None,
                            calibration_samples=calibration_samples, calibration_seq_len=calibration_seq_len,
                            seed=seed)
        if calibration and not calibration.is_file():
            raise UserError(f"calibration file not found: {calibration}", param="calibration")
        if output.exists() and output.is_file():
            raise UserError(f"output {output} is a file; give a directory", param="output")
        renderer = TqdmRenderer(disable=as_json)
        t0 = time.perf_counter()
        lm, tok = load_model(model, device=device)
        load_s = time.perf_counter() - t0
        shapes_before = layer_shapes(lm)
        bytes_per_param = next(lm.parameters()).element_size()
        t1 = time.perf_counter()
        result = prune_model(lm, tok, budget, cfg, on_event=renderer)
        prune_s = time.perf_counter() - t1
        shapes_after = layer_shapes(lm)
        recipe = {"model": model, "budget": budget.model_dump(exclude_none=True), "pruning": cfg.model_dump()}
        t2 = time.perf_counter()
        info = export_checkpoint(lm, tok, output, extra_meta={"recipe": recipe, "base_model": model})
        export_s = time.perf_counter() - t2
        if save_plan:
            import json

            (output / "plan.json").write_text(json.dumps([p.to_dict() for p in result.plans]))
        renderer.close()
        after_bytes = weights_bytes(output)
        summary = {
            "model": model, "output": str(output), "needs_remote_code": info["needs_remote_code"],
            "params_before": result.params_before, "params_after": result.params_after,
            "params_target": result.params_target,
            "removed_fraction": 1 - result.params_after / result.params_before,
            "target_error": (result.params_after - result.params_target) / result.params_target,
            "weights_bytes_before": result.params_before * bytes_per_param, "weights_bytes_after": after_bytes,
            "layers_before": [s.as_dict() for s in shapes_before],
            "layers_after": [s.as_dict() for s in shapes_after],
            "timings": {"load_s": load_s, "prune_s": prune_s, "export_s": export_s, **result.timings},
            "peak_rss_bytes": peak_rss_bytes(),
        }
        card = model_card(base_model=model, recipe=recipe, shapes=shapes_after,
                          params_before=result.params_before, params_after=result.params_after,
                          needs_remote_code=info["needs_remote_code"],
                          metrics={k: summary[k] for k in ("params_before", "params_after", "removed_fraction",
                                                           "timings", "peak_rss_bytes")})
        (output / "README.md").write_text(card)
        if as_json:
            emit_json(summary)
            return
        typer.echo(render_table(summary))


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
            f"\nsaved to {s['output']}" + (" (load with trust_remote_code=True)" if s["needs_remote_code"] else ""))
    return out
