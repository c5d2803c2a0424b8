"""`evaluate_model`: perplexity, zero-shot tasks and speed of one model, as one JSON-ready dict."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Iterable

from llm_prune.errors import UserError
from llm_prune.evaluate.ppl import perplexity, read_text_file
from llm_prune.evaluate.scoring import model_max_length, score_items
from llm_prune.evaluate.speed import SpeedConfig, count_parameters, measure_speed
from llm_prune.evaluate.tasks import COMMONSENSE_TASKS, PRIMARY_METRIC, check_task_data, load_task, parse_tasks
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback


def average_stderr(tasks: dict) -> float:
    """Standard error of the plain average of `evaluate_model`'s tasks (independent tasks, each
    with its primary metric's standard error)."""
    return sum(v[v["metric"] + "_stderr"] ** 2 for v in tasks.values()) ** 0.5 / len(tasks)


def parse_seq_lens(seq_len) -> list[int | str]:
    """Window lengths as given: integers of at least 2, or "max" for the model's context length;
    repeated and "128,2048" lists both work. Checked before any model is loaded."""
    if isinstance(seq_len, (int, str)):
        seq_len = [seq_len]
    values: list[int | str] = []
    for part in (p.strip().lower() for s in seq_len for p in str(s).split(",")):
        if not part:
            continue
        # ASCII digits only: str.isdigit() also takes '²' (int() refuses it) and '٣' (int() reads 3).
        if part != "max" and (not (part.isascii() and part.isdigit()) or int(part) < 2):
            raise UserError(f"--seq-len takes integers of at least 2 or 'max', got '{part}'", param="seq_len")
        values.append(part if part == "max" else int(part))
    if not values:
        raise UserError("--seq-len needs at least one value", param="seq_len")
    return values


def _seq_lens(seq_len, model_max: int) -> list[int]:
    """`parse_seq_lens` with "max" made the model's context length, each length once."""
    return list(dict.fromkeys(model_max if v == "max" else v for v in parse_seq_lens(seq_len)))


def check_seq_lens(seq_len, model_max: int, whose: str = "the model's") -> list[int]:
    """`_seq_lens`, refusing windows longer than the context: positions the model never learnt
    (`run` and `prune` refuse such windows too)."""
    lens = _seq_lens(seq_len, model_max)
    too_long = [n for n in lens if n > model_max]
    if too_long:
        raise UserError(f"--seq-len {too_long[0]} is longer than {whose} context of {model_max} tokens; "
                        "use 'max' for the whole context", param="seq_len")
    return lens


def evaluate_model(model, tokenizer, *, ppl_file: str | Path | None = None, ppl_text: str | None = None,
                   seq_len: int | str | Iterable[int | str] = 128, max_windows: int | None = None,
                   tasks: str | Iterable[str] = (), limit: int | None = None, speed: bool = False,
                   speed_config: SpeedConfig | None = None, checkpoint_dir: str | Path | None = None,
                   batch_size: int = 16, on_event: ProgressCallback = null_callback) -> dict:
    """Evaluate `model`; returns a JSON-serialisable dict.

    Keys: "params"; "ppl" (first requested seq_len: ppl, seq_len, windows, tokens, convention) and
    "ppl_by_seq_len" when a text is given; "tasks" {name: {acc, acc_norm, n, metric}} and "average"
    (mean of each commonsense task's reported metric) when tasks are given; "speed" when asked.
    """
    task_names = parse_tasks(list(tasks) if not isinstance(tasks, str) else tasks)
    check_task_data(task_names)
    max_len = model_max_length(model, default=2048)
    measures_ppl = ppl_text is not None or ppl_file is not None
    lens = check_seq_lens(seq_len, max_len) if measures_ppl else _seq_lens(seq_len, max_len)
    if ppl_file is not None and ppl_text is None:
        ppl_text = read_text_file(ppl_file)
    model.eval()
    results: dict = {"params": count_parameters(model)}
    started = time.perf_counter()
    if ppl_text is not None:
        by_len: dict[str, dict] = {}
        for length in lens:
            by_len[str(length)] = perplexity(model, tokenizer, ppl_text, seq_len=length, max_windows=max_windows,
                                             batch_size=batch_size, on_event=on_event)
        results["ppl"] = next(iter(by_len.values()))
        results["ppl_by_seq_len"] = by_len
    if task_names:
        scored: dict[str, dict] = {}
        for name in task_names:
            t0 = time.perf_counter()
            items = load_task(name, limit)
            res = score_items(model, tokenizer, items, batch_size=batch_size, on_event=on_event,
                              stage=f"eval:{name}")
            res["metric"] = PRIMARY_METRIC.get(name, "acc")
            res["seconds"] = time.perf_counter() - t0
            scored[name] = res
            on_event(ProgressEvent(stage="eval", kind="metric", message=name,
                                   metrics={res["metric"]: res[res["metric"]], "n": res["n"]}))
        results["tasks"] = scored
        in_avg = [n for n in task_names if n in COMMONSENSE_TASKS]
        if in_avg:
            results["average"] = sum(scored[n][scored[n]["metric"]] for n in in_avg) / len(in_avg)
            results["average_over"] = in_avg
        results["limit"] = limit
    if speed:
        results["speed"] = measure_speed(model, tokenizer, checkpoint_dir=checkpoint_dir, config=speed_config,
                                         on_event=on_event)
    results["seconds"] = time.perf_counter() - started
    return results
