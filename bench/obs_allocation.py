"""MLP widths from layer-wise OBS error curves (as ZipLM allocates: the widths that minimise the
summed layer errors under the budget) against uniform widths, side by side in one process on
SmolLM2-135M; the same reconstruction (OBS choosing the channels) after either. Attention keeps
uniform allocation's KV groups. Curves: greedy OBS removal on the unpruned model's own down_proj
inputs over the reconstruction tokens, each token's error relative to its unpruned state (the
refit's objective). `obs-skip` spares the layers uniform allocation spares; `obs-all` none.

    python bench/obs_allocation.py 0.2
    python bench/obs_allocation.py 0.5 --max-sparsity 0.9
    python bench/obs_allocation.py 0.2 --variants uniform,obs-skip --tasks-limit 500
"""
import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

from llm_prune.allocation import allocate
from llm_prune.calibration import calibration_ids
from llm_prune.evaluate import COMMONSENSE_TASKS, average_stderr, evaluate_model
from llm_prune.families import family_for
from llm_prune.importance import Scores
from llm_prune.models import load_model
from llm_prune.plan import count_params, unit_costs
from llm_prune.precision import calibration_autocast, resolve
from llm_prune.prune import allocation_config, target_params
from llm_prune.recipe import Budget, PruningConfig
from llm_prune.reconstruct import LiveTargets, _Normal, _layer_inputs, _run, _token_scale, reconstruct

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("ratio", type=float)
ap.add_argument("--variants", default="uniform,obs-skip,obs-all")
ap.add_argument("--max-sparsity", type=float, default=0.8, help="the most of a layer's channels the curves reach")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--tasks-limit", type=int, default=None, help="also the seven-task average, N items per task")
args = ap.parse_args()
text = (Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2-raw-test.txt").read_text()
dense, tok = load_model("smollm2-135m")
cfg = PruningConfig(seed=args.seed)
rec = calibration_ids(tok, None, cfg.reconstruct_windows, cfg.calibration_seq_len, cfg.seed,
                      at_least=cfg.calibration_windows)
fam, layers, costs = family_for(dense), family_for(dense).layers(dense), unit_costs(dense)
q = cfg.round_to
uniform = allocate(Scores.unranked(costs), costs, target_params(costs.total, Budget(ratio=args.ratio)),
                   allocation_config(cfg))
uni = {lp.index: (lp.keep_kv_groups, lp.keep_channels) for lp in uniform.layers}
width = costs.width[0]
to_remove = sum(width - len(ch) for _, ch in uni.values()) // q

t = time.perf_counter()
curves = []  # per layer: objective increase after removing k * q channels
with torch.no_grad(), calibration_autocast(dense, cfg.calibration_precision):
    inputs = _layer_inputs(dense, fam, list(rec.split(2048 // cfg.calibration_seq_len)))
    xs, kwargs = [x for x, _ in inputs], [kw for _, kw in inputs]
    for layer in layers:
        down = fam.gate_up_down(layer)[2]
        normal, ys = _Normal(down), []
        grab = {}
        hook = down.register_forward_pre_hook(lambda module, a: grab.update(m=a[0]))
        for x, kw in zip(xs, kwargs):
            y = _run(layer, x, kw)
            normal.add(grab["m"], down(grab["m"]), _token_scale(y))  # target: its own output
            ys.append(y)
        hook.remove()
        xs = ys
        trace = [(0, 0.0)]
        normal.select(down, cfg.reconstruct_damp, 1, width - int(width * args.max_sparsity), trace)
        removed, rise = (np.array(v) for v in zip(*trace))
        curves.append(np.interp(np.arange(0, int(width * args.max_sparsity) // q + 1) * q, removed, rise))
print(f"curves {time.perf_counter() - t:.1f} s", flush=True)


def min_sum_widths(layer_ids: list[int], units: int) -> dict[int, int]:
    """Units of q channels removed per layer, summing to `units`, with the least summed error."""
    best, choices = np.full(units + 1, np.inf), []
    best[0] = 0.0
    for i in layer_ids:
        new, arg = np.full(units + 1, np.inf), np.zeros(units + 1, dtype=int)
        for k, c in enumerate(curves[i][:units + 1]):
            cand = np.full(units + 1, np.inf)
            cand[k:] = best[:units + 1 - k] + c
            better = cand < new
            new[better], arg[better] = cand[better], k
        choices.append(arg)
        best = new
    out, n = {}, units
    for i, arg in zip(reversed(layer_ids), reversed(choices)):
        out[i] = int(arg[n])
        n -= out[i]
    return out


for variant in args.variants.split(","):
    keep = uni
    if variant != "uniform":
        spared = {i for i, (_, ch) in uni.items() if len(ch) == width} if variant == "obs-skip" else set()
        cut = min_sum_widths([i for i in range(len(layers)) if i not in spared], to_remove)
        keep = {i: (uni[i][0], list(range(width - q * cut.get(i, 0)))) for i in range(len(layers))}
    model = copy.deepcopy(dense)
    widths = [len(ch) for _, ch in keep.values()]
    t = time.perf_counter()
    with calibration_autocast(model, cfg.calibration_precision), \
            LiveTargets(model, rec, 2048 // cfg.calibration_seq_len, resolve(model, cfg.calibration_precision)) as tg:
        reconstruct(model, tg, list(range(len(layers))), {i for i, w in enumerate(widths) if w < width},
                    keep=keep, choose=True)
    rec_s = time.perf_counter() - t
    res = evaluate_model(model, tok, ppl_text=text, seq_len=128, max_windows=256,
                         tasks=list(COMMONSENSE_TASKS) if args.tasks_limit else (), limit=args.tasks_limit)
    row = {"variant": variant, "ratio": args.ratio, "seed": args.seed, "params": count_params(model),
           "widths": widths, "rec_s": round(rec_s, 1), "ppl": round(res["ppl"]["ppl"], 2)}
    if args.tasks_limit:
        row["avg"] = round(100 * res["average"], 2)
        row["avg_stderr"] = round(100 * average_stderr(res["tasks"]), 2)
        row["tasks"] = {k: round(100 * v[v["metric"]], 1) for k, v in res["tasks"].items()}
    print(json.dumps(row), flush=True)
