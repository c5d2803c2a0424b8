"""`llm-prune run` / run_recipe: end to end on a tiny model, resume, and early failure on bad recipes."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import llm_prune.models
from llm_prune import pipeline
from llm_prune.errors import UserError
from llm_prune.recipe import parse_recipe

TEXT = " ".join(["The quick brown fox jumps over the lazy dog. Paris is the capital of France."] * 120)


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    pool = root / "pool.jsonl"
    with pool.open("w") as fh:
        for i in range(24):
            fh.write(json.dumps({"instruction": f"Write the number {i} in words.", "input": "",
                                 "output": f"The number is {i}."}) + "\n")
        fh.write("{not json\n")
    text = root / "text.txt"
    text.write_text(TEXT)
    return pool, text


def _recipe(model_dir, pool, text, **over):
    data = {"model": str(model_dir), "budget": {"ratio": 0.1},
            "pruning": {"calibration": str(text), "calibration_samples": 4, "calibration_seq_len": 32},
            "data": {"pool": str(pool), "selection": "random", "budget": 8},
            "recovery": {"method": "lora", "max_steps": 3, "micro_batch_size": 2, "cutoff_len": 64},
            "evaluation": {"ppl": str(text), "max_windows": 4}}
    for key, val in over.items():
        data[key] = {**data.get(key, {}), **val} if isinstance(val, dict) else val
    return parse_recipe(data)


def test_run_end_to_end_then_resume(tiny_llama, job_inputs, tmp_path, monkeypatch):
    pool, text = job_inputs
    out = tmp_path / "job"
    events = []
    recipe = _recipe(tiny_llama, pool, text, recovery={"keep_adapter": True})

    # Interrupt after pruning: the selection stage blows up once.
    import data_selection

    real_select = data_selection.select_records
    monkeypatch.setattr(data_selection, "select_records", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    with pytest.raises(RuntimeError):
        pipeline.run_recipe(recipe, out, on_event=events.append)
    assert pipeline.finished_stages(out) == ["baseline", "pruned"]
    pruned_marker = (out / "pruned" / ".done").stat().st_mtime_ns

    monkeypatch.setattr(data_selection, "select_records", real_select)
    loads = []
    real_load = llm_prune.models.load_model
    monkeypatch.setattr(llm_prune.models, "load_model", lambda spec, **kw: loads.append(spec) or real_load(spec, **kw))
    summary = pipeline.run_recipe(recipe, out, on_event=events.append)

    assert pipeline.finished_stages(out) == list(pipeline.STAGES)
    assert (out / "pruned" / ".done").stat().st_mtime_ns == pruned_marker  # not redone
    assert str(tiny_llama) not in loads  # the dense model was not loaded again (no PASER, no distillation)
    assert summary["selection"]["selected"] == 8
    assert summary["recovered"]["steps"] == 3
    assert (Path(summary["recovered"]["adapter"]) / "adapter_config.json").is_file()  # --keep-adapter says where
    assert abs(summary["pruned"]["params_after"] / summary["pruned"]["params_before"] - 0.9) < 0.005
    assert any(e.kind == "warning" and "malformed" in e.message for e in events)
    assert {e.stage for e in events} >= {"prune", "train"}

    final = out / "final"
    results = json.loads((final / "eval_results.json").read_text())
    assert set(results) >= {"dense", "pruned", "recovered"}
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    ours, _ = real_load(str(final))
    probe = torch.randint(3, 300, (1, 12))
    assert torch.allclose(model(probe).logits, ours(probe).logits, atol=1e-5)
    assert "Recipe" in (final / "README.md").read_text() and '"layers_dropped"' in (final / "README.md").read_text()
    # --keep-adapter publishes the adapter with the final checkpoint (a job's download), the card
    # names it there, and the plan that made the shapes comes along as in `pruned`.
    assert (final / "adapter" / "adapter_config.json").is_file()
    assert '"adapter": "adapter/ (for the pruned checkpoint' in (final / "README.md").read_text()
    assert (final / "plan.json").read_text() == (out / "pruned" / "plan.json").read_text()

    # A third run finds everything done and changes nothing.
    again = pipeline.run_recipe(recipe, out)
    assert again["final"] == summary["final"]
    # Labels do not count; another budget is refused, not given the 10% model's results.
    assert pipeline.run_recipe(recipe.model_copy(update={"metadata": {"run": 2}}), out)["final"] == summary["final"]
    other = _recipe(tiny_llama, pool, text, budget={"ratio": 0.5}, recovery={"method": "none"})
    with pytest.raises(UserError, match=r"another recipe \(differs in budget\.ratio, recovery\.keep_adapter, recovery\.method"):
        pipeline.run_recipe(other, out)
    assert json.loads((out / "recipe.json").read_text())["budget"]["ratio"] == 0.1


def test_token_budget_with_a_selection_that_needs_no_models(tiny_llama, job_inputs, tmp_path):
    pool, text = job_inputs
    recipe = _recipe(tiny_llama, pool, text, data={"token_budget": 200}, recovery={"max_steps": 1},
                     evaluation={"ppl": None})
    summary = pipeline.run_recipe(recipe, tmp_path / "job")
    assert 1 <= summary["selection"]["selected"] < 8  # the tokens, not the 8 records, bound it
    tiny = _recipe(tiny_llama, pool, text, data={"token_budget": 5}, recovery={"max_steps": 1},
                   evaluation={"ppl": None})
    with pytest.raises(UserError, match="token budget 5 fits no record"):
        pipeline.run_recipe(tiny, tmp_path / "job5")


def test_adapt_accel_splits_the_step_budget(tiny_llama, job_inputs, tmp_path):
    """With T stages, max_steps is the total: T-1 shares run between stages, the rest after selection."""
    pool, text = job_inputs
    # Distillation runs between the stages too (the dense model is their teacher as well): no
    # "needs the dense model passed as teacher" there.
    recipe = _recipe(tiny_llama, pool, text, pruning={"allocation": "adaptive", "stages": 3},
                     recovery={"max_steps": 7, "distill_weight": 0.5}, evaluation={"ppl": None})
    summary = pipeline.run_recipe(recipe, tmp_path / "job")
    assert not list((tmp_path / "job" / "pruned").glob("*interstage*"))  # nothing of them is published
    assert summary["recovered"]["steps"] == 7 - 2 * (7 // 3)
    assert [(m["after_stage"], m["steps"]) for m in summary["pruned"]["interstage_recovery"]] == [(1, 2), (2, 2)]
    # With --epochs the runs between stages still take their share of steps, not whole epochs each.
    by_epochs = _recipe(tiny_llama, pool, text, pruning={"stages": 2}, recovery={"max_steps": 4, "epochs": 1},
                        evaluation={"ppl": None})
    summary = pipeline.run_recipe(by_epochs, tmp_path / "job_epochs")
    assert [m["steps"] for m in summary["pruned"]["interstage_recovery"]] == [2]
    with pytest.raises(UserError, match="max_steps 2 is the total over 3 pruning stages"):
        _recipe(tiny_llama, pool, text, pruning={"stages": 3}, recovery={"max_steps": 2})


def test_paser_scores_up_to_the_training_cutoff(tiny_llama, job_inputs, tmp_path, monkeypatch):
    import data_selection

    seen = {}

    def fake_select(records, **kw):
        seen.update(kw)
        raise KeyboardInterrupt  # stop the job here

    monkeypatch.setattr(data_selection, "select_records", fake_select)
    pool, text = job_inputs
    recipe = _recipe(tiny_llama, pool, text, data={"selection": "paser", "sample_per_cluster": 4},
                     recovery={"cutoff_len": 48}, evaluation={"ppl": None})
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(recipe, tmp_path / "job")
    assert seen["cutoff_len"] == 48 and seen["sample_per_cluster"] == 4 and seen["method"] == "paser"


@pytest.mark.parametrize("over,needle", [
    ({"recovery": {"method": "magic"}}, "recovery.method"),
    ({"recovery": {"max_steps": -1}}, "recovery.max_steps"),
    ({"data": {"pool": "/nonexistent/pool.jsonl"}}, "data.pool"),
    ({"budget": {"ratio": 1.5}}, "budget.ratio"),
    ({"pruning": {"importance": "vibes"}}, "pruning.importance"),
])
def test_bad_recipes_fail_before_heavy_work(tiny_llama, job_inputs, tmp_path, monkeypatch, over, needle):
    pool, text = job_inputs
    monkeypatch.setattr(llm_prune.models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    with pytest.raises(UserError) as err:
        pipeline.run_recipe(_recipe(tiny_llama, pool, text, **over), tmp_path / "bad")
    assert needle in str(err.value) or err.value.param == needle


def test_run_cli_recipe_file(tiny_llama, job_inputs, tmp_path, capsys):
    from tests.test_pruning import run_main

    pool, text = job_inputs
    recipe = _recipe(tiny_llama, pool, text, recovery={"method": "none"}, evaluation={"ppl": None})
    path = tmp_path / "recipe.json"
    path.write_text(recipe.model_dump_json())
    code, out, err = run_main(capsys, "run", "--recipe", str(path), "-o", str(tmp_path / "job"), "--ratio", "0.15",
                              "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["recipe"]["budget"]["ratio"] == 0.15  # the flag overrides the file
    assert summary["recovered"] == {"skipped": True}
    code, _, err = run_main(capsys, "run", str(tiny_llama), "-o", str(tmp_path / "j2"))
    assert code == 2 and "budget" in err


def test_a_rerun_may_change_what_only_unfinished_stages_use(tiny_llama, job_inputs, tmp_path, monkeypatch):
    """Recovery diverged (or was stopped) after selection: a lower learning rate reuses the dense
    evaluation, the pruned model and the selection, and starts recovery afresh; a new budget, or the
    model rebuilt under the same path, is another recipe."""
    import os
    import shutil

    import recovery

    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    pool, text = job_inputs
    out = tmp_path / "job"
    real = recovery.recover

    def stopped(model, tok, records, cfg, work, **kw):
        (Path(work) / "checkpoints" / "checkpoint-1").mkdir(parents=True)  # of the old settings
        raise KeyboardInterrupt

    monkeypatch.setattr(recovery, "recover", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(_recipe(model, pool, text), out)
    assert pipeline.finished_stages(out) == ["baseline", "pruned", "selection"]
    pruned_at = (out / "pruned" / ".done").stat().st_mtime_ns
    with pytest.raises(UserError, match="differs in budget.ratio"):
        pipeline.run_recipe(_recipe(model, pool, text, budget={"ratio": 0.2}), out)
    seen = {}

    def record(model, tok, records, cfg, work, **kw):
        seen["lr"], seen["leftover"] = cfg.learning_rate, (Path(work) / "checkpoints").exists()
        return real(model, tok, records, cfg, work, **kw)

    monkeypatch.setattr(recovery, "recover", record)
    summary = pipeline.run_recipe(_recipe(model, pool, text, recovery={"learning_rate": 1e-5}), out)
    assert seen == {"lr": 1e-5, "leftover": False} and summary["recovered"]["steps"] == 3
    assert (out / "pruned" / ".done").stat().st_mtime_ns == pruned_at  # reused, not redone
    st = (model / "config.json").stat()
    os.utime(model / "config.json", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # rebuilt under the same path
    with pytest.raises(UserError, match=r"differs in the model.s files \(names, sizes or modification times\)"):
        pipeline.run_recipe(_recipe(model, pool, text, recovery={"learning_rate": 1e-5}), out)


def test_resume_keeps_what_a_change_does_not_touch(tiny_llama, job_inputs, tmp_path, monkeypatch):
    """After selection: another recovery method (still on) is taken, recovery off is refused; a
    --keep-adapter asked for later keeps recovery's checkpoints; a GGUF asked for after pruning is
    the final stage's to write."""
    import recovery

    pool, text = job_inputs
    out = tmp_path / "job"
    found = []  # whether recovery found the earlier attempt's checkpoint

    def stopped(model, tok, records, cfg, work, **kw):
        checkpoint = Path(work) / "checkpoints" / "checkpoint-1"
        found.append(checkpoint.is_dir())
        checkpoint.mkdir(parents=True, exist_ok=True)
        raise KeyboardInterrupt

    monkeypatch.setattr(recovery, "recover", stopped)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_recipe(_recipe(tiny_llama, pool, text), out)
    with pytest.raises(UserError, match="differs in recovery.method"):
        pipeline.run_recipe(_recipe(tiny_llama, pool, text, recovery={"method": "none"}), out)
    with pytest.raises(KeyboardInterrupt):  # accepted, and recovery resumes its checkpoint
        pipeline.run_recipe(_recipe(tiny_llama, pool, text, recovery={"keep_adapter": True},
                                    export={"gguf": "f16"}), out)
    with pytest.raises(KeyboardInterrupt):  # another method: accepted, trained afresh
        pipeline.run_recipe(_recipe(tiny_llama, pool, text, recovery={"method": "perp", "keep_adapter": True},
                                    export={"gguf": "f16"}), out)
    assert found == [False, True, False]


