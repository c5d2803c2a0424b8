"""Tiny random models (a few layers, GQA) and a byte-level tokenizer, saved with save_pretrained."""

from __future__ import annotations

import json
from pathlib import Path

import torch

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Pruning removes whole attention heads and MLP channels from a language model.",
    "Question: what is two plus two? Answer: four.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "def add(a, b):\n    return a + b\n",
    "Once upon a time there was a small model that learned to read.",
]


def build_tokenizer(path: str | Path, vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(path))
    # Byte-level BPE has no unknown token: say so, or Qwen2's tokenizer class adds its default
    # `<|endoftext|>` past the vocabulary (an id the model has no embedding row for, which load_model refuses).
    config_file = Path(path) / "tokenizer_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "unk_token": None}, indent=2))
    return fast


def build_model(path: str | Path, family: str = "llama", layers: int = 4, hidden: int = 64, heads: int = 4,
                kv_heads: int = 2, intermediate: int = 128, seed: int = 0, tie: bool = False):
    """Save a random model of the given family with its tokenizer; returns the path."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path)
    torch.manual_seed(seed)
    kw = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
              tie_word_embeddings=tie)
    if family == "qwen3":
        kw["head_dim"] = hidden // heads
    config = AutoConfig.for_model(family, **kw)
    model = AutoModelForCausalLM.from_config(config)
    # Random init at std 0.02 gives near-uniform outputs; a wider init makes the layers matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "bias" in name:
                p.normal_(0, 0.02)
    model.save_pretrained(str(path))
    return path
