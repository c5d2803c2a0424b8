"""`llm-prune eval MODEL`: perplexity, zero-shot tasks and speed, optionally against a second model."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path
from typing import List, Optional

import typer

from llm_prune.errors import UserError, first_line


def _check_not_an_input(output: Path, sources, files) -> None:
    """--output must not replace what the evaluation reads: a file of a model folder or the text."""
    target = output.expanduser().resolve()
    for f in files:
        if f is None:
            continue
        text = Path(f).expanduser().resolve()
        if text == target or (text.is_dir() and text in target.parents):  # a saved dataset is a folder
            raise UserError(f"--output {output} is (inside) the text being measured; give another file name",
                            param="output")
    for source in sources:
        if not source.is_local:
            continue
        root = Path(source.path).expanduser().resolve()
        if source.gguf_file:  # a .gguf file: only the file itself
            if target == root / source.gguf_file:
                raise UserError(f"--output {output} is the model file; give another file name", param="output")
            continue
        if target == root or (root.is_dir() and root in target.parents):
            raise UserError(f"--output {output} is inside the model folder {source.path}; give a file elsewhere "
                            "(--record stores results with the model)", param="output")


@contextmanager
def _library_bars_off():
    """Silence the bars transformers draws itself while loading (weights, a GGUF's dequantizing,
    the alias cache's save), which --quiet and --json promise too; restored afterwards. The GGUF
    bar is a plain tqdm that transformers' switch does not reach: it is made a disabled one."""
    from transformers import modeling_gguf_pytorch_utils as gguf_loading
    from transformers.utils import logging as hf_logging

    was_enabled, gguf_bar = hf_logging.is_progress_bar_enabled(), gguf_loading.tqdm
    hf_logging.disable_progress_bar()
    gguf_loading.tqdm = partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        gguf_loading.tqdm = gguf_bar
        if was_enabled:
            hf_logging.enable_progress_bar()


def _check_models(sources, lens, measures_ppl: bool) -> None:
    """What can be refused from each model's files, for all of them before any is evaluated: the
    second model failing after the first was scored (which may take hours) would lose its results."""
    from llm_prune.evaluate.harness import check_seq_lens
    from llm_prune.models import check_model_files, context_length

    for source in sources:
        check_model_files(source)
        context = context_length(source) if measures_ppl else None
        if context is not None:
            check_seq_lens(lens, context, whose=f"{source.spec}'s" if len(sources) > 1 else "the model's")


def _publish(payload: dict, results: dict, other: dict | None, *, names, as_json: bool, output, record_dir,
             record) -> None:
    """Show the results, then write them to --output and --record (shown first: a file that cannot
    be written afterwards does not lose them)."""
    from llm_prune.cli.common import emit_json, json_text
    from llm_prune.evaluate import format_table, write_eval_results

    if as_json:
        emit_json(payload)
    else:
        typer.echo(format_table(results, compare=other, names=names))
        if results.get("ppl"):
            typer.echo(f"\nperplexity: {results['ppl']['convention']}")
    try:
        if output is not None:
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_text(json_text(payload) + "\n")
        if record_dir is not None:
            write_eval_results(record_dir, results, name=record)
    except (OSError, UnicodeError) as exc:
        where = getattr(exc, "filename", None) or output or record_dir
        raise UserError(f"results shown above, but could not write {where}: "
                        f"{getattr(exc, 'strerror', None) or first_line(exc, 200)}", param="output") from None


def _evaluate_one(spec: str, *, device: str, text: str | None, lens: list[str], max_windows, tasks, limit,
                  batch_size: int, speed: bool, renderer) -> dict:
    from llm_prune.evaluate import evaluate_model
    from llm_prune.models import load_model, resolve_source

    source = resolve_source(spec)
    model, tokenizer = load_model(spec, device=device)
    checkpoint = None  # what --speed reports the size on disk of
    if source.is_local:
        checkpoint = Path(source.path) / source.gguf_file if source.gguf_file else source.path
    results = evaluate_model(model, tokenizer, ppl_text=text, seq_len=lens, max_windows=max_windows, tasks=tasks,
                             limit=limit, speed=speed, checkpoint_dir=checkpoint, batch_size=batch_size,
                             on_event=renderer)
    results["model"] = spec
    return results


def eval_command(
    model: str = typer.Argument(..., help="Hub id, local model directory, .gguf file or alias (smollm2-135m)."),
    ppl: Optional[Path] = typer.Option(None, "--ppl", help="Text file for perplexity."),
    ppl_dataset: Optional[str] = typer.Option(None, "--ppl-dataset",
                                              help="`datasets` name or saved folder for perplexity."),
    split: Optional[str] = typer.Option(None, "--split", help="Split of --ppl-dataset (default: test)."),
    column: Optional[str] = typer.Option(None, "--column", help="Text column of --ppl-dataset (default: text)."),
    seq_len: Optional[List[str]] = typer.Option(None, "--seq-len",
                                                help="Perplexity window(s): repeat or comma-separate, e.g. "
                                                     "128,2048; 'max' = the model's context length (default 128)."),
    max_windows: Optional[int] = typer.Option(None, "--max-windows", min=1, help="Score at most N windows."),
    tasks: Optional[str] = typer.Option(None, "--tasks",
                                        help="Comma list of boolq, piqa, hellaswag, winogrande, arc_easy, "
                                             "arc_challenge, openbookqa, mmlu, mmlu_5shot; or 'all' (the seven)."),
    limit: Optional[int] = typer.Option(None, "--limit", min=1, help="First N items per task (per subject for MMLU)."),
    batch_size: int = typer.Option(16, "--batch-size", min=1, help="Sequences per forward pass."),
    speed: bool = typer.Option(False, "--speed", help="Measure parameters, size, prefill/decode tokens/s, memory."),
    compare: Optional[str] = typer.Option(None, "--compare", help="Second model: side-by-side table with ratios."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, cuda:N or auto."),
    as_json: bool = typer.Option(False, "--json", help="Print results as JSON instead of a table."),
    output: Optional[Path] = typer.Option(None, "--output", help="Also write the JSON results to this file."),
    record: Optional[str] = typer.Option(None, "--record",
                                         help="Store results under this name in MODEL's eval_results.json "
                                              "and model card (MODEL must be a local directory)."),
    quiet: bool = typer.Option(False, "--quiet", help="No progress bars."),
) -> None:
    """Perplexity, zero-shot accuracy (lm-eval prompts) and speed of MODEL."""
    from llm_prune.evaluate import parse_tasks, read_text_dataset, read_text_file
    from llm_prune.evaluate.harness import parse_seq_lens
    from llm_prune.evaluate.tasks import check_task_data
    from llm_prune.models import resolve_source
    from llm_prune.progress import TqdmRenderer

    if ppl is not None and ppl_dataset is not None:
        raise UserError("give either --ppl FILE or --ppl-dataset, not both", param="ppl")
    if ppl_dataset is None and (split is not None or column is not None):  # they would silently do nothing
        given = " and ".join(f for f, v in (("--split", split), ("--column", column)) if v is not None)
        raise UserError(f"{given} choose{'s' if ' and ' not in given else ''} the text of --ppl-dataset, which is not "
                        "given" + (" (--ppl reads the whole file)" if ppl is not None else ""), param="split")
    task_names = parse_tasks(tasks)
    check_task_data(task_names)
    lens = parse_seq_lens(seq_len or ["128"])
    if ppl is None and ppl_dataset is None and (seq_len or max_windows is not None):  # likewise
        given = " and ".join(f for f, v in (("--seq-len", seq_len), ("--max-windows", max_windows)) if v)
        raise UserError(f"{given} set{'s' if ' and ' not in given else ''} the perplexity windows, which need "
                        "--ppl FILE or --ppl-dataset", param="seq_len")
    if ppl is None and ppl_dataset is None and not task_names and not speed:
        raise UserError("nothing to measure: give --ppl FILE, --ppl-dataset, --tasks and/or --speed", param="model")
    # Everything that can be refused is, before the evaluation, which may take hours.
    sources = [resolve_source(model)] + ([resolve_source(compare)] if compare else [])
    if output is not None:
        from llm_prune.paths import check_output_file

        output = check_output_file(output, label="--output")
        _check_not_an_input(output, sources, [ppl, ppl_dataset])
    record_dir = None
    if record is not None:  # `--record ''` too: it would otherwise store nothing without a word
        if not record.strip():
            raise UserError("--record needs a name to store the results under, e.g. --record pruned", param="record")
        from llm_prune.paths import check_utf8

        check_utf8(record, "record", "--record")  # the name goes into eval_results.json and the card
        source = sources[0]
        if not (source.is_local and Path(source.path).is_dir()) or source.gguf_file:
            raise UserError("--record needs MODEL to be a local model directory", param="record")
        record_dir = source.path
    _check_models(sources, lens, measures_ppl=ppl is not None or ppl_dataset is not None)
    text = read_text_file(ppl) if ppl is not None else (
        read_text_dataset(ppl_dataset, split, column or "text") if ppl_dataset is not None else None)

    renderer = TqdmRenderer(disable=quiet or as_json)
    common = dict(device=device, text=text, lens=lens, max_windows=max_windows, tasks=task_names, limit=limit,
                  batch_size=batch_size, speed=speed, renderer=renderer)
    other = failed = None
    try:
        with _library_bars_off() if quiet or as_json else nullcontext():
            results = _evaluate_one(model, **common)
            if compare:
                try:
                    other = _evaluate_one(compare, **common)
                except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - raised again once MODEL's are out
                    failed = exc
    finally:
        renderer.close()
    payload = {"model": results, "compare": other} if compare else results
    _publish(payload, results, other, names=(model, compare or ""), as_json=as_json, output=output,
             record_dir=record_dir, record=record)
    if isinstance(failed, UserError):
        raise UserError(f"--compare {compare}: {failed.message} (the results of {model} are shown above)",
                        param="compare") from None
    if failed is not None:
        raise failed


def register(app) -> None:
    app.command("eval")(eval_command)
