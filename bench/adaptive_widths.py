"""Adapt-Pruner's layer widths with a one-shot cut: the widths of an adaptive `plan.json` (KV groups
and MLP channels per layer) applied to a fresh SmolLM2-135M, the units chosen by OBS inside
reconstruction, as the default uniform command chooses them; ppl@128 on the first 256 WikiText-2
windows. Compare with the adaptive model itself (its incremental steps cut by Taylor scores).

    llm-prune prune smollm2-135m --ratio 0.2 --allocation adaptive -o /tmp/ad20
    python bench/adaptive_widths.py /tmp/ad20/plan.json            # --seed S as for the plan
"""
import argparse
import json
import time
from pathlib import Path

from llm_prune.calibration import calibration_ids
from llm_prune.evaluate import evaluate_model
from llm_prune.models import load_model
from llm_prune.plan import PrunePlan, count_params, unit_costs
from llm_prune.precision import calibration_autocast, resolve
from llm_prune.recipe import PruningConfig
from llm_prune.reconstruct import LiveTargets, reconstruct

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("plan", help="plan.json of an adaptive run (against the unpruned model, no layer drops)")
ap.add_argument("--seed", type=int, default=0, help="calibration sampling seed (as `llm-prune prune --seed`)")
args = ap.parse_args()
text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt").read_text()
model, tok = load_model("smollm2-135m")
cfg = PruningConfig(seed=args.seed)
plan = PrunePlan.load(args.plan)
if any(lp.drop for lp in plan.layers):
    raise SystemExit("the plan drops layers; this compares widths only")
costs = unit_costs(model)
keep = {lp.index: (list(range(len(lp.keep_kv_groups))), list(range(len(lp.keep_channels)))) for lp in plan.layers}
changed = {i for i, (kv, ch) in keep.items() if len(kv) < costs.num_kv[i] or len(ch) < costs.width[i]}
print({i: (len(kv), len(ch)) for i, (kv, ch) in keep.items()}, flush=True)
rec = calibration_ids(tok, None, cfg.reconstruct_windows, cfg.calibration_seq_len, cfg.seed,
                      at_least=cfg.calibration_windows)
t = time.perf_counter()
with calibration_autocast(model, cfg.calibration_precision):
    with LiveTargets(model, rec, 2048 // cfg.calibration_seq_len, resolve(model, cfg.calibration_precision)) as tg:
        reconstruct(model, tg, list(range(len(plan.layers))), changed, cfg.reconstruct_damp,
                    cfg.reconstruct_correction, keep=keep, choose=True)
rt = time.perf_counter() - t
res = evaluate_model(model, tok, ppl_text=text, seq_len=128, max_windows=256, tasks=())
print(json.dumps({"plan": args.plan, "seed": args.seed, "params": count_params(model),
                  "reconstruct_s": round(rt, 1), "ppl": round(res["ppl"]["ppl"], 2)}), flush=True)
