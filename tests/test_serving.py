"""Serving: the portable layout (stock config) and GGUF export run in the real llama.cpp."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from llm_prune.errors import UserError
from llm_prune.export import export_checkpoint
from llm_prune.families import layer_shapes
from llm_prune.models import load_model
from llm_prune.plan import count_params
from llm_prune.prune import prune_model
from llm_prune.recipe import Budget, PruningConfig
from tests.test_pruning import run_main
from tests.tiny_models import build_model

CAL = dict(calibration_samples=4, calibration_seq_len=32)
TEXT = "Pruning removes whole attention heads and MLP channels from a language model. The quick brown fox."


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    return build_model(tmp_path_factory.mktemp("dense"), "llama", layers=4, hidden=64, heads=4, kv_heads=2,
                       intermediate=128)


def _prune(src, out, **cfg):
    model, tok = load_model(str(src))
    result = prune_model(model, tok, Budget(ratio=cfg.pop("ratio", 0.3)), PruningConfig(**CAL, **cfg))
    info = export_checkpoint(result.model, tok, out, extra_meta={"base_model": str(src)})
    return result, info


@pytest.fixture(scope="module")
def heterogeneous(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("hetero")
    _, info = _prune(dense, out, skip_first=0, skip_last=1, prune_layers=0)  # every layer, KV widths differ
    assert info["needs_remote_code"]
    return out


@pytest.fixture(scope="module")
def portable(dense, tmp_path_factory):
    out = tmp_path_factory.mktemp("portable")
    _prune(dense, out, portable=True, round_to=1)
    return out


def test_portable_is_a_stock_checkpoint_on_budget(dense, portable):
    total = count_params(load_model(str(dense))[0])
    config = json.loads((portable / "config.json").read_text())
    assert config["model_type"] == "llama" and "auto_map" not in config and "per_layer_config" not in config
    assert not (portable / "modeling_pruned.py").exists()
    modes = {f.name: f.stat().st_mode & 0o777 for f in portable.iterdir()}  # weights readable as the rest
    assert modes["model.safetensors"] == modes["config.json"], modes
    stock = AutoModelForCausalLM.from_pretrained(portable)  # no trust_remote_code
    shapes = layer_shapes(stock)
    assert len({(s.num_key_value_heads, s.intermediate_size) for s in shapes}) == 1
    assert shapes[0].intermediate_size < 128  # it was pruned, not skipped
    assert abs(count_params(stock) - round(0.7 * total)) <= 0.005 * round(0.7 * total)
    ours = load_model(str(portable))[0]
    ids = torch.arange(3, 40).unsqueeze(0)
    with torch.no_grad():
        assert torch.allclose(stock(ids).logits, ours(ids).logits, atol=1e-5)


def test_portable_budget_error(dense):
    model, tok = load_model(str(dense))
    with pytest.raises(UserError, match="portable layout cannot reach"):
        prune_model(model, tok, Budget(ratio=0.3), PruningConfig(**CAL, portable=True, round_to=64))


def test_portable_keeps_a_head_count_that_divides_the_hidden_size(tmp_path):
    """hidden 128 with 8 heads in 4 KV groups: 3 groups (6 heads) would make a stock config that
    transformers refuses, so the portable layout keeps 4 or goes to 2 and the MLP absorbs the rest;
    equal widths with such a count (any allocation) keep the per-layer layout."""
    src = build_model(tmp_path / "d", "llama", layers=4, hidden=128, heads=8, kv_heads=4, intermediate=189)
    _, info = _prune(src, tmp_path / "p", portable=True, round_to=1)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert not info["needs_remote_code"] and 128 % config["num_attention_heads"] == 0
    AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    model, tok = load_model(str(src))
    for layer in model.model.layers:  # equal widths, 6 heads each
        from llm_prune.surgery import cut_attention
        cut_attention(model, layer, [0, 1, 2])
    info = export_checkpoint(model, tok, tmp_path / "six", extra_meta={"base_model": str(src)})
    assert info["needs_remote_code"]
    assert load_model(str(tmp_path / "six"))[0].model.layers[0].self_attn.q_proj.out_features == 6 * 16


def test_portable_qwen2_keeps_every_head(tiny_qwen2, tmp_path):
    """vLLM's and MLX's Qwen2 take head_dim as hidden_size // heads, ignoring config.head_dim: a stock
    Qwen2 config with fewer heads would load wrongly there, so the MLP takes the whole cut."""
    result, info = _prune(tiny_qwen2, tmp_path / "p", portable=True, round_to=1, prune_layers=0)
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert not info["needs_remote_code"] and config["hidden_size"] // config["num_attention_heads"] == config["head_dim"]
    assert config["num_attention_heads"] == 6 and config["intermediate_size"] < 160
    assert abs(result.params_after - result.params_target) <= 0.005 * result.params_target


def test_checkpoints_whose_weights_do_not_make_the_model_are_refused(dense, tmp_path, capsys):
    """A missing tensor would start random and a tensor of another shape gives a page of report:
    both are one line, as is a config.json transformers refuses."""
    import shutil

    from safetensors.torch import load_file, save_file

    missing, other = tmp_path / "missing", tmp_path / "other"
    shutil.copytree(dense, missing)
    weights = load_file(missing / "model.safetensors")
    weights.pop("model.layers.1.mlp.down_proj.weight")
    save_file(weights, missing / "model.safetensors", metadata={"format": "pt"})
    build_model(other, "llama", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=96)
    shutil.copy(dense / "model.safetensors", other / "model.safetensors")
    bad = tmp_path / "bad"
    shutil.copytree(dense, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "num_attention_heads": 3, "head_dim": 16}))
    for folder, reason in ((missing, "is incomplete: its weights lack model.layers.1.mlp.down_proj.weight"),
                           (other, "do not match its config.json"),
                           (bad, "not a multiple of the number of attention heads")):
        for args in (["export", str(folder), "-o", str(tmp_path / "x.gguf")],
                     ["eval", str(folder), "--tasks", "", "--ppl", str(tmp_path / "t.txt")]):
            (tmp_path / "t.txt").write_text(TEXT * 20)
            code, _, err = run_main(capsys, *args)
            lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
            assert code != 0 and len(lines) == 1 and reason in lines[0] and "Traceback" not in err, (args, err)


def test_gguf_of_a_sliding_window_model_has_the_window_as_its_context(tmp_path):
    """llama.cpp's llama graph attends to every earlier token: within a Mistral-style window that is
    what the model computes, past it it is not, so the file's training context is the window."""
    from llm_prune.gguf_export import export_gguf

    src = build_model(tmp_path / "m", "mistral", layers=2, hidden=64, heads=4, kv_heads=2, intermediate=96)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "sliding_window": 64}))
    assert export_gguf(src, tmp_path / "w.gguf", "f32")["context_length"] == 64
    assert _gguf_fields(tmp_path / "w.gguf")[1]["llama.context_length"] == 64
    (src / "config.json").write_text(json.dumps({**config, "sliding_window": None}))
    assert export_gguf(src, tmp_path / "n.gguf", "f32")["context_length"] == 512


