"""Structure the code relies on: no import circles between the project's modules (lazy imports
inside functions included), a plan.json that `PrunePlan.load` reads and `prune --plan` re-applies,
and a final/ checkpoint whose files can be rewritten without touching pruned/."""

import ast
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from llm_prune.plan import PrunePlan

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llm_prune", "data_selection", "recovery", "service")


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    files = {_module(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            graph[mod] |= {n for n in names if n in files and n != mod}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circles_between_modules():
    graph = _import_graph()
    # A package's __init__ re-exporting its modules is not a circle of their code.
    graph = {m: {d for d in deps if not (m.startswith(d + ".") and m != d)} for m, deps in graph.items()}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def main(argv):
    from llm_prune.cli import main as cli

    try:
        cli(argv)
    except SystemExit as exc:
        if exc.code:
            raise


def test_plan_json_reapplies_to_another_copy(tiny_llama, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    # --plan re-applies the cut, not reconstruction's refit weights: compare the cut alone.
    common = ["--calibration-samples", "4", "--calibration-seq-len", "32", "--skip-first", "0", "--no-reconstruct",
              "--json"]
    main(["prune", str(tiny_llama), "--ratio", "0.3", "--stages", "2", "--prune-layers", "1", "-o", str(first),
          *common])
    capsys.readouterr()
    plan = PrunePlan.load(first / "plan.json")
    assert len(plan.meta["stage_plans"]) == 2 and sum(lp.drop for lp in plan.layers) == 1
    main(["prune", str(tiny_llama), "--plan", str(first / "plan.json"), "-o", str(second), "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert summary["params_after"] == plan.params_after and summary["timings"]["score_s"] == 0
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert PrunePlan.load(second / "plan.json") == PrunePlan.load(first / "plan.json")
    # What ran is what the checkpoint says: the plan, not the default pruning settings.
    recorded = json.loads((second / "config.json").read_text())["llm_prune"]["recipe"]["pruning"]
    assert list(recorded) == ["plan"] and "no reconstruction" in recorded["plan"]
    assert '"reconstruct"' not in (second / "README.md").read_text()
    # Pruning options would be ignored beside a plan: refused, naming them.
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_llama), "--plan", str(first / "plan.json"), "-o", str(tmp_path / "third"),
              "--prune-layers", "2", "--importance", "taylor"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "would not be used" in err and "--prune-layers" in err and "--importance" in err
    assert not (tmp_path / "third").exists()


def test_a_plan_for_another_model_is_refused(tiny_llama, tiny_qwen2, tmp_path, capsys):
    main(["prune", str(tiny_llama), "--ratio", "0.2", "-o", str(tmp_path / "a"), "--json",
          "--calibration-samples", "2", "--calibration-seq-len", "16"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["prune", str(tiny_qwen2), "--plan", str(tmp_path / "a" / "plan.json"), "-o", str(tmp_path / "b")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert exc.value.code == 2 and len(errors) == 1 and "the plan was made for a model with" in errors[0], err


def test_final_card_does_not_rewrite_pruned_card(tiny_llama, tmp_path):
    from llm_prune import pipeline
    from llm_prune.recipe import parse_recipe

    out = tmp_path / "job"
    text = tmp_path / "t.txt"
    text.write_text("A short text about rivers and the sea. " * 60)
    recipe = parse_recipe({"model": str(tiny_llama), "budget": {"ratio": 0.1}, "recovery": {"method": "none"},
                           "pruning": {"calibration_samples": 2, "calibration_seq_len": 16},
                           "evaluation": {"ppl": str(text), "max_windows": 2}})
    pipeline.run_recipe(recipe, out)
    pruned_card, final_card = (out / "pruned" / "README.md").read_text(), (out / "final" / "README.md").read_text()
    assert "| metric | pruned |" in pruned_card and "| metric | pruned | dense |" in final_card
    assert (out / "pruned" / "README.md").stat().st_ino != (out / "final" / "README.md").stat().st_ino
    assert set(json.loads((out / "pruned" / "eval_results.json").read_text())) == {"pruned"}
    assert set(json.loads((out / "final" / "eval_results.json").read_text())) == {"dense", "pruned"}
    # The weights themselves are shared, not copied.
    assert (out / "pruned" / "model.safetensors").stat().st_ino == (out / "final" / "model.safetensors").stat().st_ino


def test_whole_layers_never_come_from_the_protected_ends(tmp_path, capsys):
    """--skip-first/--skip-last keep those layers whole, against layer dropping too."""
    from tests.tiny_models import build_model

    src = build_model(tmp_path / "m", "llama", layers=10)
    main(["prune", str(src), "--ratio", "0.3", "--skip-first", "3", "--skip-last", "3", "--prune-layers", "2",
          "--calibration-samples", "2", "--calibration-seq-len", "16", "-o", str(tmp_path / "p"), "--json"])
    capsys.readouterr()
    plan = PrunePlan.load(tmp_path / "p" / "plan.json")
    dropped = {lp.index for lp in plan.layers if lp.drop}
    assert len(dropped) == 2 and dropped <= {3, 4, 5, 6}
    with pytest.raises(SystemExit):
        main(["prune", str(src), "--ratio", "0.3", "--skip-first", "3", "--skip-last", "3", "--prune-layers", "5",
              "-o", str(tmp_path / "q")])
    assert "--prune-layers 5: --skip-first 3 and --skip-last 3 leave 4 of the model's 10 layers to drop" \
        in capsys.readouterr().err
