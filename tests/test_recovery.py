"""Recovery training on tiny models: loss goes down, the right parameters train, merged
checkpoints equal adapter-applied outputs, training resumes, bad settings fail early."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

from data_selection.pool import Record
from llm_prune.errors import UserError
from llm_prune.recipe import RecoveryConfig
from recovery import ResponseOnlyCollator, build_examples, check_config, recover, tokenize_example
from recovery.data import IGNORE_INDEX
from recovery.merge import PERP_FILE
from recovery.train import distill_kl

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Kenya", "Nairobi")]
RECORDS = [Record(prompt=f"What is the capital of {c}?", response=f"The capital of {c} is {city}.",
                  source_id=str(i)) for i, (c, city) in enumerate(CAPITALS)]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Tiny models train faster on one thread than on two contended ones.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def load(path):
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    return model.eval(), tok


def cfg(**kw) -> RecoveryConfig:
    base = dict(method="lora", max_steps=12, learning_rate=1e-2, warmup_ratio=0.0, micro_batch_size=4,
                eval_fraction=0.0, lora_dropout=0.0, seed=0)
    base.update(kw)
    return RecoveryConfig(**base)


def response_loss(model, tok, records=RECORDS) -> float:
    """Mean loss on the response tokens of `records` (what recovery optimises)."""
    split = build_examples(tok, records, cutoff_len=256, eval_fraction=0.0)
    batch = ResponseOnlyCollator(tok.pad_token_id)(split.train)
    with torch.no_grad():
        return model(**batch).loss.item()


def logits(model, tok, text="The capital of Peru is Lima."):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


def test_prompt_tokens_are_masked(tiny_llama):
    _, tok = load(tiny_llama)
    ex = tokenize_example(tok, RECORDS[0], cutoff_len=256)
    prompt_len = len(tok("Below is an instruction")["input_ids"])
    assert ex["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    response_ids = tok(RECORDS[0].response + tok.eos_token, add_special_tokens=False)["input_ids"]
    n = len(response_ids)
    assert ex["input_ids"][-n:] == response_ids and ex["labels"][-n:] == response_ids
    assert all(label == IGNORE_INDEX for label in ex["labels"][:-n])
    batch = ResponseOnlyCollator(tok.pad_token_id)([ex, tokenize_example(tok, {"prompt": "hi", "response": "yo"}, 256)])
    short = batch["attention_mask"][1].sum().item()
    assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][1, short:] == tok.pad_token_id).all()


def test_chat_template_masks_up_to_assistant_turn(tiny_llama):
    _, tok = load(tiny_llama)
    tok.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                         "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
    ex = tokenize_example(tok, RECORDS[1], cutoff_len=256)
    text = tok.decode([i for i, lab in zip(ex["input_ids"], ex["labels"]) if lab != IGNORE_INDEX])
    assert text.startswith("The capital of Germany is Berlin.") and "user" not in text


def test_truncation_keeps_response_tokens(tiny_llama):
    _, tok = load(tiny_llama)
    long = Record(prompt="word " * 400, response="short answer", source_id="x")
    ex = tokenize_example(tok, long, cutoff_len=32)
    assert len(ex["input_ids"]) <= 32 and any(lab != IGNORE_INDEX for lab in ex["labels"])


def test_lora_reduces_loss_and_reports_progress(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    before = response_loss(model, tok)
    events = []
    result = recover(model, tok, RECORDS, cfg(eval_fraction=0.2), tmp_path, on_event=events.append)
    after = response_loss(result.model, tok)
    assert after < 0.7 * before, (before, after)
    m = result.metrics
    assert m["steps"] == 12 and m["train_loss_last"] < m["train_loss_first"] and m["eval_loss"] > 0
    assert m["tokens"] > 0 and 0 < m["trainable_fraction"] < 1
    progress = [e for e in events if e.kind == "progress"]
    assert [e.step for e in progress] == list(range(1, 13))
    assert {"loss", "lr", "tokens_per_s", "eta_s"} <= set(progress[-1].metrics)
    assert type(result.model).__name__ == "LlamaForCausalLM"
    assert not any("lora" in n for n, _ in result.model.named_parameters())
    assert not (tmp_path / "checkpoints").exists()


def test_perp_trains_exactly_norms_and_biases(tiny_qwen2, tmp_path):
    model, tok = load(tiny_qwen2)
    c = model.config
    hd = c.hidden_size // c.num_attention_heads
    per_layer = 2 * c.hidden_size + c.num_attention_heads * hd + 2 * c.num_key_value_heads * hd  # norms, q/k/v bias
    expected = c.num_hidden_layers * per_layer + c.hidden_size  # + final norm
    original = {n: p.clone() for n, p in model.named_parameters()}
    before = response_loss(model, tok)
    result = recover(model, tok, RECORDS, cfg(method="perp", learning_rate=5e-2), tmp_path)
    assert result.metrics["trainable_params"] == expected
    changed = {n for n, p in result.model.named_parameters() if not torch.equal(p, original[n])}
    assert changed and all(n.endswith("bias") or "norm" in n for n in changed)
    assert response_loss(result.model, tok) < before


def test_perp_lm_head_option_counts_head(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    c = model.config
    result = recover(model, tok, RECORDS[:4], cfg(method="perp", max_steps=1, perp_train_lm_head=True), tmp_path)
    norms = (2 * c.num_hidden_layers + 1) * c.hidden_size
    assert result.metrics["trainable_params"] == norms + c.vocab_size * c.hidden_size


def test_merged_checkpoint_equals_adapter_outputs(tiny_qwen2, tmp_path):
    from peft import PeftModel

    model, tok = load(tiny_qwen2)
    base_logits = logits(model, tok)
    result = recover(model, tok, RECORDS, cfg(method="perp_lora", keep_adapter=True), tmp_path / "run")
    assert (result.adapter_dir / "adapter_model.safetensors").exists()
    result.model.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    merged_logits = logits(reloaded, tok)

    base, _ = load(tiny_qwen2)
    perp_state = load_file(str(result.adapter_dir / PERP_FILE))
    assert perp_state and set(perp_state) <= set(base.state_dict())
    base.load_state_dict(perp_state, strict=False)
    with_adapter = PeftModel.from_pretrained(base, str(result.adapter_dir)).eval()
    adapter_logits = logits(with_adapter, tok)
    assert not torch.allclose(merged_logits, base_logits, atol=1e-3)  # training changed something
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_resume_continues_step_count(tiny_llama, tmp_path, method):
    class Interrupt(Exception):
        pass

    def stop_at_13(event):
        if event.kind == "progress" and event.step == 13:
            raise Interrupt

    model, tok = load(tiny_llama)
    config = cfg(method=method, max_steps=20, learning_rate=1e-3)
    with pytest.raises(Interrupt):
        recover(model, tok, RECORDS, config, tmp_path, on_event=stop_at_13)
    assert (tmp_path / "checkpoints" / "checkpoint-10" / "trainable.safetensors").exists()
    # A job killed while saving a later checkpoint: its files are there, trainer_state.json (written
    # last) is not. The resume skips it, says so, and continues from checkpoint-10.
    torn = tmp_path / "checkpoints" / "checkpoint-12"
    shutil.copytree(tmp_path / "checkpoints" / "checkpoint-10", torn)
    (torn / "trainer_state.json").unlink()
    events = []
    model, tok = load(tiny_llama)
    result = recover(model, tok, RECORDS, config, tmp_path, on_event=events.append, keep_checkpoints=True)
    assert result.metrics["resumed_from_step"] == 10 and result.metrics["steps"] == 20
    assert [e.step for e in events if e.kind == "progress"] == list(range(11, 21))
    assert any(e.kind == "warning" and "checkpoint-12 is incomplete" in e.message for e in events)
    assert (tmp_path / "checkpoints").is_dir()  # kept for the caller to remove once it has written the model

    fresh, _ = load(tiny_llama)
    straight = recover(fresh, tok, RECORDS, config, tmp_path / "straight")
    torch.testing.assert_close(logits(result.model, tok), logits(straight.model, tok), atol=1e-5, rtol=1e-5)
    # The reported mean loss covers all 20 steps, as the uninterrupted run's does.
    assert result.metrics["train_loss_mean"] == pytest.approx(straight.metrics["train_loss_mean"], rel=1e-4)


def test_a_rerun_after_the_last_checkpoint_trains_no_further(tiny_llama, tmp_path):
    """Killed after the last checkpoint, before its caller took the model: the rerun trains no step
    past max_steps and reports the run as it ended (the Trainer alone would take one more)."""
    model, tok = load(tiny_llama)
    config = cfg(max_steps=13)
    straight = recover(model, tok, RECORDS, config, tmp_path, keep_checkpoints=True)
    assert (tmp_path / "checkpoints" / "checkpoint-13").is_dir()
    again, _ = load(tiny_llama)
    events = []
    repeat = recover(again, tok, RECORDS, config, tmp_path, on_event=events.append)
    assert not [e for e in events if e.kind == "progress"]
    for key in ("steps", "tokens", "train_loss_last", "train_loss_first", "train_loss_mean"):
        assert repeat.metrics[key] == pytest.approx(straight.metrics[key], rel=1e-6), key
    torch.testing.assert_close(logits(repeat.model, tok), logits(straight.model, tok), atol=1e-6, rtol=1e-6)


def test_checkpoint_of_another_method_is_refused(tiny_llama, tmp_path):
    def stop(event):
        if event.kind == "progress" and event.step == 11:
            raise KeyboardInterrupt

    model, tok = load(tiny_llama)
    with pytest.raises(KeyboardInterrupt):
        recover(model, tok, RECORDS, cfg(max_steps=20), tmp_path, on_event=stop)
    model, tok = load(tiny_llama)
    with pytest.raises(UserError, match="does not match"):
        recover(model, tok, RECORDS, cfg(method="perp", max_steps=20), tmp_path)


def shrink(model: nn.Module) -> nn.Module:
    """Mimic structural pruning on layer 1: drop one KV group (two query heads) and 80 MLP channels,
    leaving config's global sizes untouched."""
    layer = model.model.layers[1]
    attn, mlp = layer.self_attn, layer.mlp
    hd = attn.head_dim

    def keep(linear: nn.Linear, rows=None, cols=None) -> nn.Linear:
        w = linear.weight.data
        w = w[rows] if rows is not None else w
        w = w[:, cols] if cols is not None else w
        out = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None)
        out.weight.data.copy_(w)
        if linear.bias is not None:
            out.bias.data.copy_(linear.bias.data[rows] if rows is not None else linear.bias.data)
        return out

    q_rows, kv_rows, ch = slice(0, 2 * hd), slice(0, hd), slice(0, 48)
    attn.q_proj = keep(attn.q_proj, q_rows)
    attn.k_proj, attn.v_proj = keep(attn.k_proj, kv_rows), keep(attn.v_proj, kv_rows)
    attn.o_proj = keep(attn.o_proj, cols=q_rows)
    mlp.gate_proj, mlp.up_proj = keep(mlp.gate_proj, ch), keep(mlp.up_proj, ch)
    mlp.down_proj = keep(mlp.down_proj, cols=ch)
    return model


