"""Bad input to `run`, `select` and `eval` (recipe files, calibration records, output paths, a
results file that is not ours): one `error:` line before any work, and nothing of the user's lost."""

import json
import re

from llm_prune.evaluate import write_eval_results
from tests.test_pruning import run_main


def _one_error(capsys, *args) -> str:
    code, _, err = run_main(capsys, *args)
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert code != 0 and len(lines) == 1 and "Traceback" not in err, (args, err)
    return lines[0]


def test_recipe_files_that_cannot_be_read(tmp_path, capsys):
    (tmp_path / "dir.yaml").mkdir()
    (tmp_path / "bin.json").write_bytes(b"\xff\xfe\x00garbage\x80")
    assert "not a file" in _one_error(capsys, "run", "--recipe", str(tmp_path / "dir.yaml"), "-o", str(tmp_path / "o"))
    assert "cannot read recipe file" in _one_error(capsys, "run", "--recipe", str(tmp_path / "bin.json"),
                                                   "-o", str(tmp_path / "o"))


def test_text_that_is_not_utf8_is_one_line_before_any_work(tmp_path, capsys):
    """An argument in another encoding than UTF-8 (Python keeps its bytes as surrogates) passed
    validation, and run crashed writing recipe.json (PydanticSerializationError) once the job had
    started."""
    bad = b"a\xffb".decode("utf-8", "surrogateescape")
    for flag, value in (("--device", bad), ("--data", bad), ("--eval-ppl", bad), ("--embedding-model", bad),
                        ("--calibration", bad), ("--target-modules", bad),
                        ("--metadata", json.dumps({"k": [bad]}, ensure_ascii=False))):
        line = _one_error(capsys, "run", "m", "-o", str(tmp_path / "o"), "--ratio", "0.2", flag, value)
        assert line == f"error: {flag}: 'a\\xffb' is not UTF-8 text (bytes of another encoding?); give it in UTF-8"
    assert "'\\xff' is not UTF-8 text" in _one_error(capsys, "prune", "m", "-o", str(tmp_path / "p"), "--ratio", "0.2",
                                                    "--calibration", bad[1])


def test_calibration_text_that_is_not_a_string(tiny_llama, tmp_path, capsys):
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"text": "fine words here"}\n{"text": 5}\n')
    assert 'line 2: "text" must be a string' in _one_error(
        capsys, "prune", str(tiny_llama), "--ratio", "0.2", "--calibration", str(calib), "-o", str(tmp_path / "o"))


def test_eval_results_file_that_is_not_ours_is_set_aside(tmp_path):
    (tmp_path / "eval_results.json").write_text("[1, 2]")
    write_eval_results(tmp_path, {"params": 7}, name="pruned")
    assert json.loads((tmp_path / "eval_results.json").read_text())["pruned"] == {"params": 7}
    (kept,) = tmp_path.glob("eval_results.json.unreadable-*")
    assert kept.read_text() == "[1, 2]"


def test_outputs_that_are_or_sit_under_files(tiny_llama, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a", "output": "b"}\n')
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    assert "is a file" in _one_error(capsys, "run", str(tiny_llama), "--ratio", "0.2", "-o", str(afile))
    assert "is a file" in _one_error(capsys, "select", str(pool), "--method", "random", "-o", str(afile / "x"))
    assert "is a directory" in _one_error(capsys, "eval", str(tiny_llama), "--ppl", str(text), "--output",
                                          str(tmp_path))
    assert "is a file" in _one_error(capsys, "eval", str(tiny_llama), "--ppl", str(text), "--output",
                                     str(afile / "r.json"))


def test_a_gguf_beside_a_checkpoint_is_not_read_as_the_checkpoint(tiny_llama, tmp_path, capsys):
    out = tmp_path / "p"
    code, _, err = run_main(capsys, "prune", str(tiny_llama), "--ratio", "0.3", "--calibration-samples", "2",
                            "--calibration-seq-len", "16", "-o", str(out), "--gguf", "f16")
    assert code == 0, err
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    assert "per-layer widths" in _one_error(capsys, "eval", str(out / "model-f16.gguf"), "--ppl", str(text))


def test_a_tokenizer_file_that_is_not_one_is_an_error_for_gguf(tiny_llama, tmp_path, capsys):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_llama, ckpt)
    for bad in ('{"model": ', "[1, 2]", '{"model": {"type": "BPE"}, "decoder": "x"}'):
        (ckpt / "tokenizer.json").write_text(bad)
        assert "is not a tokenizer file" in _one_error(capsys, "export", str(ckpt), "-o", str(tmp_path / "m.gguf"),
                                                       "--force")


