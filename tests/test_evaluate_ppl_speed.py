"""Perplexity convention, speed measurement and results stored next to a checkpoint."""

import json
import math
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from llm_prune.errors import UserError
from llm_prune.evaluate import SpeedConfig, evaluate_model, measure_speed, perplexity, write_eval_results
from llm_prune.evaluate.report import CARD_END, CARD_START, format_table
from tests.test_evaluate_scoring import FixedLogits
from tests.tiny_models import CORPUS

TEXT = "\n\n".join(CORPUS * 6)


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama).eval(), AutoTokenizer.from_pretrained(tiny_llama)


def test_uniform_model_perplexity_equals_vocab_size(tiny):
    _, tokenizer = tiny
    vocab = len(tokenizer)
    result = perplexity(FixedLogits(vocab), tokenizer, TEXT, seq_len=16)
    assert result["ppl"] == pytest.approx(vocab, rel=1e-3)
    n_tokens = len(tokenizer(TEXT)["input_ids"])
    assert result["windows"] == n_tokens // 16 and result["tokens"] == result["windows"] * 15
    assert "non-overlapping" in result["convention"]


def test_perplexity_past_float_range_is_infinite(tiny, capsys):
    from llm_prune.cli.common import emit_json

    _, tokenizer = tiny
    # Every token of the text costs ~2000 nats (the model is sure of the pad token): exp overflows.
    model = FixedLogits(len(tokenizer), favoured=[tokenizer.pad_token_id], boost=2000.0)
    result = perplexity(model, tokenizer, TEXT, seq_len=16, max_windows=2)
    assert result["ppl"] == math.inf and result["nll"] == pytest.approx(2000, rel=0.01)
    assert "inf" in format_table({"ppl_by_seq_len": {"16": result}})
    emit_json({"ppl": result})
    stored = json.loads(capsys.readouterr().out)["ppl"]
    assert stored["ppl"] is None and stored["nll"] == pytest.approx(result["nll"])
    assert "inf" in format_table({"ppl_by_seq_len": {"16": stored}})  # as read back from eval_results.json


def test_perplexity_windows_and_limits(tiny):
    model, tokenizer = tiny
    full = perplexity(model, tokenizer, TEXT, seq_len=32, batch_size=3)
    capped = perplexity(model, tokenizer, TEXT, seq_len=32, max_windows=2)
    assert capped["windows"] == 2 and 1 < full["ppl"] < len(tokenizer) * 10 and math.isfinite(capped["ppl"])
    # Batching windows must not change the number.
    assert perplexity(model, tokenizer, TEXT, seq_len=32, batch_size=1)["ppl"] == pytest.approx(full["ppl"], rel=1e-5)
    with pytest.raises(UserError, match="fewer than one window"):
        perplexity(model, tokenizer, "short text", seq_len=128)


def test_speed_numbers_are_positive_and_finite(tiny, tiny_llama):
    model, tokenizer = tiny
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure_speed(model, tokenizer, checkpoint_dir=tiny_llama,
                               config=SpeedConfig(prompt_len=16, decode_tokens=4, batch_sizes=(1, 4), repeats=1))
    # The KV cache is passed by the name this transformers release takes: no deprecation warning.
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))], \
        [str(w.message) for w in caught]
    numbers = [result["params"], result["peak_memory_bytes"], result["weights_bytes"], result["dir_bytes"]]
    for run in result["runs"]:
        numbers += [run["prefill_tokens_per_s"], run["decode_tokens_per_s"]]
    assert [r["batch_size"] for r in result["runs"]] == [1, 4]
    assert all(math.isfinite(v) and v > 0 for v in numbers)
    assert result["params"] == sum(p.numel() for p in model.parameters())


