"""`llm-prune export CHECKPOINT --format gguf -o OUT.gguf`: a checkpoint as a file serving engines load."""

from __future__ import annotations

from pathlib import Path

import typer

from llm_prune.cli.common import emit_json, human_bytes

FORMATS = ("gguf",)


def register(app: typer.Typer) -> None:
    @app.command("export")
    def export_cmd(
        checkpoint: Path = typer.Argument(..., help="Hugging Face checkpoint folder (e.g. written by `prune`)"),
        output: Path = typer.Option(..., "--output", "-o", help="output file, e.g. model.gguf"),
        fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp, Ollama, LM Studio)"),
        dtype: str = typer.Option("f16", help="f32 | f16 | q8_0"),
        force: bool = typer.Option(False, "--force", help="overwrite OUTPUT if it exists"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    ) -> None:
        """Export CHECKPOINT for serving engines: GGUF for llama.cpp / Ollama (per-layer widths kept)."""
        from llm_prune.errors import UserError
        from llm_prune.gguf_export import check_dtype, export_gguf

        if fmt not in FORMATS:
            raise UserError(f"unsupported format '{fmt}': use one of {', '.join(FORMATS)}", param="format")
        check_dtype(dtype)
        info = export_gguf(checkpoint, output, dtype=dtype, force=force)
        if as_json:
            emit_json(info)
            return
        typer.echo(f"wrote {info['path']} ({human_bytes(info['bytes'])}, {info['dtype']}, architecture "
                   f"{info['architecture']}, {info['layers']} layers, context {info['context_length']:,} tokens)")
