"""Bad input around models, outputs and plans: one `error:` line on the CLI, before any work where it
can be known before, and never a traceback or a silently wrong checkpoint."""

import json
import shutil

import pytest
import torch

from llm_prune.errors import UserError

FAST = ["--calibration-samples", "2", "--calibration-seq-len", "16"]


def run_main(capsys, *args) -> tuple[int, str, str]:
    from llm_prune.cli import main

    code = 0
    try:
        main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error(capsys, *args) -> str:
    code, _, err = run_main(capsys, *args)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, (args, err)
    return lines[0]


@pytest.fixture
def model_copy(tiny_llama, tmp_path):
    """A private copy of the tiny model: the session fixture must stay intact."""
    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


# 1. output under a regular file: refused before loading or pruning anything.
def test_output_below_a_file_is_refused_up_front(tiny_llama, tmp_path, capsys, monkeypatch):
    afile = tmp_path / "afile"
    afile.write_text("x")
    import llm_prune.prune_stage as stage

    monkeypatch.setattr(stage, "prune_to_checkpoint", lambda *a, **k: pytest.fail("pruned before the check"))
    line = one_error(capsys, "prune", tiny_llama, "--ratio", "0.2", "-o", afile / "sub" / "deeper", *FAST)
    assert "afile is a file, not a directory" in line


def test_check_output_dir(tmp_path):
    from llm_prune.paths import check_output_dir

    (tmp_path / "f").write_text("x")
    (tmp_path / "dangling").symlink_to(tmp_path / "missing")
    assert check_output_dir(tmp_path / "new" / "dir") == tmp_path / "new" / "dir"
    assert check_output_dir(tmp_path) == tmp_path
    for bad, needle in ((tmp_path / "f", "is a file"), (tmp_path / "f" / "sub", "is a file, not a directory"),
                        (tmp_path / "dangling" / "x", "link to nothing"), (tmp_path / ("x" * 300), "not usable")):
        with pytest.raises(UserError, match=needle) as exc:
            check_output_dir(bad, "output")
        assert exc.value.param == "output"


def test_output_that_is_the_input_model_is_refused(model_copy, capsys):
    before = (model_copy / "model.safetensors").read_bytes()
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", model_copy, *FAST)
    assert "input model's folder" in line
    assert (model_copy / "model.safetensors").read_bytes() == before


# 2. config.json that is not JSON.
def test_config_json_not_json(model_copy, tmp_path, capsys):
    (model_copy / "config.json").write_text("{bad")
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "config.json is not valid JSON" in line
    (model_copy / "config.json").write_text("[1, 2]")
    assert "expected a JSON object" in one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o",
                                                 tmp_path / "out", *FAST)


# 3. corrupt weights file.
def test_a_config_without_model_type_says_so(model_copy, tmp_path, capsys):
    """Not "unsupported architecture": its `architectures` may well name a supported one."""
    config = json.loads((model_copy / "config.json").read_text())
    del config["model_type"]
    (model_copy / "config.json").write_text(json.dumps(config))
    line = one_error(capsys, "prune", str(model_copy), "--ratio", "0.2", "-o", str(tmp_path / "out"))
    assert "config.json has no model_type" in line and "llama" in line, line


def test_corrupt_safetensors_names_the_file(model_copy, tmp_path, capsys):
    (model_copy / "model.safetensors").write_bytes(b"\xff" * 64)
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "model.safetensors" in line and "could not read model weights" in line


# 4. a .gguf file that is not GGUF.
def test_not_a_gguf_file(tmp_path, capsys):
    bad = tmp_path / "bad.gguf"
    bad.write_text("not a gguf file\n")
    line = one_error(capsys, "eval", bad, "--speed")
    assert "could not read model at" in line and "GGUF" in line


# 5. a device this machine does not have.
@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_unavailable_device(tiny_llama, tmp_path, capsys):
    line = one_error(capsys, "prune", tiny_llama, "--ratio", "0.2", "-o", tmp_path / "out", "--device", "mps", *FAST)
    assert "'mps'" in line and "not available" in line


