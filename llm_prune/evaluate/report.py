"""Result tables (terminal and Markdown), side-by-side comparison, and results stored next to a
checkpoint: `eval_results.json` plus a metrics table folded into the model card."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from llm_prune.evaluate.tasks import ALL_TASK_NAMES

CARD_START = "<!-- llm-prune:eval:start -->"
CARD_END = "<!-- llm-prune:eval:end -->"
RESULTS_FILE = "eval_results.json"


def _pct(v: float) -> str:
    return f"{100 * v:.2f}"


def metric_rows(results: dict) -> list[tuple[str, float, str]]:
    """(label, value, formatted) for every number worth a table row; higher-is-better is implied
    for accuracies and throughput, lower for perplexity, size and memory."""
    rows: list[tuple[str, float, str]] = []
    if "params" in results:
        rows.append(("params (M)", results["params"] / 1e6, f"{results['params'] / 1e6:.2f}"))
    for length, p in (results.get("ppl_by_seq_len") or {}).items():
        ppl = math.inf if p["ppl"] is None else p["ppl"]  # JSON keeps an infinite perplexity as null
        rows.append((f"ppl@{length}", ppl, f"{ppl:.3f}"))
    tasks = results.get("tasks") or {}
    for name in sorted(tasks, key=lambda n: ALL_TASK_NAMES.index(n) if n in ALL_TASK_NAMES else 99):
        r = tasks[name]
        rows.append((f"{name} ({r['metric']})", r[r["metric"]], _pct(r[r["metric"]])))
    if "average" in results:
        rows.append(("average", results["average"], _pct(results["average"])))
    speed = results.get("speed") or {}
    if "weights_bytes" in speed:
        rows.append(("weights on disk (MB)", speed["weights_bytes"] / 1e6, f"{speed['weights_bytes'] / 1e6:.1f}"))
    for run in speed.get("runs", []):
        b = run["batch_size"]
        rows.append((f"prefill tok/s (batch {b})", run["prefill_tokens_per_s"], f"{run['prefill_tokens_per_s']:.1f}"))
        rows.append((f"decode tok/s (batch {b})", run["decode_tokens_per_s"], f"{run['decode_tokens_per_s']:.1f}"))
    if "peak_memory_bytes" in speed:
        mb = speed["peak_memory_bytes"] / 1e6
        rows.append(("peak memory (MB)", mb, f"{mb:.1f}"))
    return rows


def format_table(results: dict, *, compare: dict | None = None, names: tuple[str, str] = ("value", "B"),
                 markdown: bool = False) -> str:
    """One column per model; with `compare`, a B/A ratio column."""
    rows = metric_rows(results)
    header = ["metric", names[0]]
    body: list[list[str]] = []
    if compare is None:
        body = [[label, text] for label, _, text in rows]
    else:
        header += [names[1], f"{names[1]}/{names[0]}"]
        other = {label: (value, text) for label, value, text in metric_rows(compare)}
        labels = [label for label, _, _ in rows] + [lb for lb in other if lb not in {r[0] for r in rows}]
        mine = {label: (value, text) for label, value, text in rows}
        for label in labels:
            a, b = mine.get(label), other.get(label)
            ratio = f"{b[0] / a[0]:.3f}" if a and b and a[0] and math.isfinite(b[0] / a[0]) else "-"
            body.append([label, a[1] if a else "-", b[1] if b else "-", ratio])
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    from llm_prune.cli.common import table

    return table(body, header)


def _card_section(all_results: dict) -> str:
    names = list(all_results)
    per_name = {n: {label: text for label, _, text in metric_rows(all_results[n])} for n in names}
    labels: list[str] = []
    for n in names:
        labels += [lb for lb in per_name[n] if lb not in labels]
    lines = [CARD_START, "## Evaluation", "",
             "| metric | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    lines += ["| " + label + " | " + " | ".join(per_name[n].get(label, "-") for n in names) + " |" for label in labels]
    notes = []
    for n in names:
        res = all_results[n]
        if res.get("ppl"):
            notes.append(f"Perplexity ({n}): {res['ppl']['convention']}.")
        if res.get("tasks"):
            limit = res.get("limit")
            notes.append(f"Zero-shot tasks ({n}): log-likelihood multiple choice with lm-evaluation-harness prompts"
                         + (f", first {limit} items per task." if limit else ", full sets."))
    lines += [""] + list(dict.fromkeys(notes)) + ["", f"Raw numbers: `{RESULTS_FILE}`.", CARD_END]
    return "\n".join(lines)


def write_eval_results(checkpoint_dir: str | Path, results: dict, name: str = "eval") -> Path:
    """Merge `results` under `name` into `eval_results.json` and fold the table into README.md."""
    from llm_prune.cli.common import json_text
    from llm_prune.paths import write_text_atomic

    root = Path(checkpoint_dir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / RESULTS_FILE
    stored: dict = {}
    if path.exists():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            stored = None
        if not isinstance(stored, dict):  # not ours to merge into, nor to destroy: set aside
            path.replace(path.with_name(f"{RESULTS_FILE}.unreadable-{int(time.time())}"))
            stored = {}
    stored[name] = results
    write_text_atomic(path, json_text(stored) + "\n")

    card = root / "README.md"
    text = card.read_text() if card.exists() else ""
    section = _card_section(stored)
    if CARD_START in text and CARD_END in text:
        head, rest = text.split(CARD_START, 1)
        tail = rest.split(CARD_END, 1)[1]
        text = head + section + tail
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    card.write_text(text)
    return path