def test_diverged_recovery_is_not_published(tiny_llama, tmp_path):
    import pytest

    from llm_prune import pipeline
    from llm_prune.errors import UserError
    from llm_prune.recipe import parse_recipe

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"Say {i}.", "output": f"It is {i}."}) + "\n"
                            for i in range(12)))
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    recipe = parse_recipe({"model": str(tiny_llama), "budget": {"ratio": 0.1},
                           "pruning": {"calibration": str(text), "calibration_samples": 2, "calibration_seq_len": 16},
                           "data": {"pool": str(pool), "selection": "random", "budget": 8},
                           "recovery": {"method": "full", "max_steps": 2, "micro_batch_size": 2, "cutoff_len": 32,
                                        "learning_rate": 1e30}})
    with pytest.raises(UserError, match="recovery training diverged"):
        pipeline.run_recipe(recipe, tmp_path / "job")
    assert not (tmp_path / "job" / "final").exists()


def test_original_and_pruned_with_other_vocabularies_are_refused(tiny_llama):
    import pytest

    from data_selection import select_records
    from data_selection.pool import Record
    from llm_prune.errors import UserError
    from llm_prune.models import load_model

    original = load_model(str(tiny_llama))
    other, tok = load_model(str(tiny_llama))
    other.resize_token_embeddings(other.get_input_embeddings().weight.shape[0] - 20)
    records = [Record(prompt=f"Say {i}.", response=f"It is {i}.", source_id=str(i)) for i in range(6)]
    for method in ("loss", "paser"):
        with pytest.raises(UserError, match="different vocabularies"):
            select_records(records, method=method, budget=2, original=original, pruned=(other, tok))


def test_recovery_cutoff_longer_than_the_context_is_refused(tiny_llama, tmp_path):
    import pytest

    from llm_prune.errors import UserError
    from llm_prune.models import load_model
    from recovery import recover

    model, tok = load_model(str(tiny_llama))
    with pytest.raises(UserError, match="longer than the model's context of 512"):
        recover(model, tok, [{"prompt": "Say 1.", "response": "One."}],
                {"method": "lora", "max_steps": 1, "cutoff_len": 4096}, tmp_path / "r")


def test_settings_the_model_cannot_take_fail_before_pruning(tiny_llama, tmp_path, capsys):
    """A LoRA rank above the hidden size (64 here) can only allocate, and a window past the context
    (512) reaches untrained positions: `run` refuses both from the model's config, before any stage."""
    import pytest

    from llm_prune.errors import UserError
    from llm_prune.models import load_model
    from recovery import recover

    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a", "output": "b"}\n')
    out = tmp_path / "o"
    assert "--lora-r 65 is above the model's hidden size of 64" in _one_error(
        capsys, "run", str(tiny_llama), "--ratio", "0.2", "--data", str(pool), "--lora-r", "65", "-o", str(out))
    assert "--calibration-seq-len 1024 is longer than the model's context of 512" in _one_error(
        capsys, "run", str(tiny_llama), "--ratio", "0.2", "--recovery", "none", "--calibration-seq-len", "1024",
        "-o", str(out))
    assert not out.exists() or not any(out.iterdir())  # no stage ran
    model, tok = load_model(str(tiny_llama))
    with pytest.raises(UserError, match="above the model's hidden size"):
        recover(model, tok, [{"prompt": "Say 1.", "response": "One."}],
                {"method": "perp_lora", "max_steps": 1, "lora_r": 100}, tmp_path / "r")