def test_pick_device_rejects_what_it_cannot_use():
    from llm_prune.models import pick_device

    assert pick_device("cpu") == "cpu"
    bad = ["cuda:x", "xpu", "meta", "", "cuda:99"] + ([] if torch.backends.mps.is_available() else ["mps"])
    for device in bad:
        with pytest.raises(UserError) as exc:
            pick_device(device)
        assert exc.value.param == "device"


# 6. hand-edited plan.json.
@pytest.fixture
def plan_data(tiny_llama):
    """A real plan for tiny_llama solved for --ratio 0.2 (allocation only: no CLI run needed)."""
    from llm_prune.allocation import AllocationConfig, allocate
    from llm_prune.importance import ImportanceScorer
    from llm_prune.models import load_model
    from llm_prune.plan import unit_costs

    model, _ = load_model(str(tiny_llama))
    costs = unit_costs(model)
    calib = torch.randint(3, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = allocate(ImportanceScorer("l1").score(model, calib), costs, round(costs.total * 0.8), AllocationConfig())
    return plan.to_dict()


def _edited(data, edit):
    data = json.loads(json.dumps(data))
    edit(data)
    return data


PLAN_EDITS = {
    "empty list": (lambda d: [], "the list of stage plans is empty"),
    "params_before text": (lambda d: _edited(d, lambda x: x.update(params_before="abc")),
                           "params_before must be a positive integer"),
    "kv groups null": (lambda d: _edited(d, lambda x: x["layers"][1].update(keep_kv_groups=None)),
                       "layers[1].keep_kv_groups must be a list"),
    "every layer dropped": (lambda d: _edited(d, lambda x: [lp.update(drop=True) for lp in x["layers"]]),
                            "every layer is dropped"),
    "index twice": (lambda d: _edited(d, lambda x: x["layers"][1].update(index=0)), "appears twice"),
    "index out of range": (lambda d: _edited(d, lambda x: x["layers"][1].update(index=7)), "layer index from 0"),
    "drop as text": (lambda d: _edited(d, lambda x: x["layers"][0].update(drop="yes")), "drop must be true"),
    "not an object": (lambda d: "plan", "expected a JSON object"),
    "channel out of range": (lambda d: _edited(d, lambda x: x["layers"][1].update(keep_channels=[0, 10**6])),
                             "keeps MLP channel 1000000"),
    "kv group out of range": (lambda d: _edited(d, lambda x: x["layers"][1].update(keep_kv_groups=[0, 50])),
                              "keeps KV group 50"),
    "stage plans that do not chain": (lambda d: [d, _edited(d, lambda x: x["layers"].append(x["layers"][0]))],
                                      "not a plan.json"),
}


@pytest.mark.parametrize("case", list(PLAN_EDITS))
def test_hand_edited_plan(case, plan_data, tiny_llama, tmp_path, capsys):
    make, needle = PLAN_EDITS[case]
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(make(plan_data)))
    out = tmp_path / "out"
    line = one_error(capsys, "prune", tiny_llama, "-o", out, "--plan", path)
    assert needle in line, line
    assert not out.exists()  # refused before anything was written


# 7. a budget flag that disagrees with --plan.
def test_budget_flag_must_agree_with_plan(plan_data, tiny_llama, tmp_path, capsys):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan_data))
    line = one_error(capsys, "prune", tiny_llama, "--ratio", "0.6", "--plan", path, "-o", tmp_path / "bad")
    assert "--ratio 0.6" in line and "the plan fixes the cut" in line
    assert not (tmp_path / "bad").exists()
    line = one_error(capsys, "prune", tiny_llama, "--target-params", "1000", "--plan", path, "-o", tmp_path / "bad")
    assert "--target-params 1000" in line
    # The budget the plan was solved for is accepted, and recorded.
    code, _, err = run_main(capsys, "prune", tiny_llama, "--ratio", "0.2", "--plan", path, "-o", tmp_path / "ok",
                            "--json")
    assert code == 0, err
    assert json.loads((tmp_path / "ok" / "config.json").read_text())["llm_prune"]["recipe"]["budget"]["ratio"] == 0.2


