"""`llm-prune export CHECKPOINT --format gguf -o OUT.gguf`: a checkpoint as a file serving engines load."""

from __future__ import annotations

import re
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
        dtype: str = typer.Option(None, help="f32 | f16 | q8_0; default: the one the file name names "
                                  "(model-q8_0.gguf), else f16"),
        force: bool = typer.Option(False, "--force", help="overwrite OUTPUT if it exists"),
        as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    ) -> None:
        """Export CHECKPOINT for serving engines: GGUF for llama.cpp / Ollama (per-layer widths kept)."""
        from llm_prune.errors import UserError
        from llm_prune.gguf_export import check_dtype, export_gguf

        if fmt not in FORMATS:
            raise UserError(f"unsupported format '{fmt}': use one of {', '.join(FORMATS)}", param="format")
        dtype = _dtype_for(output, dtype)
        check_dtype(dtype)
        info = export_gguf(checkpoint, output, dtype=dtype, force=force)
        if as_json:
            emit_json(info)
            return
        typer.echo(f"wrote {info['path']} ({human_bytes(info['bytes'])}, {info['dtype']}, architecture "
                   f"{info['architecture']}, {info['layers']} layers, context {info['context_length']:,} tokens)")


def _dtype_for(output: Path, dtype: str | None) -> str:
    """The dtype asked for, or the one the file name names (llama.cpp's and `prune --gguf`'s
    `model-q8_0.gguf`), else f16; a name naming another dtype than --dtype would mislabel the file."""
    from llm_prune.errors import UserError

    named = {m.lower() for m in re.findall(r"(?<![a-z0-9])(f32|f16|q8_0)(?![a-z0-9])", output.stem, re.IGNORECASE)}
    if dtype is None:
        if len(named) > 1:
            raise UserError(f"the file name {output.name} names {' and '.join(sorted(named))}: give --dtype",
                            param="dtype")
        return named.pop() if named else "f16"
    if named and dtype.lower() not in named:
        raise UserError(f"--dtype {dtype} but the file name {output.name} says {'/'.join(sorted(named))}: rename the "
                        "output or leave --dtype out", param="dtype")
    return dtype