def test_lora_on_pruned_layer_widths(tiny_llama, tmp_path):
    from peft import PeftModel

    model, tok = load(tiny_llama)
    model = shrink(model)
    before = response_loss(model, tok)
    result = recover(model, tok, RECORDS, cfg(keep_adapter=True), tmp_path)
    mlp = result.model.model.layers[1].mlp
    assert (mlp.gate_proj.out_features, mlp.down_proj.in_features) == (48, 48)
    assert type(mlp.gate_proj) is nn.Linear and result.model.model.layers[1].self_attn.k_proj.out_features == 16
    assert response_loss(result.model, tok) < before
    again = shrink(load(tiny_llama)[0])
    with_adapter = PeftModel.from_pretrained(again, str(result.adapter_dir)).eval()
    torch.testing.assert_close(logits(result.model, tok), logits(with_adapter, tok), atol=1e-4, rtol=1e-4)


def test_distillation_term(tiny_llama, tmp_path):
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, 3, 4, 5], [IGNORE_INDEX, 1, 2, IGNORE_INDEX, IGNORE_INDEX]])
    assert distill_kl(teacher, teacher, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_kl(student, teacher, labels).item() > 0
    # Positions whose next token is masked do not count.
    tampered = student.clone()
    tampered[0, 0] += 5.0
    assert distill_kl(tampered, teacher, labels).item() == pytest.approx(distill_kl(student, teacher, labels).item())

    model, tok = load(tiny_llama)
    dense, _ = load(tiny_llama)
    result = recover(model, tok, RECORDS, cfg(max_steps=3, distill_weight=1.0), tmp_path, teacher=dense)
    assert result.metrics["steps"] == 3
    with pytest.raises(ValueError, match="teacher"):
        recover(load(tiny_llama)[0], tok, RECORDS, cfg(distill_weight=1.0), tmp_path / "x")


def test_qlora_refused_on_cpu():
    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    with pytest.raises(UserError, match="QLoRA needs a CUDA GPU"):
        check_config({"method": "qlora"})
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="bitsandbytes"):
            check_config({"method": "qlora", "force": True})