# 8. exporting over the checkpoint's own files.
@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_export_refuses_the_checkpoints_own_files(name, model_copy, tmp_path, capsys):
    before = (model_copy / name).read_bytes()
    line = one_error(capsys, "export", model_copy, "-o", model_copy / name, "--force")
    assert "is a file of the checkpoint" in line
    link = tmp_path / "link"
    link.symlink_to(model_copy)
    assert "is a file of the checkpoint" in one_error(capsys, "export", model_copy, "-o", link / name, "--force")
    assert (model_copy / name).read_bytes() == before


# 9. hostile config.json: one `error:` line before any module is built, never a traceback.
def _edit_config(folder, edit):
    config = json.loads((folder / "config.json").read_text())
    edit(config)
    (folder / "config.json").write_text(json.dumps(config))


CONFIG_EDITS = {
    "layers huge": (dict(num_hidden_layers=10**7), "num_hidden_layers must be a positive integer"),
    "layers zero": (dict(num_hidden_layers=0), "num_hidden_layers must be a positive integer"),
    "layers negative": (dict(num_hidden_layers=-1), "num_hidden_layers must be a positive integer"),
    "kv heads zero": (dict(num_key_value_heads=0), "num_key_value_heads must be a positive integer"),
    "heads zero": (dict(num_attention_heads=0), "num_attention_heads must be a positive integer"),
    "head_dim zero": (dict(head_dim=0), "head_dim must be a positive integer"),
    "hidden negative": (dict(hidden_size=-64), "hidden_size must be a positive integer"),
    "hidden huge": (dict(hidden_size=10**9), "hidden_size must be a positive integer up to"),
    "vocab zero": (dict(vocab_size=0), "vocab_size must be a positive integer"),
    "max positions negative": (dict(max_position_embeddings=-5), "max_position_embeddings must be a positive"),
    "eos past vocab": (dict(eos_token_id=10**6), "eos_token_id must be a token id from 0 below vocab_size"),
    "pad past vocab": (dict(pad_token_id=10**6), "pad_token_id must be a token id"),
    "kv heads do not divide": (dict(num_key_value_heads=3), "is not a multiple of num_key_value_heads"),
    "activation unknown": (dict(hidden_act="evil"), "hidden_act \"evil\" is not an activation"),
    "rope factor text": (dict(rope_scaling={"type": "yarn", "factor": "x"}), "factor must be a number"),
    "rope type unknown": (dict(rope_parameters={"rope_type": "nonexistent", "rope_theta": 10000.0}),
                          "rope type \"nonexistent\" is not one transformers knows"),
    "rope theta text": (dict(rope_parameters={"rope_type": "default", "rope_theta": "abc"}),
                        "rope_theta must be a number"),
    "dtype unknown": (dict(dtype="float1337"), "dtype \"float1337\" is not a floating-point torch dtype"),
    "model_type list": (dict(model_type=["llama"]), "model_type must be a string"),
}


@pytest.mark.parametrize("case", list(CONFIG_EDITS))
def test_hostile_config_values_are_one_line(case, model_copy, tmp_path, capsys, few_layers_built):
    values, needle = CONFIG_EDITS[case]
    _edit_config(model_copy, lambda c: c.update(values))
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert needle in line and "config.json" in line, line
    assert not few_layers_built  # refused before any module was built


CONFIG_TEXTS = {
    "a 5000-digit number": ('{"model_type": "llama", "vocab_size": ' + "9" * 5000 + "}", "thousands of digits"),
    "100000-deep nesting": ('{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}",
                            "nested too deeply"),
    "null": ("null", "expected a JSON object, got NoneType"),
}


@pytest.mark.parametrize("case", list(CONFIG_TEXTS))
def test_config_text_python_cannot_parse_is_one_line(case, model_copy, tmp_path, capsys):
    text, needle = CONFIG_TEXTS[case]
    (model_copy / "config.json").write_text(text)
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert needle in line and "Exceeds the limit" not in line, line