def test_an_empty_module_list_is_refused_not_read_as_all(tmp_path, capsys):
    assert "--target-modules: names no module" in _one_error(
        capsys, "run", "smollm2-135m", "--ratio", "0.2", "--target-modules", "", "-o", str(tmp_path / "o"))


def test_run_never_replaces_folders_it_did_not_write(tiny_llama, tmp_path, capsys):
    """`llm-prune prune -o work/pruned`, then `llm-prune run -o work`: the stage would restart in a
    folder no run wrote, deleting it (and a pool kept there)."""
    out = tmp_path / "work"
    (out / "selection").mkdir(parents=True)
    pool = out / "selection" / "pool.jsonl"
    pool.write_text('{"instruction": "a", "output": "b"}\n' * 4)
    line = _one_error(capsys, "run", str(tiny_llama), "--ratio", "0.2", "--data", str(pool), "--selection", "random",
                      "--max-steps", "1", "-o", str(out))
    assert "holds files no run of a recipe wrote there" in line and "selection" in line
    assert pool.read_text().count("\n") == 4


def test_select_never_writes_over_or_into_its_pool(tmp_path, capsys):
    folder = tmp_path / "pool"
    folder.mkdir()
    (folder / "selected.jsonl").write_text('{"instruction": "a", "output": "b"}\n' * 6)
    assert "would overwrite the pool" in _one_error(
        capsys, "select", str(folder / "selected.jsonl"), "--method", "random", "--budget", "2", "-o", str(folder))
    assert "is inside the pool folder" in _one_error(
        capsys, "select", str(folder), "--method", "random", "--budget", "2", "-o", str(folder / "out"))
    assert (folder / "selected.jsonl").read_text().count("\n") == 6 and not (folder / "out").exists()
    # `run` too: its recipe.json and inputs.json would be read as records, and a rerun refused.
    assert "is inside the pool folder" in _one_error(
        capsys, "run", "m", "--ratio", "0.2", "--data", str(folder), "--selection", "random", "-o", str(folder / "job"))
    assert not (folder / "job").exists()


def test_run_refuses_what_selection_and_recovery_would_refuse_before_it_prunes(tiny_llama, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(3)))
    base = ["run", str(tiny_llama), "--ratio", "0.2", "--data", str(pool), "--max-steps", "1"]
    assert "the pool has 3 records; clustering needs at least 4" in _one_error(capsys, *base, "-o", str(tmp_path / "a"))
    pool.write_text("".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(8)))
    assert "--clusters 5 is too many for 8 records" in _one_error(capsys, *base, "--clusters", "5",
                                                                   "-o", str(tmp_path / "b"))
    assert "no linear layer named qkv" in _one_error(capsys, *base, "--selection", "random", "--target-modules",
                                                      "qkv", "-o", str(tmp_path / "c"))
    for name in "abc":  # refused before the first stage: no stage folder was made
        assert not (tmp_path / name / "baseline").exists()


