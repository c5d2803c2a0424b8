"""Recovery examples: prompt/response records -> token ids with the loss on response tokens only.

Encoding (template, BOS, truncation) is `data_selection.encoding.encode_example`, shared with
PASER's scoring so selection measures the tokens training sees.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from data_selection.encoding import IGNORE_INDEX, encode_example
from data_selection.pool import Record


def as_record(record: Any) -> Record:
    """Pool records pass through; plain mappings (e.g. read from JSON) become Records."""
    if isinstance(record, Record):
        return record
    if isinstance(record, dict):
        return Record(prompt=str(record.get("prompt") or ""), response=str(record.get("response") or ""),
                      source_id=str(record.get("source_id") or ""), system=str(record.get("system") or ""))
    return Record(prompt=str(record.prompt), response=str(record.response),
                  source_id=str(getattr(record, "source_id", "")), system=str(getattr(record, "system", "") or ""))


def tokenize_example(tokenizer, record: Any, cutoff_len: int) -> dict[str, list[int]] | None:
    """Token ids and labels (prompt masked) for one record, or None when its response is empty."""
    record = as_record(record)
    if not record.response.strip():
        return None  # nothing to learn but an immediate stop
    enc = encode_example(tokenizer, record, cutoff_len)
    return None if enc is None else {"input_ids": enc.input_ids, "labels": enc.labels}


@dataclass
class TokenizedSplit:
    train: list[dict[str, list[int]]]
    eval: list[dict[str, list[int]]]
    dropped: int  # records with an empty response


def build_examples(tokenizer, records: Sequence[Any], cutoff_len: int, eval_fraction: float,
                   seed: int = 0) -> TokenizedSplit:
    """Tokenize all records and hold out `eval_fraction` of them (at least one when > 0 and
    there are at least two usable records) for the eval loss."""
    examples, dropped = [], 0
    for record in records:
        ex = tokenize_example(tokenizer, record, cutoff_len)
        if ex is None:
            dropped += 1
        else:
            examples.append(ex)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if eval_fraction > 0 and len(examples) >= 2:
        n_eval = min(len(examples) - 1, max(1, round(eval_fraction * len(examples))))
    eval_ids = set(order[:n_eval])
    return TokenizedSplit(train=[e for i, e in enumerate(examples) if i not in eval_ids],
                          eval=[e for i, e in enumerate(examples) if i in eval_ids], dropped=dropped)


class ResponseOnlyCollator:
    """Right-pads a batch; padding gets attention 0 and label IGNORE_INDEX, prompts keep their
    IGNORE_INDEX labels from tokenization."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            m = self.pad_to_multiple_of
            width = (width + m - 1) // m * m
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"], dtype=torch.long)
            labels[row, :n] = torch.tensor(f["labels"], dtype=torch.long)
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
