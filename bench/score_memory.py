"""Peak memory of Taylor importance scoring: gradients scored and freed inside backward hooks
(llm-prune) versus a plain backward that keeps every parameter's `.grad` (as a naive scorer does).

    .venv/bin/python bench/score_memory.py [--model smollm2-135m] [--samples 10] [--seq-len 64]

Each variant runs in its own process; peak RSS is the process's ru_maxrss, minus nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def run(variant: str, model_spec: str, samples: int, seq_len: int) -> dict:
    import torch

    from llm_prune.calibration import calibration_ids
    from llm_prune.importance import ImportanceScorer
    from llm_prune.models import load_model
    from llm_prune.plan import count_params

    model, tok = load_model(model_spec)
    ids = calibration_ids(tok, n_samples=samples, seq_len=seq_len)
    after_load = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    if variant == "hooks":
        ImportanceScorer("taylor").score(model, ids)
    else:
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        with torch.no_grad():
            _ = [(p * p.grad).abs().sum() for p in model.parameters() if p.grad is not None]
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    weights = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
    return {"variant": variant, "params": count_params(model), "weights_mb": weights / 2**20,
            "rss_after_load_mb": after_load / 2**20, "peak_rss_mb": peak / 2**20,
            "scoring_peak_over_load_mb": (peak - after_load) / 2**20, "wall_s": wall,
            "tokens": samples * seq_len}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--variant", choices=["hooks", "full_grad"])
    args = ap.parse_args()
    if args.variant:
        print(json.dumps(run(args.variant, args.model, args.samples, args.seq_len)))
        return
    rows = []
    for variant in ("hooks", "full_grad"):
        proc = subprocess.run([sys.executable, __file__, "--variant", variant, "--model", args.model,
                               "--samples", str(args.samples), "--seq-len", str(args.seq_len)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    print("| variant | weights (MB) | RSS after load (MB) | peak RSS (MB) | scoring adds (MB) | wall (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['weights_mb']:.0f} | {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
              f"{r['scoring_peak_over_load_mb']:.0f} | {r['wall_s']:.1f} |")


if __name__ == "__main__":
    main()