def test_qlora_forced_trains_4bit_copy_and_merges_into_dense(tiny_llama, tmp_path):
    pytest.importorskip("bitsandbytes")
    model, tok = load(tiny_llama)
    original = {n: p.clone() for n, p in model.named_parameters()}
    before = response_loss(model, tok)
    result = recover(model, tok, RECORDS, cfg(method="qlora", force=True, lora_r=4), tmp_path)
    assert response_loss(result.model, tok) < 0.8 * before
    dense_params = sum(p.numel() for p in original.values())
    assert result.metrics["total_params"] == dense_params + result.metrics["trainable_params"]
    gate = result.model.model.layers[0].mlp.gate_proj
    assert type(gate) is nn.Linear and gate.weight.dtype == torch.float32
    # Published weights are the dense original plus a rank-4 update, not a 4-bit rounding.
    delta = gate.weight - original["model.layers.0.mlp.gate_proj.weight"]
    assert 0 < torch.linalg.matrix_rank(delta).item() <= 4


@pytest.mark.parametrize("bad, match", [
    ({"max_steps": -1}, "max_steps"),
    ({"method": "adamw"}, "method"),
    ({"max_steps": 0}, "max_steps is 0"),
    ({"lora_r": 0}, "lora_r"),
    ({"learning_rate": 0}, "learning_rate"),
])
def test_bad_settings_rejected(bad, match):
    with pytest.raises(UserError, match=match):
        check_config(bad)


