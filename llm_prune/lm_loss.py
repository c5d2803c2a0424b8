"""The LM head applied in chunks of tokens: with a large vocabulary the [tokens x vocab] logits
are the largest activation of a small model, so they never exist all at once. One helper for the
calibration loss (importance scoring, with gradients), perplexity and PASER's per-token
distributions."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn


def decoder_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def log_probs(model: nn.Module, hidden: torch.Tensor, positions: torch.Tensor,
              chunk_tokens: int = 512) -> Iterator[torch.Tensor]:
    """fp32 log-probabilities at the flat `positions` of `hidden` ([batch, seq, dim]), a chunk at a time."""
    head = model.get_output_embeddings()
    flat = hidden.reshape(-1, hidden.shape[-1])
    positions = positions.to(flat.device)  # a device-mapped model ends on its last device
    for start in range(0, positions.numel(), chunk_tokens):
        yield torch.log_softmax(head(flat[positions[start:start + chunk_tokens]]).float(), dim=-1)


def next_token_nll(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """Summed next-token loss over `input_ids` (no padding). With gradients on, each chunk of the
    head is checkpointed, so backward recomputes its logits instead of keeping them. A model that
    does not expose its decoder and head separately runs whole."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    if head is None or not hasattr(model, "get_decoder"):
        logits = model(input_ids=input_ids, use_cache=False).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 input_ids[:, 1:].reshape(-1).to(logits.device), reduction="sum")
    hidden = decoder_hidden(model, input_ids)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    labels = input_ids[:, 1:].reshape(-1).to(h.device)

    def chunk_loss(h_part: torch.Tensor, y_part: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(head(h_part).float(), y_part, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, h.shape[0], chunk_tokens):
        part = (h[start:start + chunk_tokens], labels[start:start + chunk_tokens])
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(chunk_loss, *part, use_reentrant=False)
        else:
            total = total + chunk_loss(*part)
    return total


def causal_lm_loss(model: nn.Module, input_ids: torch.Tensor, chunk_tokens: int = 256) -> torch.Tensor:
    """Mean next-token loss."""
    return next_token_nll(model, input_ids, chunk_tokens) / (input_ids.shape[0] * (input_ids.shape[1] - 1))
