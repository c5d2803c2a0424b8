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