def test_bad_inputs_rejected_before_training(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    with pytest.raises(UserError, match="target_modules"):
        recover(model, tok, RECORDS, cfg(target_modules=["qkv_proj"]), tmp_path)
    with pytest.raises(UserError, match="no recovery records"):
        recover(model, tok, [], cfg(), tmp_path)
    with pytest.raises(UserError, match="empty response"):
        recover(model, tok, [Record(prompt="p", response=" ", source_id="0")], cfg(), tmp_path)


def test_epochs_set_the_length(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    result = recover(model, tok, RECORDS, cfg(epochs=1.0, max_steps=100), tmp_path)
    assert result.metrics["steps"] == 2  # 8 records / micro-batch 4


def test_lora_factors_transfer_to_dense_copy(tiny_llama):
    """QLoRA's publishing step: factors trained on one copy merge into the dense original."""
    import copy

    from recovery.lora import LoraSettings, add_lora
    from recovery.merge import merge_lora, transfer_lora

    model, tok = load(tiny_llama)
    dense = copy.deepcopy(model)
    trained = add_lora(model, LoraSettings(r=4)).eval()  # peft leaves the model in train mode
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    expected = logits(trained, tok)
    published = transfer_lora(trained, dense)
    torch.testing.assert_close(logits(published, tok), expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits(merge_lora(trained), tok), expected, atol=1e-4, rtol=1e-4)


def test_recover_a_pruned_checkpoint_and_export_it(tiny_llama, tmp_path):
    """The pipeline's path: pruned checkpoint with per-layer widths on disk -> load -> LoRA -> export -> reload."""
    from llm_prune.export import export_checkpoint
    from llm_prune.models import load_model
    from llm_prune.plan import LayerPlan, PrunePlan
    from llm_prune.surgery import apply_plan

    model, tok = load(tiny_llama)
    c = model.config
    keep = [LayerPlan(i, list(range(c.num_key_value_heads)), list(range(c.intermediate_size)))
            for i in range(c.num_hidden_layers)]
    keep[1] = LayerPlan(1, [1], list(range(0, c.intermediate_size, 2)))
    keep[2] = LayerPlan(2, [0, 1], list(range(40)))
    n = sum(p.numel() for p in model.parameters())
    apply_plan(model, PrunePlan(layers=keep, params_before=n, params_target=0, params_after=0))
    info = export_checkpoint(model, tok, tmp_path / "pruned")
    assert info["needs_remote_code"]  # widths differ per layer

    pruned, tok = load_model(str(tmp_path / "pruned"))
    before = response_loss(pruned, tok)
    result = recover(pruned, tok, RECORDS, cfg(method="perp_lora"), tmp_path / "run")
    assert response_loss(result.model, tok) < before
    export_checkpoint(result.model, tok, tmp_path / "recovered")
    reloaded, _ = load_model(str(tmp_path / "recovered"))
    assert reloaded.model.layers[1].mlp.gate_proj.out_features == c.intermediate_size // 2
    torch.testing.assert_close(logits(reloaded, tok), logits(result.model, tok), atol=1e-5, rtol=1e-5)


def test_a_step_larger_than_the_data_is_told(tiny_llama, tmp_path):
    """4 x 4 accumulated asks for 16 examples of 8: each step takes the whole set, which is said."""
    events = []
    model, tok = load(tiny_llama)
    recover(model, tok, RECORDS, cfg(max_steps=1, gradient_accumulation=4), tmp_path / "a", on_event=events.append)
    assert [e.message for e in events if e.kind == "warning"] == [
        "a step asks for 16 examples (4 x 4 accumulated) but there are 8: each step takes the whole training set once"]
    events.clear()
    model, tok = load(tiny_llama)
    recover(model, tok, RECORDS, cfg(max_steps=1, gradient_accumulation=2), tmp_path / "b", on_event=events.append)
    assert not [e for e in events if e.kind == "warning"]


def test_a_failed_write_on_a_full_disk_is_said_to_be_the_disk(tiny_llama, tmp_path, monkeypatch):
    """torch.save reports a full disk as a failed stream; training says ENOSPC when the disk is full."""
    import errno
    import os
    from types import SimpleNamespace

    import transformers

    def failed_stream(*_a, **_k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(transformers.Trainer, "train", failed_stream)
    real = os.statvfs
    for free, expected in ((1 << 20, OSError), (1 << 40, RuntimeError)):
        monkeypatch.setattr(os, "statvfs", lambda p, free=free: SimpleNamespace(
            **{k: getattr(real(p), k) for k in ("f_frsize", "f_blocks", "f_files", "f_favail")},
            f_bavail=free // real(p).f_frsize))
        model, tok = load(tiny_llama)
        with pytest.raises(expected) as caught:
            recover(model, tok, RECORDS, cfg(max_steps=2), tmp_path / str(free))
        if expected is OSError:
            assert caught.value.errno == errno.ENOSPC and isinstance(caught.value.__cause__, RuntimeError)
