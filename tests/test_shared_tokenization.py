"""PASER scores exactly the tokens recovery trains on: the same template, BOS and truncation, seen
at the models' inputs while each one runs."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_selection.degradation import _encode, score_records
from data_selection.pool import Record
from llm_prune.recipe import RecoveryConfig
from recovery import recover

RECORDS = [Record(prompt=f"What is {i} plus {i}?", response=f"It is {2 * i}.", source_id=str(i)) for i in range(3)]
RECORDS.append(Record(prompt="Summarise: " + "the long river runs to the sea " * 20,
                      response="A river reaches the sea " * 12, source_id="long"))
CUTOFF = 128
CHAT = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def _capture(module, seen, pad_id):
    def hook(_, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        labels = kwargs.get("labels")
        for row in range(ids.shape[0]):
            n = int(mask[row].sum()) if mask is not None else int((ids[row] != pad_id).sum())
            first = None if labels is None else int((labels[row, :n] != -100).nonzero()[0])
            seen.add((tuple(ids[row, :n].tolist()), first))
    return module.register_forward_pre_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("template", [None, CHAT], ids=["bos-alpaca", "chat-template"])
def test_paser_scores_the_tokens_recovery_trains_on(tiny_llama, tmp_path, template):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = template
    if template is None:  # a tokenizer that adds BOS itself, as Llama's do
        from tokenizers import processors

        tok._tokenizer.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    scored: set = set()
    handle = _capture(model.model, scored, tok.pad_token_id)
    score_records(RECORDS, (model, tok), (model, tok), max_length=CUTOFF, batch_tokens=64)
    handle.remove()
    # Where PASER's JSD starts in each sequence: the first response token.
    scored = {(ids, _encode(tok, r, CUTOFF)[1]) for r in RECORDS for ids, _ in scored
              if list(ids) == _encode(tok, r, CUTOFF)[0]}

    trained: set = set()
    handle = _capture(model, trained, tok.pad_token_id)
    cfg = RecoveryConfig(method="lora", max_steps=len(RECORDS), micro_batch_size=1, cutoff_len=CUTOFF,
                         eval_fraction=0.0, lora_dropout=0.0, warmup_ratio=0.0)
    recover(model, tok, RECORDS, cfg, tmp_path)
    handle.remove()

    assert len(scored) == len(RECORDS) and scored == trained
    # BOS (from the tokenizer, or written by the template) starts every record that was not cut ...
    assert {ids[0] for ids, _ in trained if len(ids) < CUTOFF} == {tok.bos_token_id}
    assert max(len(ids) for ids, _ in trained) == CUTOFF  # ... and the long one is cut the same way


MISTRAL_V01 = ("{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}")


def test_a_template_without_a_system_role_gets_the_system_text_in_the_prompt(tiny_llama):
    """Mistral-Instruct v0.1's template raises on a system turn: the record's system text leads the
    user turn instead of the whole selection or training failing with a traceback."""
    from data_selection.pool import format_example
    from llm_prune.errors import UserError

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = MISTRAL_V01
    prompt, response = format_example(tok, Record(prompt="Hi", response="Hello", system="Be brief.", source_id="s"))
    assert prompt.endswith("[INST] Be brief.\n\nHi [/INST]") and response.startswith("Hello")
    tok.chat_template = "{{ raise_exception('no chat here') }}"
    with pytest.raises(UserError, match="chat template refuses a record: no chat here"):
        format_example(tok, Record(prompt="Hi", response="Hello", source_id="s"))


@pytest.mark.parametrize("template", [None, CHAT], ids=["bos-alpaca", "chat-template"])
def test_a_long_record_encodes_as_one_call_would_in_bounded_pieces(tiny_llama, monkeypatch, template):
    """Past `PIECE_CHARS` a field is tokenized in windows and pieces (a 10 MB field in one call held
    about 2 GB); the ids a record keeps and its whole token count are what one call gives."""
    from data_selection import encoding
    from data_selection.pool import format_example

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = template
    monkeypatch.setattr(encoding, "PIECE_CHARS", 500)  # so a few pages exercise the long path
    words = "the long river runs to the sea, and 12 boats  sail on it; ".split(" ")
    text = " ".join(words[i * 7 % len(words)] for i in range(3000))
    calls = []
    real_call = type(tok).__call__
    monkeypatch.setattr(type(tok), "__call__", lambda self, t, **kw: calls.append(len(t)) or real_call(self, t, **kw))
    for record in (Record(prompt=text, response="short answer", source_id="p"),
                   Record(prompt="short question?", response=text, source_id="r"),
                   Record(prompt=text[:9000], response=text[5000:], source_id="b")):
        prompt, response = format_example(tok, record)
        one = real_call(tok, prompt, add_special_tokens=template is None)["input_ids"]
        two = real_call(tok, response, add_special_tokens=False)["input_ids"]
        for cutoff in (64, 300):
            calls.clear()
            enc = encoding.encode_example(tok, record, cutoff)
            assert max(calls) <= 2 * 500 + 2 * 500  # no call on the whole text
            budget = max(cutoff - len(two), cutoff // 2)
            kept = one[-budget:]
            assert enc.input_ids == kept + two[:cutoff - len(kept)], (record.source_id, cutoff)
            assert enc.response_start == len(kept) and enc.untruncated == len(one) + len(two)