def test_quantization_without_its_library_is_one_line(model_copy, tmp_path, capsys):
    pytest.importorskip("torch")
    try:
        import bitsandbytes  # noqa: F401
        pytest.skip("bitsandbytes is installed")
    except ImportError:
        pass
    _edit_config(model_copy, lambda c: c.update(quantization_config={"quant_method": "bitsandbytes",
                                                                     "load_in_4bit": True}))
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert f"cannot build/load {model_copy} from its files" in line and "bitsandbytes" in line, line


# 10. config.json that is no regular file: never read (a device read until memory ran out, a FIFO forever).
def test_config_json_that_is_a_device_or_directory(model_copy, tmp_path, capsys):
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").symlink_to("/dev/null")
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "config.json is not a regular file" in line, line
    (model_copy / "config.json").unlink()
    (model_copy / "config.json").mkdir()
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "config.json is a directory" in line and "unsupported architecture" not in line, line


def test_config_json_that_is_a_fifo_is_not_opened(model_copy, tmp_path, capsys, fifo_writer):
    (model_copy / "config.json").unlink()
    fifo_writer(model_copy / "config.json")
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "config.json is not a regular file" in line, line


@pytest.mark.parametrize("name", ["tokenizer.json", "generation_config.json"])
def test_tokenizer_or_generation_config_that_is_a_fifo(name, model_copy, tmp_path, capsys, fifo_writer):
    (model_copy / name).unlink(missing_ok=True)
    fifo_writer(model_copy / name)
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert f"{name} is not a regular file" in line, line


def test_oversized_config_json_is_not_read(model_copy, tmp_path, capsys):
    with open(model_copy / "config.json", "r+b") as fh:
        fh.truncate(100 * 1024 * 1024)  # sparse: no disk used
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "config.json is 100 MiB; a file of this kind is at most" in line, line


# 11. broken weight files and indexes: the one line truncated safetensors get.
def test_pickled_weights_with_more_than_tensors(model_copy, tmp_path, capsys):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("this ran",))

    (model_copy / "model.safetensors").unlink()
    (model_copy / "pytorch_model.bin").write_bytes(pickle.dumps({"model.embed_tokens.weight": Evil()}))
    code, out, err = run_main(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    assert "could not read model weights" in lines[0] and "pickled" in lines[0], lines
    assert "this ran" not in out + err


INDEXES = {
    "shard outside the folder": ("model.safetensors.index.json",
                                 {"metadata": {}, "weight_map": {"lm_head.weight": "../../etc/passwd"}},
                                 "outside the model's folder"),
    "absolute shard": ("model.safetensors.index.json", {"metadata": {}, "weight_map": {"x": "/etc/passwd"}},
                       "outside the model's folder"),
    "not JSON": ("model.safetensors.index.json", "{bad", "is not valid JSON"),
    "no weight_map": ("model.safetensors.index.json", {"metadata": {}}, "no weight_map object"),
    "weight_map a list": ("model.safetensors.index.json", {"metadata": {}, "weight_map": ["a"]},
                          "no weight_map object"),
    "bin index without metadata": ("pytorch_model.bin.index.json", {"weight_map": {"x": "pytorch_model-1.bin"}},
                                   "no metadata object"),
}


@pytest.mark.parametrize("case", list(INDEXES))
def test_broken_weight_index_is_one_line(case, model_copy, tmp_path, capsys):
    name, content, needle = INDEXES[case]
    (model_copy / "model.safetensors").unlink()
    (model_copy / name).write_text(content if isinstance(content, str) else json.dumps(content))
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert f"could not read model weights {model_copy / name}" in line and needle in line, line


# 12. a tokenizer that names tokens the model has no embedding row for.
def test_tokenizer_larger_than_the_embedding(model_copy, tmp_path, capsys):
    from tests.tiny_models import build_tokenizer

    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / f).unlink(missing_ok=True)
    tok = build_tokenizer(model_copy, vocab_size=600)
    assert len(tok) > 320
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert f"has {len(tok)} tokens but the model's embedding only 320 rows" in line, line