def test_evaluate_model_and_model_card(tiny, tmp_path):
    model, tokenizer = tiny
    results = evaluate_model(model, tokenizer, ppl_text=TEXT, seq_len=[16, 32], tasks="piqa,openbookqa", limit=3,
                             batch_size=4)
    assert set(results["ppl_by_seq_len"]) == {"16", "32"} and results["ppl"]["seq_len"] == 16
    assert results["tasks"]["openbookqa"]["metric"] == "acc_norm" and results["tasks"]["piqa"]["n"] == 3
    assert results["average"] == pytest.approx(
        (results["tasks"]["piqa"]["acc"] + results["tasks"]["openbookqa"]["acc_norm"]) / 2)
    json.dumps(results)  # JSON-serialisable as the service stores it

    card = tmp_path / "README.md"
    card.write_text("# My model\n\nUser text stays.\n")
    write_eval_results(tmp_path, results, name="dense")
    write_eval_results(tmp_path, {**results, "params": 1000}, name="pruned")
    write_eval_results(tmp_path, results, name="dense")  # re-writing replaces, never duplicates
    stored = json.loads((tmp_path / "eval_results.json").read_text())
    assert set(stored) == {"dense", "pruned"}
    text = card.read_text()
    assert text.startswith("# My model\n\nUser text stays.") and text.count(CARD_START) == 1
    assert text.count(CARD_END) == 1 and "| metric | dense | pruned |" in text and "ppl@32" in text
    assert "B/A" in format_table(results, compare=results, names=("A", "B"))


def test_seq_len_forms():
    from llm_prune.evaluate.harness import _seq_lens

    assert _seq_lens(128, 512) == [128]
    assert _seq_lens("128,max", 512) == [128, 512]
    assert _seq_lens(["128", 2048, "128"], 4096) == [128, 2048]
    assert _seq_lens(["MAX", " 64 ,"], 512) == [512, 64]
    for bad in ("12x", "1", "-5", "", ",", "²", "٣", "1٢8", "１２８"):  # the same rule for the CLI flag and the Python call
        with pytest.raises(UserError, match="--seq-len"):
            _seq_lens(bad, 512)


def test_a_byte_order_mark_is_not_measured(tmp_path):
    from llm_prune.evaluate import read_text_file

    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfthe cat sat")
    assert read_text_file(tmp_path / "bom.txt") == "the cat sat"


def test_ppl_text_from_saved_dataset(tmp_path):
    import datasets

    from llm_prune.evaluate import read_text_dataset

    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a b", "c d"], "n": [1, 2]})}) \
        .save_to_disk(str(tmp_path / "ds"))
    assert read_text_dataset(str(tmp_path / "ds"), split="test", column="text") == "a b\n\nc d"
    with pytest.raises(UserError, match="column 'body' not in dataset"):
        read_text_dataset(str(tmp_path / "ds"), split="test", column="body")
    with pytest.raises(UserError, match="split 'train' not in"):
        read_text_dataset(str(tmp_path / "ds"), split="train")
    assert read_text_dataset(str(tmp_path / "ds")) == "a b\n\nc d"  # test, by default
    datasets.Dataset.from_dict({"text": ["e f"]}).save_to_disk(str(tmp_path / "one"))
    assert read_text_dataset(str(tmp_path / "one")) == "e f"
    with pytest.raises(UserError, match="single split; --split train does not apply"):
        read_text_dataset(str(tmp_path / "one"), split="train")


def test_weights_on_disk_are_the_files_the_model_loads(tmp_path):
    from llm_prune.evaluate.speed import disk_bytes

    folder = tmp_path / "ckpt"
    (folder / "adapter").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"w" * 1000)
    (folder / "model-f16.gguf").write_bytes(b"g" * 500)  # an export beside the weights
    (folder / "adapter" / "adapter_model.safetensors").write_bytes(b"a" * 300)
    assert disk_bytes(folder) == {"weights_bytes": 1000, "dir_bytes": 1800}
    assert disk_bytes(folder / "model-f16.gguf") == {"weights_bytes": 500}
    # Sharded: the shards the index names, not the stale single-file copy of another save.
    (folder / "model.safetensors").rename(folder / "old.safetensors")
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (folder / shard).write_bytes(b"s" * 200)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                        "c": "model-00002-of-00002.safetensors"}}))
    assert disk_bytes(folder)["weights_bytes"] == 400