def test_a_rerun_notices_an_input_file_that_changed_under_its_name(tiny_llama, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("the cat sat on the mat. " * 100)
    argv = ["run", str(tiny_llama), "--ratio", "0.2", "--recovery", "none", "--eval-ppl", str(text),
            "--calibration-samples", "2", "--calibration-seq-len", "16", "--reconstruct-tokens", "64",
            "-o", str(tmp_path / "job")]
    code, _, err = run_main(capsys, *argv)
    assert code == 0, err
    assert run_main(capsys, *argv)[0] == 0  # unchanged: resumes (everything is done)
    text.write_text("a different held-out text. " * 100)
    assert "differs in the content of evaluation.ppl" in _one_error(capsys, *argv)


def test_select_takes_the_training_limits(tiny_llama, tmp_path, capsys):
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a", "output": "b"}\n' * 8)
    assert "--cutoff-len 100000 is longer than the model's context of 512" in _one_error(
        capsys, "select", str(pool), "--method", "loss", "--original", str(tiny_llama), "--pruned", str(tiny_llama),
        "--cutoff-len", "100000", "-o", str(tmp_path / "o"))


def test_eval_and_prune_never_write_over_what_they_read_or_what_is_not_theirs(tiny_llama, tmp_path, capsys):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    weights = (model / "model.safetensors").read_bytes()
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    ev = ["eval", str(model), "--ppl", str(text), "--seq-len", "16", "--max-windows", "2"]
    assert "inside the model folder" in _one_error(capsys, *ev, "--output", str(model / "model.safetensors"))
    assert "the text being measured" in _one_error(capsys, *ev, "--output", str(text))
    code, out, err = run_main(capsys, *ev, "--compare", str(tmp_path / "nothere"))
    assert code == 2 and "model path not found" in err and "ppl" not in out  # refused before any evaluation
    assert "is not usable: File name too long" in _one_error(capsys, *ev, "--output", str(tmp_path / ("a" * 300)))
    assert (model / "model.safetensors").read_bytes() == weights and text.read_text().startswith("the cat")
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "README.md").write_text("my notes")
    assert "holds other files (it is not an llm-prune checkpoint)" in _one_error(
        capsys, "prune", str(model), "--ratio", "0.2", "--no-reconstruct", "-o", str(theirs))
    assert (theirs / "README.md").read_text() == "my notes"
    assert "not both" in _one_error(capsys, "prune", str(model), "--ratio", "0.2", "--target-params", "9",
                                    "-o", str(tmp_path / "p"))
    (tmp_path / "bin.txt").write_bytes(bytes(range(256)) * 8)
    assert "calibration file is not UTF-8 text" in _one_error(
        capsys, "prune", str(model), "--ratio", "0.2", "--calibration", str(tmp_path / "bin.txt"),
        "-o", str(tmp_path / "p"))


def test_eval_refuses_a_dataset_column_that_is_not_text(tiny_llama, tmp_path, capsys):
    import datasets

    datasets.Dataset.from_dict({"text": ["hello world " * 50] * 4, "num": [1, 2, 3, 4]}).save_to_disk(tmp_path / "ds")
    assert "column 'num' of the dataset holds" in _one_error(
        capsys, "eval", str(tiny_llama), "--ppl-dataset", str(tmp_path / "ds"), "--column", "num", "--seq-len", "16")
    # The results file may not go into the dataset folder (it replaced dataset_info.json and the like).
    assert "inside) the text being measured" in _one_error(
        capsys, "eval", str(tiny_llama), "--ppl-dataset", str(tmp_path / "ds"), "--seq-len", "16", "--output",
        str(tmp_path / "ds" / "dataset_info.json"))
    # --split and --column choose a dataset's text: with --ppl FILE (or nothing) they would do nothing.
    (tmp_path / "t.txt").write_text("hello world " * 50)
    assert "--split and --column choose the text of --ppl-dataset, which is not given (--ppl reads the whole file)" \
        in _one_error(capsys, "eval", str(tiny_llama), "--ppl", str(tmp_path / "t.txt"), "--split", "train",
                      "--column", "x")
    assert "--column chooses the text of --ppl-dataset, which is not given" in _one_error(
        capsys, "eval", str(tiny_llama), "--tasks", "piqa", "--column", "text")
    # So do the perplexity windows without a text.
    assert "--seq-len and --max-windows set the perplexity windows, which need --ppl FILE or --ppl-dataset" \
        in _one_error(capsys, "eval", str(tiny_llama), "--tasks", "boolq", "--seq-len", "256", "--max-windows", "3")
    assert "--max-windows sets the perplexity windows" in _one_error(
        capsys, "eval", str(tiny_llama), "--speed", "--max-windows", "3")
    datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": ["a b"]})}).save_to_disk(tmp_path / "dd")
    (tmp_path / "dd" / "dataset_dict.json").write_text('{"not": "splits"}')  # clobbered by another tool
    assert "could not load dataset" in _one_error(
        capsys, "eval", str(tiny_llama), "--ppl-dataset", str(tmp_path / "dd"), "--seq-len", "16")


