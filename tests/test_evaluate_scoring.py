"""The multiple-choice scorer: right answers where the model makes them likely, acc vs acc_norm,
and identical numbers whichever batching path scores a request."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_prune.evaluate.scoring import accuracy, encode_pair, loglikelihoods, score_items
from llm_prune.evaluate.tasks import Item


class FixedLogits(torch.nn.Module):
    """Same next-token logits at every position: `boost` on the favoured tokens, 0 elsewhere."""

    def __init__(self, vocab_size: int, favoured=(), boost: float = 8.0):
        super().__init__()
        logits = torch.zeros(vocab_size)
        logits[list(favoured)] = boost
        self.register_buffer("row", logits)

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **kwargs):
        logits = self.row.expand(input_ids.shape[0], input_ids.shape[1], -1)
        if isinstance(logits_to_keep, torch.Tensor):
            logits = logits[:, logits_to_keep]
        elif logits_to_keep:
            logits = logits[:, -logits_to_keep:]
        return SimpleNamespace(logits=logits, past_key_values=None)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


def test_scorer_picks_the_choice_the_model_favours(tokenizer):
    fox_ids = tokenizer(" fox", add_special_tokens=False)["input_ids"]
    model = FixedLogits(len(tokenizer), favoured=fox_ids)
    items = [Item(["The quick brown"] * 3, [" fox", " dog", " lazy"], gold=0),
             Item(["Pruning removes"] * 2, [" heads", " fox"], gold=1)]
    assert score_items(model, tokenizer, items)["acc"] == 1.0
    wrong = [Item(item.contexts, item.continuations, gold=1 - item.gold) for item in items]
    assert score_items(model, tokenizer, wrong)["acc"] == 0.0


def test_uniform_model_loglikelihood_is_tokens_times_log_vocab(tokenizer):
    model = FixedLogits(len(tokenizer))
    cont = " Paris is the capital"
    _, cont_ids = encode_pair(tokenizer, "Question:", cont)
    [ll] = loglikelihoods(model, tokenizer, [("Question:", cont)])
    assert ll == pytest.approx(-len(cont_ids) * math.log(len(tokenizer)), rel=1e-5)


def test_acc_norm_differs_from_acc_where_lengths_differ():
    items = [Item(["q"] * 2, [" a", " abcdefgh"], gold=1)]
    # Short choice has the higher total log-likelihood, the long one the higher per-character one.
    result = accuracy(items, [[-2.0, -4.0]])
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0
    same_len = accuracy([Item(["q"] * 2, [" ab", " cd"], gold=0)], [[-1.0, -3.0]])
    assert same_len["acc"] == same_len["acc_norm"] == 1.0


def test_uniform_model_acc_norm_prefers_longer_choices(tokenizer):
    # Under a uniform model every token costs log V: acc picks the fewest tokens, acc_norm the
    # most characters per token, so the two disagree on this item.
    model = FixedLogits(len(tokenizer))
    item = Item(["Answer:"] * 2, [" a", " the capital of France"], gold=1)
    result = score_items(model, tokenizer, [item])
    assert result["acc"] == 0.0 and result["acc_norm"] == 1.0


def test_shared_context_and_batched_paths_agree(tiny_llama, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    # One-token choices of one context (read off a single row) next to ordinary multi-token requests.
    one_token = [c for c in (" a", " b", " c", " d") if len(encode_pair(tokenizer, "Answer:", c)[1]) == 1]
    assert len(one_token) >= 2
    requests = [("Question: two plus two?\nAnswer:", c) for c in one_token]
    requests += [("The quick brown fox", c) for c in (" jumps", " jumps over the lazy dog.", " is")]
    requests += [("Paris is the capital of", " France."), ("Once upon a time", " there was a model.")]
    shared = loglikelihoods(model, tokenizer, requests, batch_size=4, share_context=True)
    batched = loglikelihoods(model, tokenizer, requests, batch_size=4, share_context=False)
    one_by_one = loglikelihoods(model, tokenizer, requests, batch_size=1, share_context=False)
    assert all(v < 0 for v in shared)
    assert shared == pytest.approx(batched, abs=1e-4)
    assert batched == pytest.approx(one_by_one, abs=1e-4)
