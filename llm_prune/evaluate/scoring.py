"""Batched log-likelihood scoring of multiple-choice items, as lm-evaluation-harness does it.

Each (context, continuation) pair is encoded like lm-eval's `_encode_pair` (no special tokens,
trailing context spaces moved into the continuation, continuation tokens = tokens of
context+continuation after those of the context), truncated from the left to the model's
length, and scored as the sum of the continuation's token log-probabilities. `acc` takes the
argmax of that sum; `acc_norm` divides it by the choice's length in characters first.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from llm_prune.errors import UserError
from llm_prune.evaluate.tasks import Item
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback


def not_finite(what: str) -> UserError:
    """A model whose outputs are NaN has no perplexity or accuracy: max() over NaN scores always
    picks the first choice, which would pass for a (poor) accuracy."""
    return UserError(f"the model's outputs are not finite (NaN): {what}; its weights are broken "
                     "(a pruning or conversion gone wrong?)", param="model")


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def model_max_length(model, default: int = 2048) -> int:
    config = getattr(model, "config", None)
    value = getattr(config, "max_position_embeddings", None) if config is not None else None
    return int(value) if value else default


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _encode(tokenizer, context + continuation)
    context_ids = _encode(tokenizer, context)
    if not context_ids:
        # Nothing to condition on: start from the end-of-text token like lm-eval.
        start = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
        return [start], whole
    return context_ids, whole[len(context_ids):]


def _forward_logits(model, input_ids, attention_mask, keep: torch.Tensor):
    """Logits at positions `keep` only: the vocabulary projection dominates memory on long batches."""
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False)
        return out.logits, keep
    except TypeError:  # a model without `logits_to_keep`
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        return out.logits, None


Row = tuple[list[int], list[tuple[int, list[int]]]]  # model input, (request index, continuation tokens)


def _batched_scores(model, rows: list[Row], n_requests: int, batch_size: int, max_batch_tokens: int,
                    pad_id: int, device, progress) -> list[float]:
    """Score rows in right-padded batches, longest first. Every continuation of a row is predicted
    by the row's last len(continuation) positions."""
    # Longest first, so the first batch shows an out-of-memory problem at once and padding is small.
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    scores = [0.0] * n_requests
    done = 0
    while done < len(order):
        width = len(rows[order[done]][0])
        n = max(1, min(batch_size, max_batch_tokens // max(width, 1)))
        batch = order[done:done + n]
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, idx in enumerate(batch):
            inp = rows[idx][0]
            input_ids[row, :len(inp)] = torch.tensor(inp)
            attention_mask[row, :len(inp)] = 1
        start = min(len(rows[i][0]) - len(cont) for i in batch for _, cont in rows[i][1])
        keep = torch.arange(start, width, device=device)
        logits, kept = _forward_logits(model, input_ids.to(device), attention_mask.to(device), keep)
        offset = start if kept is not None else 0
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        for row, idx in enumerate(batch):
            inp, targets = rows[idx]
            for req, cont in targets:
                if cont:
                    s, e = len(inp) - len(cont) - offset, len(inp) - offset
                    target = torch.tensor(cont, device=logprobs.device)
                    scores[req] = float(logprobs[row, s:e].gather(-1, target[:, None]).sum())
            progress(len(targets))
        done += len(batch)
    return scores


def loglikelihoods(model, tokenizer, requests: Sequence[tuple[str, str]], *, batch_size: int = 16,
                   max_length: int | None = None, max_batch_tokens: int = 8192, share_context: bool = True,
                   on_event: ProgressCallback = null_callback, stage: str = "eval") -> list[float]:
    """Sum of log P(continuation tokens | context) for each (context, continuation).

    With `share_context`, choices that are one token each and share a context (BoolQ " no"/" yes",
    MMLU " A".." D") are read off one forward pass of the context: the same numbers at a fraction
    of the cost. Everything else is one context+continuation row per request, as lm-eval does."""
    max_length = max_length or model_max_length(model)
    device = model_device(model)
    unique: dict[tuple[str, str], int] = {}
    for req in requests:
        unique.setdefault(tuple(req), len(unique))
    pairs = [encode_pair(tokenizer, ctx, cont) for ctx, cont in unique]
    total, done = len(pairs), 0
    on_event(ProgressEvent(stage=stage, step=0, total=total, kind="stage_start"))

    def progress(n: int) -> None:
        nonlocal done
        done += n
        on_event(ProgressEvent(stage=stage, step=done, total=total))

    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ctx, cont) in enumerate(pairs):
        groups.setdefault(tuple(ctx), []).append(i)
    rows: list[Row] = []
    for ctx, members in groups.items():
        if share_context and len(members) > 1 and all(len(pairs[i][1]) == 1 for i in members):
            rows.append((list(ctx)[-max_length:], [(i, pairs[i][1]) for i in members]))
            continue
        for i in members:
            whole = (pairs[i][0] + pairs[i][1])[-(max_length + 1):]
            n_cont = min(len(pairs[i][1]), len(whole) - 1)
            rows.append((whole[:-1], [(i, whole[-n_cont:] if n_cont else [])]))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode():
        scores = _batched_scores(model, rows, len(pairs), batch_size, max_batch_tokens, pad_id, device, progress)
    on_event(ProgressEvent(stage=stage, step=total, total=total, kind="stage_end"))
    return [scores[unique[tuple(req)]] for req in requests]


def accuracy(items: Sequence[Item], scores: Sequence[Sequence[float]]) -> dict:
    """acc and acc_norm (log-likelihood per character of the choice), as lm-eval computes them."""
    hits = hits_norm = 0
    for item, ll in zip(items, scores):
        best = max(range(len(ll)), key=lambda i: ll[i])
        norm = [v / max(len(c), 1) for v, c in zip(ll, item.choices)]
        best_norm = max(range(len(norm)), key=lambda i: norm[i])
        hits += int(best == item.gold)
        hits_norm += int(best_norm == item.gold)
    n = len(items)
    acc, acc_norm = hits / n, hits_norm / n
    return {"acc": acc, "acc_norm": acc_norm, "n": n,
            "acc_stderr": math.sqrt(acc * (1 - acc) / max(n - 1, 1)),
            "acc_norm_stderr": math.sqrt(acc_norm * (1 - acc_norm) / max(n - 1, 1))}


def score_items(model, tokenizer, items: Sequence[Item], *, batch_size: int = 16,
                on_event: ProgressCallback = null_callback, stage: str = "eval") -> dict:
    """Score every choice of every item; returns {"acc", "acc_norm", "n", stderrs}."""
    if not items:
        raise ValueError("no items to score")
    requests = [(ctx, cont) for item in items for ctx, cont in zip(item.contexts, item.continuations)]
    flat = loglikelihoods(model, tokenizer, requests, batch_size=batch_size, on_event=on_event, stage=stage)
    n_nan = sum(math.isnan(v) for v in flat)
    if n_nan:
        raise not_finite(f"{n_nan} of {len(flat)} log-likelihoods of {stage.removeprefix('eval:')} are NaN")
    scores, pos = [], 0
    for item in items:
        scores.append(flat[pos:pos + len(item.continuations)])
        pos += len(item.continuations)
    return accuracy(items, scores)