def _gguf_fields(path):
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    return reader, {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
                    or k in ("tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                             "tokenizer.ggml.model")}


def test_gguf_metadata_per_layer_widths(heterogeneous, tmp_path, capsys):
    out = tmp_path / "m-Q8_0.gguf"  # without --dtype, the dtype the name names
    code, stdout, err = run_main(capsys, "export", str(heterogeneous), "--format", "gguf", "-o", str(out), "--json")
    assert code == 0, err
    assert json.loads(stdout)["dtype"] == "q8_0" and json.loads(stdout)["architecture"] == "deci"
    code, stdout, err = run_main(capsys, "export", str(heterogeneous), "--dtype", "q8_0", "-o", str(out), "--force")
    assert code == 0, err
    assert "deci" in stdout
    shapes = layer_shapes(load_model(str(heterogeneous))[0])
    reader, kv = _gguf_fields(out)
    assert kv["general.architecture"] == "deci"
    assert kv["deci.block_count"] == len(shapes) == 4
    assert kv["deci.attention.head_count"] == [s.num_attention_heads for s in shapes]
    assert kv["deci.attention.head_count_kv"] == [s.num_key_value_heads for s in shapes]
    assert kv["deci.feed_forward_length"] == [s.intermediate_size for s in shapes]
    assert len(set(kv["deci.attention.head_count_kv"])) > 1
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "gpt-2"
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    assert not list(tmp_path.glob(".*partial"))


def test_gguf_bad_input(heterogeneous, tiny_qwen2, tmp_path, capsys):
    (tmp_path / "exists.gguf").write_bytes(b"keep")
    cases = [
        (["export", str(tmp_path), "-o", str(tmp_path / "a.gguf")], "not a checkpoint"),
        (["export", str(tmp_path / "missing"), "-o", str(tmp_path / "b.gguf")], "not a directory"),
        (["export", str(heterogeneous), "--dtype", "q4_k", "-o", str(tmp_path / "c.gguf")], "unsupported GGUF dtype"),
        (["export", str(heterogeneous), "--format", "onnx", "-o", str(tmp_path / "d.gguf")], "unsupported format"),
        (["export", str(heterogeneous), "-o", str(tmp_path / "exists.gguf")], "--force"),
        (["export", str(tiny_qwen2), "-o", str(tmp_path / "e.gguf")], "GGUF export supports llama"),
        (["prune", str(tiny_qwen2), "--ratio", "0.2", "--gguf", "f16", "-o", str(tmp_path / "f")],
         "GGUF export supports llama"),
        (["export", str(heterogeneous), "--dtype", "f16", "-o", str(tmp_path / "m-F32.gguf")],
         "--dtype f16 but the file name m-F32.gguf says f32: rename the output or leave --dtype out"),
        (["export", str(heterogeneous), "-o", str(tmp_path / "m-F16-q8_0.gguf")], "names f16 and q8_0: give --dtype"),
    ]
    for args, needle in cases:
        code, _, err = run_main(capsys, *args)
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0], (args, err)
    assert (tmp_path / "exists.gguf").read_bytes() == b"keep"
    # A failed export leaves neither the final name nor a partial file behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists.gguf"]
    assert not (tmp_path / "f").exists()
    # Outputs the file system refuses, and a tokenizer file that is JSON but no tokenizer: one line.
    badtok = tmp_path / "badtok"
    badtok.mkdir()
    for f in heterogeneous.iterdir():
        (badtok / f.name).write_bytes(f.read_bytes())
    (badtok / "tokenizer.json").write_text('{"model": {"type": "BPE"}, "decoder": {"type": "ByteLevel"}, '
                                           '"pre_tokenizer": null, "added_tokens": []}')
    # A per-layer checkpoint with its weights renamed, or its config edited out of step: one line.
    renamed, edited, foreign = tmp_path / "renamed", tmp_path / "edited", tmp_path / "foreign"
    for folder in (renamed, edited, foreign):
        shutil.copytree(heterogeneous, folder)
    (renamed / "model.safetensors").rename(renamed / "model-00001-of-00001.safetensors")
    config = json.loads((edited / "config.json").read_text())
    (edited / "config.json").write_text(json.dumps({**config, "num_hidden_layers": config["num_hidden_layers"] - 2}))
    (foreign / "config.json").write_text(json.dumps({**config, "base_model_type": "gpt2"}))
    for args, needle in [(["export", str(heterogeneous), "-o", "/proc/x.gguf"], "cannot write /proc/x.gguf"),
                         (["export", str(renamed), "-o", str(tmp_path / "r.gguf")], "no file named model.safetensors"),
                         (["eval", str(renamed), "--speed"], "could not read model at"),
                         (["export", str(edited), "-o", str(tmp_path / "x.gguf")], "config.json is inconsistent"),
                         (["eval", str(foreign), "--speed"], "base_model_type 'gpt2'"),
                         (["export", str(heterogeneous), "-o", str(tmp_path / ("a" * 300 + ".gguf"))], "not usable"),
                         (["export", str(badtok), "-o", str(tmp_path / "t.gguf")], "tokenizer of"),
                         (["eval", str(badtok), "--speed"], "tokenizer of")]:
        code, _, err = run_main(capsys, *args)
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, (args, err)


def test_a_bf16_model_comes_back_in_bf16(tmp_path, capsys):
    """Computation runs in float32 on a CPU; the checkpoint keeps the source's dtype (a bf16 model
    saved in float32 would be larger after pruning than before), tied embeddings stay one tensor."""
    from safetensors import safe_open

    src = build_model(tmp_path / "src", "llama", tie=True)
    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.bfloat16)
    model.save_pretrained(str(src))
    code, out, err = run_main(capsys, "prune", str(src), "--ratio", "0.3", "--calibration-samples", "4",
                              "--calibration-seq-len", "32", "-o", str(tmp_path / "p"), "--json")
    assert code == 0, err
    summary = json.loads(out)
    before, after = (src / "model.safetensors").stat().st_size, (tmp_path / "p" / "model.safetensors").stat().st_size
    assert after < 0.8 * before and summary["weights_bytes_before"] == summary["params_before"] * 2
    assert json.loads((tmp_path / "p" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "p" / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert "lm_head.weight" not in f.keys()
    reloaded, _ = load_model(str(tmp_path / "p"))
    assert count_params(reloaded) == summary["params_after"]


def test_pruning_again_into_a_checkpoint_leaves_nothing_of_the_old_model(dense, tmp_path, capsys):
    out = tmp_path / "p"
    common = ["--calibration-samples", "4", "--calibration-seq-len", "32", "-o", str(out)]
    assert run_main(capsys, "prune", str(dense), "--ratio", "0.2", "--gguf", "f16", *common)[0] == 0
    (out / "eval_results.json").write_text("{}")
    assert (out / "model-f16.gguf").exists()
    assert run_main(capsys, "prune", str(dense), "--ratio", "0.3", *common)[0] == 0
    assert not (out / "model-f16.gguf").exists() and not (out / "eval_results.json").exists()
    (out / ".done").write_text("{}")  # a finished stage of a `run` job
    code, _, err = run_main(capsys, "prune", str(dense), "--ratio", "0.3", *common)
    assert code == 2 and "finished stage of an `llm-prune run` job" in err


# --- the real engine -------------------------------------------------------------------------------------------

def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (pip install -e '.[gguf]')")
    return llama_cpp


def _engine_logits(gguf_path, ids, monkeypatch=None):
    llama_cpp = _llama_cpp()
    if monkeypatch is not None:
        # llama.cpp's extra CPU buffer types (AMX, repacked quantized weights) crash on AMX CPUs with any
        # quantized GGUF in this release, upstream files included: the plain CPU path checks our file.
        import llama_cpp.llama as engine

        defaults = engine.llama_cpp.llama_model_default_params

        def plain():
            params = defaults()
            params.use_extra_bufts = False
            return params

        monkeypatch.setattr(engine.llama_cpp, "llama_model_default_params", plain)
    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=128, n_batch=128, logits_all=True, verbose=False,
                          n_threads=2)
    llm.eval(ids)
    return llm, np.array(llm.scores[:len(ids)], dtype=np.float64)


def _hf_logits(checkpoint):
    model, tok = load_model(str(checkpoint))
    ids = tok(TEXT)["input_ids"]
    with torch.no_grad():
        return ids, model(torch.tensor([ids])).logits[0].double().numpy()


@pytest.mark.parametrize("layout", ["heterogeneous", "portable"])
def test_llama_cpp_matches_transformers(layout, request, tmp_path, monkeypatch):
    _llama_cpp()
    checkpoint = request.getfixturevalue(layout)
    from llm_prune.gguf_export import export_gguf

    ids, ref = _hf_logits(checkpoint)
    info32 = export_gguf(checkpoint, tmp_path / "f32.gguf", "f32")
    assert info32["architecture"] == ("deci" if layout == "heterogeneous" else "llama")
    llm, got = _engine_logits(tmp_path / "f32.gguf", ids)
    # The engine's own tokenizer (pre-tokenizer, merges, token types) splits text as transformers does.
    assert llm.tokenize(TEXT.encode(), add_bos=False, special=True) == ids
    span = ref.max() - ref.min()
    assert np.abs(got - ref).max() <= 1e-3 * span, np.abs(got - ref).max() / span
    export_gguf(checkpoint, tmp_path / "f16.gguf", "f16")
    _, got16 = _engine_logits(tmp_path / "f16.gguf", ids)
    err16 = np.abs(got16 - ref).max()
    assert err16 <= 1e-2 * span, err16 / span
    # A random tiny model has near-ties; where the winner leads by more than f16 can move, it must win.
    top2 = np.sort(ref, -1)[:, -2:]
    clear = (top2[:, 1] - top2[:, 0]) > 2 * err16
    assert clear.mean() > 0.5 and (got16.argmax(-1) == ref.argmax(-1))[clear].all()
    # q8_0: 8-bit blocks of 32 weights; the file runs and stays within quantization error (1-2% of
    # the logit span on these models).
    export_gguf(checkpoint, tmp_path / "q8.gguf", "q8_0")
    _, got8 = _engine_logits(tmp_path / "q8.gguf", ids, monkeypatch)
    err8 = np.abs(got8 - ref).max()
    assert err8 <= 5e-2 * span, err8 / span
    clear8 = (top2[:, 1] - top2[:, 0]) > 2 * err8
    assert (got8.argmax(-1) == ref.argmax(-1))[clear8].all()


def test_run_job_writes_gguf_and_portable_checkpoint(dense, tmp_path, capsys, tiny_qwen2, monkeypatch):
    text = tmp_path / "calib.txt"
    text.write_text(TEXT * 40)
    code, out, err = run_main(capsys, "run", str(dense), "-o", str(tmp_path / "job"), "--ratio", "0.3", "--portable",
                              "--round-to", "1", "--gguf", "f16", "--recovery", "none", "--calibration", str(text),
                              "--calibration-tokens", "512", "--json")
    assert code == 0, err
    summary = json.loads(out)
    final = tmp_path / "job" / "final"
    assert summary["final"]["gguf"]["architecture"] == "llama"
    assert (final / "model-f16.gguf").stat().st_size == summary["final"]["gguf"]["bytes"]
    assert "auto_map" not in json.loads((final / "config.json").read_text())
    assert "vLLM" in (final / "README.md").read_text()
    # A model the GGUF writer cannot express fails before any weights are loaded.
    import llm_prune.models

    monkeypatch.setattr(llm_prune.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    code, _, err = run_main(capsys, "run", str(tiny_qwen2), "-o", str(tmp_path / "j2"), "--ratio", "0.2",
                            "--gguf", "f16", "--recovery", "none")
    assert code == 2 and err.count("error:") == 1 and "GGUF export supports llama" in err


def test_the_base_models_license_carries_over_to_card_and_gguf(tmp_path, capsys):
    """A pruned model stays under its base model's license: the card's front matter and the GGUF's
    general.license say it, as the base model's card (or GGUF) did."""
    from llm_prune.card import card_license
    from llm_prune.models import source_license

    src = build_model(tmp_path / "base", "llama", layers=4, hidden=64, heads=4, kv_heads=2, intermediate=96)
    (src / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-community-license\n"
                                   "license_link: \"https://example.org/LICENSE: v2\"\ntags: [x]\n---\n# Tiny\n")
    wanted = {"license": "other", "license_name": "tiny-community-license",
              "license_link": "https://example.org/LICENSE: v2"}
    assert source_license(str(src)) == wanted
    code, _, err = run_main(capsys, "prune", str(src), "--ratio", "0.2", "--calibration-samples", "2",
                            "--calibration-seq-len", "16", "--reconstruct-tokens", "64", "-o", str(tmp_path / "p"))
    assert code == 0, err
    assert card_license(tmp_path / "p" / "README.md") == wanted
    code, _, err = run_main(capsys, "export", str(tmp_path / "p"), "-o", str(tmp_path / "p.gguf"))
    assert code == 0, err
    _, kv = _gguf_fields(tmp_path / "p.gguf")
    assert (kv["general.license"], kv["general.license.name"], kv["general.license.link"]) == tuple(wanted.values())
    # The packaged alias declares its license in its GGUF; a card without front matter declares none.
    assert source_license("smollm2-135m") == {"license": "apache-2.0"}
    (src / "README.md").write_text("# no front matter\n---\nlicense: mit\n")
    assert source_license(str(src)) == {}


def test_model_card_offers_gguf_only_where_export_writes_it(dense, tiny_qwen2):
    """The card's engine list is what `llm-prune export` does for that family: Qwen2 gets the
    reason instead of a command that is then refused."""
    from llm_prune.card import model_card
    from llm_prune.gguf_export import gguf_refusal

    cards = {}
    for name, src in (("llama", dense), ("qwen2", tiny_qwen2)):
        model, _ = load_model(str(src))
        cards[name] = model_card(base_model=name, recipe={}, shapes=layer_shapes(model), params_before=2,
                                 params_after=1, needs_remote_code=False, gguf_refusal=gguf_refusal(model.config))
    assert "`llm-prune export PATH --format gguf" in cards["llama"]
    assert "--format gguf" not in cards["qwen2"]
    assert "no GGUF export (GGUF export supports llama, mistral models, not 'qwen2'" in cards["qwen2"]


def test_what_llama_cpp_cannot_run_is_refused_before_the_work(dense, tmp_path, capsys):
    """An activation other than SiLU, a rope scaling the GGUF keys cannot describe, a SentencePiece
    tokenizer: `prune --gguf` refuses them before pruning, and the card offers no GGUF for them."""
    from llm_prune.card import model_card
    from llm_prune.gguf_export import gguf_refusal

    def variant(name, config=None, tokenizer=None):
        folder = tmp_path / name
        shutil.copytree(dense, folder)
        if config:
            data = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**data, **config}))
        if tokenizer:
            data = json.loads((folder / "tokenizer.json").read_text())
            data["model"] = {**data["model"], **tokenizer}
            (folder / "tokenizer.json").write_text(json.dumps(data))
        return folder

    for folder, needle in [
        (variant("gelu", {"hidden_act": "gelu_pytorch_tanh"}), "SiLU MLP, and this one uses 'gelu_pytorch_tanh'"),
        (variant("dynamic", {"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}}),
         "rope scaling 'dynamic' is not supported"),
        (variant("spm", tokenizer={"byte_fallback": True}), "this one is SentencePiece-like"),
    ]:
        out = tmp_path / f"{folder.name}-out"
        code, _, err = run_main(capsys, "prune", str(folder), "--ratio", "0.2", "--gguf", "f16", "-o", str(out))
        lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
        assert code == 2 and len(lines) == 1 and needle in lines[0] and "prune:" not in err, (folder.name, err)
        assert not out.exists()
        model, _ = load_model(str(folder))
        card = model_card(base_model="m", recipe={}, shapes=layer_shapes(model), params_before=2, params_after=1,
                          needs_remote_code=False, gguf_refusal=gguf_refusal(model.config, folder))
        assert "--format gguf" not in card and needle in card, folder.name


def test_card_names_the_base_model_by_its_hub_id(dense, tmp_path):
    """The Hub refuses a card whose `base_model` is no repository id: an alias names its source,
    a local folder is left out."""
    from llm_prune.card import model_card
    from llm_prune.models import hub_id

    assert hub_id("smollm2-135m") == hub_id("SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert hub_id("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert hub_id(str(dense)) is None and hub_id("model.gguf") is None and hub_id("a/b/c") is None
    (tmp_path / "org" / "name").mkdir(parents=True)
    assert hub_id(str(tmp_path / "org" / "name")) is None
    shapes = layer_shapes(load_model(str(dense))[0])
    for spec, line in (("smollm2-135m", "base_model: HuggingFaceTB/SmolLM2-135M-Instruct\n"), (str(dense), None)):
        card = model_card(base_model=spec, recipe={}, shapes=shapes, params_before=2, params_after=1,
                          needs_remote_code=False, base_model_id=hub_id(spec))
        front = card.split("---")[1]
        assert (line in front) if line else "base_model" not in front
        assert f"# {spec} — structurally pruned" in card


def test_a_gguf_input_keeps_a_tokenizer_the_size_of_its_embedding(portable, tmp_path):
    """transformers adds GPT-2's `<|endoftext|>` to a GGUF's BPE vocabulary that lacks it (Llama 3's
    does): a token past the embedding, which a text naming it would index. It goes on load."""
    from llm_prune.gguf_export import export_gguf

    export_gguf(portable, tmp_path / "m.gguf", "f32")
    model, tok = load_model(str(tmp_path / "m.gguf"))
    rows = model.get_input_embeddings().weight.shape[0]
    assert len(tok) == rows and "<|endoftext|>" not in tok.get_vocab()
    ids = tok("Paris<|endoftext|>")["input_ids"]
    assert max(ids) < rows
    model(torch.tensor([ids]))
    export_checkpoint(model, tok, tmp_path / "ckpt")
    assert export_gguf(tmp_path / "ckpt", tmp_path / "again.gguf", "f32")["path"]
