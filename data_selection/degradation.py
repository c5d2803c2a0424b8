"""Capability degradation per sample: the Jensen-Shannon divergence between the original and the
pruned model's next-token distributions over the response tokens (mean per token, in nats, at most
ln 2). The same forward passes give each model's per-sample loss for the `loss` baseline.

Only the hidden states at response positions go through the LM head, in bounded chunks: with a
50k vocabulary the full (batch x length x vocab) logits would dominate memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from data_selection.encoding import encode_example
from data_selection.pool import Record
from llm_prune.errors import UserError
from llm_prune.lm_loss import decoder_hidden, log_probs
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback


@dataclass
class SampleScores:
    jsd: np.ndarray  # mean JSD per response token
    loss_original: np.ndarray  # mean NLL of the response under the original model
    loss_pruned: np.ndarray
    tokens: np.ndarray  # prompt + response tokens (before truncation): the training cost of a sample

    @property
    def loss_increase(self) -> np.ndarray:
        return self.loss_pruned - self.loss_original


def _encode(tokenizer, record: Record, max_length: int) -> tuple[list[int], int, int]:
    """(ids, first scored position, untruncated length): recovery's encoding of the record. The
    first token has nothing before it to be predicted from, so scoring starts at position 1 at least."""
    enc = encode_example(tokenizer, record, max_length)
    if enc is None:
        raise UserError(f"record {record.source_id} has no response tokens", param="pool")
    return enc.input_ids, max(1, enc.response_start), enc.untruncated


@torch.no_grad()
def score_records(records: list[Record], original, pruned, *, batch_tokens: int = 4096, max_length: int = 256,
                  chunk: int = 512, on_event: ProgressCallback = null_callback,
                  stage: str = "score") -> SampleScores:
    """Score records with both models. `original`/`pruned` are (model, tokenizer) pairs sharing the
    vocabulary. Batches hold about `batch_tokens` tokens after padding; records run longest first."""
    model_o, tok = original
    model_p, _ = pruned
    device = next(model_o.parameters()).device
    device_p = next(model_p.parameters()).device
    encoded = [_encode(tok, r, max_length) for r in records]
    n = len(records)
    jsd = np.zeros(n)
    loss_o = np.zeros(n)
    loss_p = np.zeros(n)
    tokens = np.array([e[2] for e in encoded], dtype=np.int64)
    order = sorted(range(n), key=lambda i: -len(encoded[i][0]))
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    on_event(ProgressEvent(stage, 0, n, kind="stage_start"))
    done = 0
    while done < n:
        width = len(encoded[order[done]][0])
        size = max(1, min(batch_tokens // max(width, 1), n - done))
        batch = order[done:done + size]
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        pos, tgt, owner = [], [], []
        for row, i in enumerate(batch):
            seq, start, _ = encoded[i]
            ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
            for t in range(start, len(seq)):  # position t-1 predicts token t
                pos.append(row * width + t - 1)
                tgt.append(seq[t])
                owner.append(row)
        positions = torch.tensor(pos)
        targets = torch.tensor(tgt)
        owners = torch.tensor(owner)
        sums = torch.zeros((3, len(batch)), dtype=torch.float64)
        hidden_o = decoder_hidden(model_o, ids.to(device), mask.to(device))
        hidden_p = decoder_hidden(model_p, ids.to(device_p), mask.to(device_p))
        pairs = zip(log_probs(model_o, hidden_o, positions, chunk), log_probs(model_p, hidden_p, positions, chunk))
        for c, (lo, lp) in enumerate(pairs):
            lp = lp.to(lo.device)
            sl = slice(c * chunk, c * chunk + lo.shape[0])
            t = targets[sl].to(lo.device)
            # JSD = H(M) - (H(P) + H(Q)) / 2 written with logs: stable when either side is ~0.
            log_m = torch.logaddexp(lo, lp) - math.log(2.0)
            kl_o = (lo.exp() * (lo - log_m)).sum(-1)
            kl_p = (lp.exp() * (lp - log_m)).sum(-1)
            per_tok = (0.5 * (kl_o + kl_p)).clamp_min(0).double().cpu()
            who = owners[sl]
            sums[0].index_add_(0, who, per_tok)
            sums[1].index_add_(0, who, -lo.gather(1, t[:, None]).squeeze(1).double().cpu())
            sums[2].index_add_(0, who, -lp.gather(1, t[:, None]).squeeze(1).double().cpu())
        counts = torch.bincount(owners, minlength=len(batch)).clamp_min(1).double()
        means = (sums / counts).numpy()
        jsd[batch], loss_o[batch], loss_p[batch] = means[0], means[1], means[2]
        done += len(batch)
        on_event(ProgressEvent(stage, done, n))
    on_event(ProgressEvent(stage, n, n, kind="stage_end"))
    return SampleScores(jsd=jsd, loss_original=loss_o, loss_pruned=loss_p, tokens=tokens)
