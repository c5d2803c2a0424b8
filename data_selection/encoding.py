"""One record -> the token ids a model sees, for PASER's scoring and for recovery training alike:
the same template (`pool.format_example`), the same BOS rule and the same truncation, so the
degradation PASER measures is over exactly the tokens recovery trains on."""

from __future__ import annotations

from dataclasses import dataclass

from data_selection.pool import Record, format_example

IGNORE_INDEX = -100  # labels the loss skips (prompt and padding)


@dataclass
class Encoded:
    input_ids: list[int]
    response_start: int  # index of the first response token: the loss (and PASER's JSD) starts here
    untruncated: int  # prompt + response tokens before truncation: the training cost of a record

    @property
    def labels(self) -> list[int]:
        return [IGNORE_INDEX] * self.response_start + self.input_ids[self.response_start:]


def encode_example(tokenizer, record: Record, cutoff_len: int) -> Encoded | None:
    """The record's tokens, or None when its response has no tokens.

    A chat template writes its own special tokens; otherwise the tokenizer adds BOS (if it has one)
    to the prompt. Long examples keep the end of the prompt (where the question and the answer
    header are) and the start of the response: the prompt gets at least half of `cutoff_len` when
    both do not fit."""
    prompt_text, response_text = format_example(tokenizer, record)
    templated = bool(getattr(tokenizer, "chat_template", None))
    prompt_ids = tokenizer(prompt_text, add_special_tokens=not templated)["input_ids"]
    response_ids = tokenizer(response_text, add_special_tokens=False)["input_ids"]
    if not response_ids:
        return None
    total = len(prompt_ids) + len(response_ids)
    if total > cutoff_len:
        prompt_budget = max(cutoff_len - len(response_ids), cutoff_len // 2)
        prompt_ids = prompt_ids[-prompt_budget:] if prompt_budget > 0 else []
        response_ids = response_ids[:cutoff_len - len(prompt_ids)]  # keeps >= cutoff_len // 2 tokens
    return Encoded(list(prompt_ids) + list(response_ids), len(prompt_ids), total)
