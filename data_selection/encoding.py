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
    prompt_ids, prompt_len = _token_ids(tokenizer, prompt_text, not templated, keep=cutoff_len, from_end=True)
    response_ids, response_len = _token_ids(tokenizer, response_text, False, keep=cutoff_len, from_end=False)
    if not response_len:
        return None
    total = prompt_len + response_len
    if total > cutoff_len:
        prompt_budget = max(cutoff_len - response_len, cutoff_len // 2)
        prompt_ids = prompt_ids[-prompt_budget:] if prompt_budget > 0 else []
        response_ids = response_ids[:cutoff_len - len(prompt_ids)]  # keeps >= cutoff_len // 2 tokens
    return Encoded(list(prompt_ids) + list(response_ids), len(prompt_ids), total)


# Text longer than this is not tokenized in one call: a call holds token objects (offsets, word
# ids) in proportion to the text, for the few hundred tokens a record keeps.
PIECE_CHARS = 100_000


def _token_ids(tokenizer, text: str, add_special_tokens: bool, keep: int, from_end: bool) -> tuple[list[int], int]:
    """(ids, count): the text's token ids, of which a long text keeps only the `keep` at its end
    (`from_end`) or start, and its whole token count.

    For a long text the kept ids come from a window at that end, grown until it holds more than
    `keep` tokens (tokenization differs only at the window's cut edge, which is not kept), and the
    count is summed over pieces cut before a space that starts a word (where a byte-level BPE
    pre-tokenizer splits anyway: exact there; within a token per piece for other tokenizers)."""
    if len(text) <= PIECE_CHARS:
        ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
        return ids, len(ids)
    count = len(tokenizer("", add_special_tokens=add_special_tokens)["input_ids"])  # BOS, if added
    for piece in _pieces(text):
        count += len(tokenizer(piece, add_special_tokens=False)["input_ids"])
    width = PIECE_CHARS
    while True:
        part = text[-width:] if from_end else text[:width]
        ids = tokenizer(part, add_special_tokens=add_special_tokens and (not from_end or width >= len(text)))["input_ids"]
        if len(ids) > keep + 1 or width >= len(text):
            return (ids[-keep:] if from_end else ids[:keep]), count
        width *= 2


def _pieces(text: str):
    start = 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = text.rfind(" ", start + 1, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1:cut + 2].isspace()):
            cut = text.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end  # no word boundary in the piece: cut anywhere
        yield text[start:cut]
        start = cut
    yield text[start:]
