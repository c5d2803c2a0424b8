"""Perplexity over non-overlapping windows, the convention of LLM-Pruner's tables.

The whole text is tokenized once (with the tokenizer's usual special tokens), cut into
consecutive windows of `seq_len` tokens (a trailing partial window is dropped), and each window
is scored independently: perplexity = exp(mean next-token loss over every scored token of every
window). Each window predicts seq_len - 1 tokens, so short windows (128) give higher
perplexity than long ones (2048) on the same text.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from llm_prune.errors import UserError
from llm_prune.evaluate.scoring import model_device, not_finite
from llm_prune.lm_loss import next_token_nll
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback

CONVENTION = "non-overlapping windows, exp(mean token loss) (LLM-Pruner)"


def exp_loss(mean_nll: float) -> float:
    """exp(mean loss), infinite past float range (a mean loss above ~709 nats: a badly broken
    model) instead of math.exp's OverflowError; `nll` keeps the finite mean loss."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def read_text_file(path: str | Path) -> str:
    path = Path(path).expanduser()
    if not path.is_file():
        what = ("is a directory, not a text file" if path.is_dir()
                else "is not a regular file (a pipe or a device)" if path.exists() else "not found")
        raise UserError(f"perplexity text file {what}: {path}", param="ppl")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is no text (calibration drops it too)
    except UnicodeDecodeError:
        raise UserError(f"perplexity text file is not UTF-8 text: {path}", param="ppl") from None
    if not text.strip():
        raise UserError(f"perplexity text file is empty: {path}", param="ppl")
    return text


def read_text_dataset(name_or_dir: str, split: str | None = None, column: str = "text") -> str:
    """Rows of a `datasets` dataset (saved folder or hub name) joined by blank lines, as LLM-Pruner
    joins WikiText-2. `split` defaults to "test"; a folder saved as one split has none to choose."""
    import datasets

    local = Path(name_or_dir).expanduser()
    given, split = split is not None, split or "test"
    try:
        if local.is_dir():
            ds = datasets.load_from_disk(str(local))
            if not isinstance(ds, datasets.DatasetDict) and given:  # the flag would be silently ignored
                raise UserError(f"{name_or_dir} is a single split; --split {split} does not apply to it",
                                param="split")
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise UserError(f"split '{split}' not in {name_or_dir}; it has: {', '.join(ds)}", param="split")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name_or_dir, split=split)
    except UserError:
        raise
    except (FileNotFoundError, ValueError, ConnectionError, OSError, KeyError, TypeError) as exc:
        # KeyError, TypeError: a saved folder whose dataset_dict.json or state files are not datasets' own
        raise UserError(f"could not load dataset '{name_or_dir}' (split {split}): "
                        f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", param="ppl_dataset") from None
    if column not in ds.column_names:
        raise UserError(f"column '{column}' not in dataset; it has: {', '.join(ds.column_names)}", param="column")
    feature = ds.features.get(column)
    if getattr(feature, "dtype", None) not in ("string", "large_string"):  # numbers, lists: no text to score
        raise UserError(f"column '{column}' of the dataset holds {feature}, not text; give a string column with "
                        "--column", param="column")
    return "\n\n".join(t for t in ds[column] if t is not None)


def perplexity(model, tokenizer, text: str, seq_len: int = 128, max_windows: int | None = None,
               batch_size: int = 8, max_batch_tokens: int = 4096,
               on_event: ProgressCallback = null_callback) -> dict:
    """Perplexity of `model` on `text`; returns {"ppl", "nll", "seq_len", "windows", "tokens", ...}."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}", param="seq_len")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"--max-windows must be at least 1, got {max_windows}", param="max_windows")
    ids = torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)
    n_windows = ids.numel() // seq_len
    if n_windows == 0:
        raise UserError(f"the text has {ids.numel()} tokens, fewer than one window of {seq_len}", param="ppl")
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    windows = ids[: n_windows * seq_len].view(n_windows, seq_len)
    # Bound the [batch, seq, vocab] logits: at 2048 tokens one window at a time.
    batch = max(1, min(batch_size, max_batch_tokens // seq_len))
    device = model_device(model)
    stage = f"ppl@{seq_len}"
    total_nll = 0.0
    model.eval()
    on_event(ProgressEvent(stage=stage, step=0, total=n_windows, kind="stage_start"))
    with torch.inference_mode():
        for start in range(0, n_windows, batch):
            chunk = windows[start:start + batch].to(device)
            total_nll += float(next_token_nll(model, chunk))
            done = min(start + batch, n_windows)
            if math.isnan(total_nll):  # stays NaN: no need to score the remaining windows
                raise not_finite(f"its loss on window {start + 1}-{done} of {n_windows} at --seq-len {seq_len} "
                                 "is NaN")
            scored = done * (seq_len - 1)
            on_event(ProgressEvent(stage=stage, step=done, total=n_windows,
                                   metrics={"ppl": exp_loss(total_nll / scored)}))
    on_event(ProgressEvent(stage=stage, step=n_windows, total=n_windows, kind="stage_end"))
    scored = n_windows * (seq_len - 1)
    mean_nll = total_nll / scored
    return {"ppl": exp_loss(mean_nll), "nll": mean_nll, "seq_len": seq_len, "windows": n_windows,
            "tokens": scored, "text_tokens": int(ids.numel()), "convention": CONVENTION}