def test_one_run_per_job_folder(tiny_llama, job_inputs, tmp_path):
    import fcntl

    pool, text = job_inputs
    out = tmp_path / "job"
    out.mkdir()
    with open(out / ".lock", "w") as held:  # another run holds the folder
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UserError, match="another `llm-prune run` is working in"):
            pipeline.run_recipe(_recipe(tiny_llama, pool, text, recovery={"method": "none"}), out)
    assert not (out / "baseline").exists()


def _finished_job(out: Path, recipe, stages) -> None:
    """A job folder as `run` leaves it after `stages` (their markers only)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.json").write_text(recipe.model_dump_json(indent=2))
    (out / pipeline.INPUTS).write_text(json.dumps(pipeline.input_fingerprints(recipe)))
    for stage in stages:
        (out / stage).mkdir(exist_ok=True)
        (out / stage / pipeline.DONE).write_text("{}")


def test_a_cut_off_marker_is_an_unfinished_stage(tmp_path):
    """A marker cut off by a full disk (or a kill while an older writer wrote it) is redone, not read."""
    for content in ("", '{"params_af', "[]"):
        (tmp_path / "baseline").mkdir(exist_ok=True)
        (tmp_path / "baseline" / pipeline.DONE).write_text(content)
        assert pipeline.finished_stages(tmp_path) == []
    pipeline._mark(tmp_path / "baseline", {"ppl": 1.0})
    assert pipeline.finished_stages(tmp_path) == ["baseline"]
    assert [p.name for p in (tmp_path / "baseline").iterdir()] == [pipeline.DONE]  # no temporary left


def test_an_atomic_write_that_fails_leaves_the_old_content(tmp_path, monkeypatch):
    import os

    from llm_prune.paths import write_text_atomic

    target = tmp_path / "recipe.json"
    write_text_atomic(target, "old")

    def full(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError):
        write_text_atomic(target, "new")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["recipe.json"]


def test_unreadable_records_of_a_finished_job_refuse_another_recipe(tiny_llama, job_inputs, tmp_path):
    pool, text = job_inputs
    out = tmp_path / "job"
    _finished_job(out, _recipe(tiny_llama, pool, text), ["baseline", "pruned"])
    other = _recipe(tiny_llama, pool, text, budget={"ratio": 0.3})
    (out / pipeline.INPUTS).write_text('{"mod')  # cut off: what made the stages is unknown
    with pytest.raises(UserError, match=r"differs in .*inputs.json \(unreadable\)"):
        pipeline.Job(_recipe(tiny_llama, pool, text), out, lambda e: None).check_resumable()
    (out / pipeline.INPUTS).unlink()  # absent (an older run): the recipe alone decides
    pipeline.Job(_recipe(tiny_llama, pool, text), out, lambda e: None).check_resumable()
    (out / "recipe.json").write_text('{"model": "/tm')
    with pytest.raises(UserError, match=r"differs in recipe.json \(unreadable\)"):
        pipeline.Job(other, out, lambda e: None).check_resumable()


def test_the_same_files_by_another_path_resume(tiny_llama, job_inputs, tmp_path, monkeypatch):
    """A resume from another directory names the model and files by other relative paths."""
    pool, text = job_inputs
    out = tmp_path / "job"
    _finished_job(out, _recipe(tiny_llama, pool, text), ["baseline", "pruned", "selection"])
    import os

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    relative = _recipe(*(os.path.relpath(p, elsewhere) for p in (tiny_llama, pool, text)))
    assert relative.model != str(tiny_llama) and relative.data.pool != str(pool)
    pipeline.Job(relative, out, lambda e: None).check_resumable()


def test_export_settings_are_free_until_the_final_stage(tiny_llama, job_inputs, tmp_path):
    """A GGUF asked for after recovery is the final stage's to write; once that is done, it is not."""
    pool, text = job_inputs
    out = tmp_path / "job"
    _finished_job(out, _recipe(tiny_llama, pool, text), ["baseline", "pruned", "selection", "recovered"])
    gguf = _recipe(tiny_llama, pool, text, export={"gguf": "f16"})
    pipeline.Job(gguf, out, lambda e: None).check_resumable()
    with pytest.raises(UserError, match="differs in recovery.keep_adapter"):
        pipeline.Job(_recipe(tiny_llama, pool, text, recovery={"keep_adapter": True}), out,
                     lambda e: None).check_resumable()
    _finished_job(out, _recipe(tiny_llama, pool, text), ["final"])
    with pytest.raises(UserError, match="differs in export.gguf"):
        pipeline.Job(gguf, out, lambda e: None).check_resumable()


def test_job_folders_the_stages_could_never_finish_are_refused_first(tiny_llama, job_inputs, tmp_path):
    import shutil

    pool, text = job_inputs
    out = tmp_path / "job"
    out.mkdir()
    (out / "final").write_text("notes")  # the last stage would fail on it after all the others ran
    with pytest.raises(UserError, match="final is a file, where the final stage writes a folder"):
        pipeline.run_recipe(_recipe(tiny_llama, pool, text), out)
    assert sorted(p.name for p in out.iterdir() if p.name != ".lock") == ["final"]
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    for inside in (model, model / "job"):  # every file a stage writes would change the model's fingerprint
        with pytest.raises(UserError, match="inside the model's folder"):
            pipeline.run_recipe(_recipe(model, pool, text), inside)
    assert sorted(p.name for p in model.iterdir()) == sorted(p.name for p in tiny_llama.iterdir())
