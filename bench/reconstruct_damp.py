"""Reconstruction variants side by side in one process: one targets pass and one scoring per
importance method, then for each IMPORTANCE@DAMP[@CORRECTION] a fresh copy of SmolLM2-135M is cut
(uniform allocation, the default budgets) and reconstructed with that ridge damping and upstream
correction (default: the recipe's); ppl@128 on the first 256 WikiText-2 windows. The calibration
passes use the default precision (bf16 autocast on hardware with native bf16).

    python bench/reconstruct_damp.py 0.2 taylor@0.03,taylor@0.3,taylor@1.0,obs@0.01,obs@0.03,obs@0.3
    python bench/reconstruct_damp.py 0.5 taylor@0.1@1,taylor@0.1@0.5,taylor@0.03@0.5 --seed 1
"""
import argparse
import copy
import json
import time
from pathlib import Path

from llm_prune.allocation import allocate
from llm_prune.calibration import calibration_ids
from llm_prune.evaluate import evaluate_model
from llm_prune.importance import ImportanceScorer, Scores
from llm_prune.models import load_model
from llm_prune.plan import count_params, unit_costs
from llm_prune.precision import calibration_autocast, resolve
from llm_prune.prune import allocation_config, target_params
from llm_prune.recipe import Budget, PruningConfig
from llm_prune.reconstruct import LayerTargets, reconstruct

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("ratio", type=float)
ap.add_argument("variants", help="comma list of IMPORTANCE@DAMP[@CORRECTION]")
ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed (as `llm-prune prune --seed`)")
ap.add_argument("--reconstruct-tokens", type=int, default=None, help="reconstruction budget (default: the recipe's)")
ap.add_argument("--calibration-tokens", type=int, default=None, help="scoring budget (default: the recipe's)")
args = ap.parse_args()
text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt").read_text()
dense, tok = load_model("smollm2-135m")
budgets = {k: v for k, v in (("reconstruct_tokens", args.reconstruct_tokens),
                              ("calibration_tokens", args.calibration_tokens)) if v is not None}
cfg = PruningConfig(seed=args.seed, **budgets)
ids = calibration_ids(tok, None, cfg.calibration_windows, cfg.calibration_seq_len, cfg.seed)
rec = calibration_ids(tok, None, cfg.reconstruct_windows, cfg.calibration_seq_len, cfg.seed,
                      at_least=cfg.calibration_windows)
t = time.perf_counter()
with calibration_autocast(dense, cfg.calibration_precision):
    targets = LayerTargets(dense, rec, 2048 // cfg.calibration_seq_len, resolve(dense, cfg.calibration_precision))
print("targets", time.perf_counter() - t, flush=True)
scores = {}
for v in args.variants.split(","):
    imp, damp, *rest = v.split("@")
    damp, correction = float(damp), float(rest[0]) if rest else cfg.reconstruct_correction
    model = copy.deepcopy(dense)
    costs = unit_costs(model)
    if imp not in scores and not cfg.model_copy(update={"importance": imp}).needs_scores:
        scores[imp] = Scores.unranked(costs)  # reconstruction chooses the units, as in `llm-prune prune`
    elif imp not in scores:
        with calibration_autocast(model, cfg.calibration_precision):
            scores[imp] = ImportanceScorer(imp).score(model, ids, batch_size=cfg.micro_batch)
    plan = allocate(scores[imp], costs, target_params(costs.total, Budget(ratio=args.ratio)), allocation_config(cfg))
    changed = {lp.index for lp in plan.layers if len(lp.keep_channels) < costs.width[lp.index]
               or len(lp.keep_kv_groups) < costs.num_kv[lp.index]}
    t = time.perf_counter()
    keep = {j: (lp.keep_kv_groups, lp.keep_channels) for j, lp in enumerate(plan.layers)}
    with calibration_autocast(model, cfg.calibration_precision):
        reconstruct(model, targets, list(range(len(plan.layers))), changed, damp, correction, keep=keep,
                    choose=imp == "obs")
    rt = time.perf_counter() - t
    res = evaluate_model(model, tok, ppl_text=text, seq_len=128, max_windows=256, tasks=())
    print(json.dumps({"variant": v, "ratio": args.ratio, "seed": args.seed, "calibration_tokens": ids.numel(), "reconstruct_tokens": rec.numel(), "damp": damp, "correction": correction,
                      "params": count_params(model), "rec_s": round(rt, 1), "ppl": round(res["ppl"]["ppl"], 2)}),
          flush=True)
targets.close()
