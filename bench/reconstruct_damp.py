"""Reconstruction variants side by side in one process: one targets pass and one scoring per
importance method, then for each IMPORTANCE@DAMP a fresh copy of SmolLM2-135M is cut (uniform
allocation, the default budgets) and reconstructed with that ridge damping; ppl@128 on the first
256 WikiText-2 windows.

    python bench/reconstruct_damp.py 0.2 taylor@0.03,taylor@0.3,taylor@1.0,obs@0.01,obs@0.03,obs@0.3
"""
import copy, json, sys, time
from pathlib import Path
import torch
from llm_prune.models import load_model
from llm_prune.calibration import calibration_ids
from llm_prune.importance import ImportanceScorer
from llm_prune.plan import unit_costs, count_params
from llm_prune.allocation import allocate
from llm_prune.prune import allocation_config, target_params, _drops_only
from llm_prune.recipe import PruningConfig, Budget
from llm_prune.reconstruct import LayerTargets, reconstruct
from llm_prune.surgery import apply_plan
from llm_prune.evaluate import evaluate_model

ratio, variants = float(sys.argv[1]), sys.argv[2].split(",")
text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt").read_text()
dense, tok = load_model("smollm2-135m")
cfg = PruningConfig()
ids = calibration_ids(tok, None, cfg.calibration_windows, 128, 0)
rec = calibration_ids(tok, None, cfg.reconstruct_windows, 128, 0, at_least=cfg.calibration_windows)
t = time.perf_counter()
targets = LayerTargets(dense, rec, 16)
print("targets", time.perf_counter() - t, flush=True)
sc = {}
for v in variants:
    imp, damp = v.split("@")
    damp = float(damp)
    model = copy.deepcopy(dense)
    if imp not in sc:
        sc[imp] = ImportanceScorer(imp).score(model, ids, batch_size=4)
    costs = unit_costs(model)
    plan = allocate(sc[imp], costs, target_params(costs.total, Budget(ratio=ratio)), allocation_config(cfg))
    changed = {lp.index for lp in plan.layers if len(lp.keep_channels) < costs.width[lp.index] or len(lp.keep_kv_groups) < costs.num_kv[lp.index]}
    t = time.perf_counter()
    if imp == "obs":
        apply_plan(model, _drops_only(plan, costs))
        reconstruct(model, targets, list(range(30)), changed, damp, select={j: (len(lp.keep_kv_groups), len(lp.keep_channels)) for j, lp in enumerate(plan.layers)})
    else:
        apply_plan(model, plan)
        if damp >= 0:
            reconstruct(model, targets, list(range(30)), changed, damp)
    rt = time.perf_counter() - t
    res = evaluate_model(model, tok, ppl_text=text, seq_len=128, max_windows=256, tasks=())
    print(json.dumps({"variant": v, "ratio": ratio, "params": count_params(model), "rec_s": rt, "ppl": res["ppl"]["ppl"]}), flush=True)