def test_eval_refuses_windows_past_the_context_as_run_does(tiny_llama, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat. " * 200)
    assert "--seq-len 100000 is longer than the model's context of 512 tokens" in _one_error(
        capsys, "eval", str(tiny_llama), "--ppl", str(text), "--seq-len", "16,100000", "--json")
    code, out, err = run_main(capsys, "eval", str(tiny_llama), "--ppl", str(text), "--seq-len", "16,max",
                              "--max-windows", "1", "--json")
    assert code == 0 and set(json.loads(out)["ppl_by_seq_len"]) == {"16", "512"}, err


def test_mistyped_options_and_values_are_one_line(capsys):
    """Usage errors (parsed before any command runs) read like every other refusal."""
    assert "--limit" in _one_error(capsys, "eval", "m", "--limit", "0")
    assert "No such option: --bogus" in _one_error(capsys, "prune", "m", "-o", "x", "--bogus")
    assert "Missing option '--output'" in _one_error(capsys, "prune", "m")
    assert "No such command 'nosuch'" in _one_error(capsys, "nosuch")
    assert "requires an argument" in _one_error(capsys, "eval", "m", "--seq-len")
    assert "integers of at least 2" in _one_error(capsys, "eval", "m", "--seq-len", "1", "--tasks", "piqa")


def test_settings_a_method_never_reads_are_told(tiny_llama, tmp_path, capsys):
    """Not silently ignored: `select` refuses PASER's options for another method; `run` warns of
    recovery settings it will not use (a recipe may carry them for another method)."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(f'{{"instruction": "q{i}", "output": "a{i}"}}\n' for i in range(8)))
    for flags in (["--clusters", "3"], ["--no-conflict-filter"], ["--embedding-model", "/x"]):
        assert "only PASER uses them, not random" in _one_error(
            capsys, "select", str(pool), "--method", "random", "--budget", "2", *flags, "-o", str(tmp_path / "s"))
    code, _, err = run_main(capsys, "run", str(tiny_llama), "--ratio", "0.2", "--recovery", "full", "--keep-adapter",
                            "--calibration-samples", "2", "--calibration-seq-len", "16", "--reconstruct-tokens", "64",
                            "-o", str(tmp_path / "job"))
    assert code == 0, err
    assert "warning: no recovery pool (--data): recovery is skipped" in err
    code, out, err = run_main(capsys, "run", str(tiny_llama), "--ratio", "0.2", "--recovery", "none", "--distill",
                              "0.5", "--lora-r", "4", "--calibration-samples", "2", "--calibration-seq-len", "16",
                              "--reconstruct-tokens", "64", "-o", str(tmp_path / "job2"), "--json")
    assert code == 0, err
    json.loads(out)  # stdout stays the results; the warning goes beside it, --json or not
    assert "warning: --distill, --lora-r: recovery is off (--recovery none)" in err


def test_pruning_options_the_cut_never_reads_are_told(tiny_llama, tmp_path, capsys):
    """`prune` (and `run`, through the recipe) warns of pruning options the chosen cut ignores,
    and prunes all the same."""
    code, out, err = run_main(capsys, "prune", str(tiny_llama), "--ratio", "0.2", "--calibration-samples", "2",
                              "--calibration-seq-len", "16", "--calibration-tokens", "64", "--no-reconstruct",
                              "--reconstruct-damp", "0.3", "--adaptive-strength", "1", "--prune-layers", "0",
                              "--depth-share", "0.2", "-o", str(tmp_path / "p"), "--json")
    assert code == 0, err
    json.loads(out)
    warned = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warned == ["warning: --adaptive-strength: not used without --allocation adaptive",
                      "warning: --depth-share: not used with --prune-layers, which gives the number of layers to drop",
                      "warning: --reconstruct-damp: not used with --no-reconstruct",
                      "warning: --calibration-tokens: not used with --calibration-samples, which replaces the token "
                      "budget"]
    code, _, err = run_main(capsys, "prune", str(tiny_llama), "--ratio", "0.2", "--calibration-samples", "2",
                            "--calibration-seq-len", "16", "--reconstruct-tokens", "64", "-o", str(tmp_path / "q"))
    assert code == 0, err
    assert "warning" not in err  # the defaults and the options they read: nothing to tell
    code, _, err = run_main(capsys, "run", str(tiny_llama), "--ratio", "0.2", "--recovery", "none", "--portable", "--round-to", "1",
                            "--skip-first", "2", "--calibration-samples", "2", "--calibration-seq-len", "16",
                            "--reconstruct-tokens", "64", "-o", str(tmp_path / "job"))
    assert code == 0, err
    assert "--skip-first: not used with --portable, which sets every layer's widths" in err


def test_pruning_unused_settings_follow_the_cut():
    from llm_prune.recipe import PruningConfig

    assert PruningConfig().unused_settings() == []
    used = dict(allocation="adaptive", adaptive_strength=1.0, adaptive_step=0.1, rescore_every=2, prune_layers=1,
                reconstruct_damp=0.2, calibration_tokens=512)
    assert PruningConfig(**used).unused_settings() == []
    assert PruningConfig(allocation="adaptive", skip_last=2, depth_above=0.2).unused_settings() == [
        "--skip-last: not used with --allocation adaptive, which decides every layer's sparsity",
        "--depth-above: not used in staged or adaptive pruning: whole layers go there only as many as "
        "--prune-layers says"]
    assert PruningConfig(stages=2, depth_share=0.3).unused_settings()[0].startswith("--depth-share: not used in staged")
    assert PruningConfig(portable=True, allocation="adaptive", adaptive_strength=1.0).unused_settings() == [
        "--allocation: not used with --portable, which sets every layer's widths",
        "--adaptive-strength: not used without --allocation adaptive"]


def test_an_evaluation_window_past_the_context_is_refused_before_any_stage(tiny_llama, tmp_path, capsys):
    """It was found only after the dense model's evaluation had run (and, over HTTP, accepted)."""
    (tmp_path / "t.txt").write_text("hello world " * 50)
    line = _one_error(capsys, "run", str(tiny_llama), "--ratio", "0.2", "--recovery", "none", "--eval-ppl",
                      str(tmp_path / "t.txt"), "--seq-len", "100000", "-o", str(tmp_path / "job"))
    assert "--seq-len 100000 is longer than the model's context" in line
    assert not (tmp_path / "job" / "baseline").exists()


def test_a_full_disk_under_a_writer_that_is_not_pythons_is_one_line(tiny_llama, tmp_path, capsys, monkeypatch):
    """safetensors reports a full disk in its own exception, with the OS's words; torch's writers in
    a RuntimeError: the CLI says it as it says ENOSPC, in one line, without a traceback. Python's
    own ENOSPC (the config or tokenizer files) is said the same way: it was "could not write the
    checkpoint", exit status 2, the status of a user's mistake."""
    import errno

    from safetensors import SafetensorError

    import llm_prune.export

    for fault in (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
                  OSError(errno.ENOSPC, "No space left on device", "config.json")):
        def full(*_a, fault=fault, **_k):
            raise fault

        monkeypatch.setattr(llm_prune.export, "_write_checkpoint", full)
        code, _, err = run_main(capsys, "prune", str(tiny_llama), "--ratio", "0.2", "--no-reconstruct",
                                "--calibration-tokens", "128", "-o", str(tmp_path / type(fault).__name__))
        shown = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", err).replace("\r", "\n")
        lines = [ln.strip() for ln in shown.splitlines() if ln.strip().startswith("error:")]
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: no space left on the disk"), err
        assert "Traceback" not in err


def test_export_says_a_full_disk_as_prune_does(tiny_llama, tmp_path, capsys, monkeypatch):
    """numpy's `tofile` (under gguf-py) reports a short write without the OS's errno: export said
    "could not write ...: 8192 requested and 8096 written" and exited 2, the status of a user's
    mistake. On a (nearly) full disk it is the disk, in prune's words and exit status 1; the same
    failure with space to spare stays a one-line refusal naming the output."""
    import os
    from types import SimpleNamespace

    import llm_prune.gguf_export

    def short_write(*_a, **_k):
        raise OSError("8192 requested and 8096 written")

    monkeypatch.setattr(llm_prune.gguf_export, "_write", short_write)
    real = os.statvfs
    for free, expected in ((1 << 20, 1), (1 << 40, 2)):
        monkeypatch.setattr(os, "statvfs", lambda p, free=free: SimpleNamespace(
            **{k: getattr(real(p), k) for k in ("f_frsize", "f_blocks", "f_files", "f_favail")},
            f_bavail=free // real(p).f_frsize))
        out = tmp_path / "m.gguf"
        code, _, err = run_main(capsys, "export", str(tiny_llama), "-o", str(out))
        lines = [ln for ln in err.splitlines() if ln.startswith("error:")]
        assert code == expected and len(lines) == 1 and "Traceback" not in err, err
        if expected == 1:
            assert lines[0] == f"error: no space left on the disk ({out}); free some and run the command again"
        else:
            assert lines[0].startswith(f"error: could not write {out}: 8192 requested")
        assert list(tmp_path.iterdir()) == []  # no partial file left behind


def test_more_layer_drops_than_uniform_may_cut_are_refused_before_any_stage(tiny_llama, tmp_path, capsys):
    """Uniform allocation drops layers only among those --skip-first/--skip-last leave (2 of the
    tiny model's 4 by default); a third was found only inside the prune stage, after the dense
    evaluation had run (and, over HTTP, after the job was accepted)."""
    from transformers import AutoConfig

    from llm_prune.recipe import PruningConfig

    (tmp_path / "t.txt").write_text("hello world " * 50)
    line = _one_error(capsys, "run", str(tiny_llama), "--ratio", "0.5", "--recovery", "none", "--eval-ppl",
                      str(tmp_path / "t.txt"), "--prune-layers", "3", "-o", str(tmp_path / "job"))
    assert "--prune-layers 3: --skip-first 1 and --skip-last 1 leave 2 of the model's 4 layers to drop" in line
    assert not (tmp_path / "job" / "baseline").exists()
    config = AutoConfig.from_pretrained(tiny_llama)
    PruningConfig(prune_layers=3, skip_first=0).check_fits(config)  # three layers open
    PruningConfig(prune_layers=3, allocation="adaptive").check_fits(config)  # adaptive protects none


def test_outputs_that_are_nodes_links_or_names_the_work_cannot_keep(tiny_llama, tmp_path, capsys, monkeypatch):
    """--force replaced a pipe (as root, /dev/null) with the GGUF file; a link to nothing was written
    through without --force; a loop of links as eval's --output was a traceback; `--output=~/x`
    (no shell expands that `~`) was checked under the home folder and written to a folder named `~`;
    a folder /proc refuses was a traceback; a name in another encoding failed after the whole prune;
    a newline in a value split the error over two lines."""
    import os
    import stat

    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    assert "is not a regular file" in _one_error(capsys, "export", str(tiny_llama), "-o", str(fifo), "--force")
    assert stat.S_ISFIFO(fifo.stat().st_mode)
    dangling = tmp_path / "gone.gguf"
    dangling.symlink_to(tmp_path / "nowhere" / "x.gguf")
    assert "link to nothing" in _one_error(capsys, "export", str(tiny_llama), "-o", str(dangling), "--force")
    assert dangling.is_symlink()
    (tmp_path / "loop1").symlink_to(tmp_path / "loop2")
    (tmp_path / "loop2").symlink_to(tmp_path / "loop1")
    (tmp_path / "t.txt").write_text("hello world " * 50)
    assert "loop of links" in _one_error(capsys, "eval", str(tiny_llama), "--ppl", str(tmp_path / "t.txt"),
                                         "--output", str(tmp_path / "loop1"))
    pool = tmp_path / "pool.jsonl"
    pool.write_text('{"instruction": "a", "output": "b"}\n' * 4)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    code, _, err = run_main(capsys, "select", str(pool), "--method", "random", "--budget", "2", "--output=~/sel")
    assert code == 0, err
    assert (tmp_path / "home" / "sel" / "selected.jsonl").is_file() and not (tmp_path / "~").exists()
    assert re.search("cannot be (created|written)",  # root passes the permission check; mkdir still fails
                     _one_error(capsys, "select", str(pool), "--method", "random", "-o", "/proc/llmx"))
    assert "is not UTF-8" in _one_error(capsys, "prune", str(tiny_llama), "--ratio", "0.2",
                                        "-o", str(tmp_path / "bad\udcff"))
    assert not list(tmp_path.glob("bad*"))
    assert "--record" in _one_error(capsys, "eval", str(tiny_llama), "--ppl", str(tmp_path / "t.txt"),
                                    "--record", "x\udcff")
    assert "'pi\\nqa'" in _one_error(capsys, "eval", str(tiny_llama), "--tasks", "pi\nqa")


def test_an_empty_file_or_name_is_refused_not_read_as_the_default(tiny_llama, tmp_path, capsys):
    """`--calibration ''` (an unset shell variable) ran a whole job on the built-in text."""
    for flag in ("--calibration", "--eval-ppl", "--data", "--embedding-model"):
        line = _one_error(capsys, "run", str(tiny_llama), "--ratio", "0.2", "--recovery", "none", flag, " ",
                          "-o", str(tmp_path / "job"))
        assert f"{flag}: is empty" in line, line
        assert not (tmp_path / "job").exists()


def test_a_prune_that_fails_while_writing_leaves_the_earlier_checkpoint_whole(tiny_llama, tmp_path, capsys,
                                                                              monkeypatch):
    """The checkpoint is written in the output folder's `.partial` and renamed into place when it is
    complete: a full disk after the weights were written left a folder whose config and weights
    loaded (a 0-byte tokenizer.json, no model card) over the earlier checkpoint's files."""
    import errno

    import llm_prune.card

    out = tmp_path / "out"
    prune = ["prune", str(tiny_llama), "--ratio", "0.2", "--no-reconstruct", "--calibration-tokens", "128",
             "-o", str(out)]
    assert run_main(capsys, *prune)[0] == 0
    (out / "model-q8_0.gguf").write_bytes(b"GGUF of the earlier model")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"a shard of an earlier save")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def full(*_a, **_k):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:  # the card is written after the weights, the plan and the tokenizer
        m.setattr(llm_prune.card, "model_card", full)
        code, _, err = run_main(capsys, *prune[:3], "0.3", *prune[4:])
        assert code == 1 and "no space left on the disk" in err and "Traceback" not in err
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # nothing half-written, no .partial
        code, _, err = run_main(capsys, *prune[:3], "0.3", *prune[4:-1], str(tmp_path / "first"))
        assert code == 1 and not any((tmp_path / "first").iterdir())  # nothing that looks like a checkpoint
    # An interrupted run's .partial is taken over; the earlier model's GGUF and extra shard go with it.
    (out / ".partial").mkdir()
    (out / ".partial" / "config.json").write_text("{")
    assert run_main(capsys, *prune[:3], "0.3", *prune[4:])[0] == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(n for n in before if n not in (
        "model-q8_0.gguf", "model-00002-of-00002.safetensors"))
    assert json.loads((out / "config.json").read_text())["llm_prune"]["recipe"]["budget"]["ratio"] == 0.3