def test_added_token_past_the_embedding(model_copy, tmp_path, capsys):
    data = json.loads((model_copy / "tokenizer.json").read_text())
    data["added_tokens"].append({"id": 10**9, "content": "<evil>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (model_copy / "tokenizer.json").write_text(json.dumps(data))
    out = tmp_path / "out"
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", out, *FAST)
    assert "the tokenizer of" in line and "320" in line, line
    assert not (out / "model.safetensors").exists()


def test_tokenizer_json_without_added_tokens(model_copy, tmp_path, capsys):
    data = json.loads((model_copy / "tokenizer.json").read_text())
    del data["added_tokens"]
    (model_copy / "tokenizer.json").write_text(json.dumps(data))
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "the tokenizer of" in line and "cannot be read" in line, line


# 13. a refused load is one line, not transformers' table of missing keys before it.
@pytest.fixture
def transformers_log():
    """The messages transformers logs (its logger does not propagate to pytest's capture)."""
    import logging

    messages = []

    class Grab(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Grab(logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield messages
    logger.removeHandler(handler)


def test_refused_load_prints_no_loading_report(model_copy, tmp_path, capsys, transformers_log):
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_copy / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    line = one_error(capsys, "prune", model_copy, "--ratio", "0.2", "-o", tmp_path / "out", *FAST)
    assert "is incomplete" in line
    assert not [m for m in transformers_log if "LOAD REPORT" in m], transformers_log


def test_a_load_that_succeeds_keeps_its_loading_report(model_copy, transformers_log):
    from safetensors.torch import load_file, save_file

    from llm_prune.models import load_model

    tensors = load_file(model_copy / "model.safetensors")
    tensors["extra.weight"] = torch.zeros(2)
    save_file(tensors, model_copy / "model.safetensors", metadata={"format": "pt"})
    load_model(str(model_copy))
    assert [m for m in transformers_log if "LOAD REPORT" in m and "UNEXPECTED" in m], transformers_log


# 14. an llm-prune checkpoint whose per_layer_config was edited.
@pytest.fixture(scope="module")
def per_layer_checkpoint(tmp_path_factory):
    from llm_prune.export import export_checkpoint
    from llm_prune.models import load_model
    from llm_prune.prune import Budget, PruningConfig, prune_model
    from tests.tiny_models import build_model

    src = build_model(tmp_path_factory.mktemp("dense"), "llama")
    model, tok = load_model(str(src))
    result = prune_model(model, tok, Budget(ratio=0.3), PruningConfig(calibration_samples=2, calibration_seq_len=16,
                                                                      skip_first=0, skip_last=1, prune_layers=0))
    out = tmp_path_factory.mktemp("hetero")
    assert export_checkpoint(result.model, tok, out, extra_meta={"base_model": str(src)})["needs_remote_code"]
    return out


PER_LAYER_EDITS = {
    "not an object": (lambda p: ["garbage"], "per_layer_config must be an object"),
    "kv heads zero": (lambda p: {**p, "1": {**p["1"], "num_key_value_heads": 0}},
                      "per_layer_config[1]: num_key_value_heads must be a positive integer"),
    "layer past the end": (lambda p: {**p, "99": p["1"]}, "per_layer_config names layer \"99\""),
}


@pytest.mark.parametrize("case", list(PER_LAYER_EDITS))
@pytest.mark.parametrize("command", ["eval", "export"])
def test_edited_per_layer_config(case, command, per_layer_checkpoint, tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(per_layer_checkpoint, ckpt)
    edit, needle = PER_LAYER_EDITS[case]
    _edit_config(ckpt, lambda c: c.update(per_layer_config=edit(c["per_layer_config"])))
    args = ["--speed"] if command == "eval" else ["-o", tmp_path / "exported"]
    line = one_error(capsys, command, ckpt, *args)
    assert needle in line, line
