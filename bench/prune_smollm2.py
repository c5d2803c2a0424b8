"""SmolLM2-135M pruned by 20% and 50% of total parameters: allocation (uniform / adaptive), output
reconstruction on / off and calibration budgets. Columns: WikiText-2 ppl@128, optionally the
seven-task average (with its standard error), pruning wall time, whole-command wall time, peak RSS.

    python bench/prune_smollm2.py                       # the whole grid, ppl only
    python bench/prune_smollm2.py --rows default --ratios 0.2 --tasks-limit 100
    python bench/prune_smollm2.py --rows uniform,uniform+rec --dense-ppl 56.35

Each pruning runs as its own `llm-prune prune --json` process so wall time and peak RSS are that
command's own. Perplexity: first N non-overlapping 128-token windows of the text. Rows are appended
to the JSON results file as they finish, so a partial grid keeps its numbers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROWS = {
    "default": [],
    "uniform": ["--allocation", "uniform", "--no-reconstruct"],
    "uniform+rec": ["--allocation", "uniform", "--reconstruct"],
    "adaptive": ["--allocation", "adaptive", "--no-reconstruct"],
    "adaptive+rec": ["--allocation", "adaptive", "--reconstruct"],
    "adaptive+rec-A0.1": ["--allocation", "adaptive", "--adaptive-strength", "0.1"],
    "obs": ["--importance", "obs"],
    "default@1024": ["--calibration-tokens", "1024"],
    "default@4096": ["--calibration-tokens", "4096"],
    "default@8192": ["--calibration-tokens", "8192"],
}


def evaluate(model_dir: str, text: str, windows: int, tasks_limit: int | None) -> dict:
    from llm_prune.evaluate import COMMONSENSE_TASKS, average_stderr, evaluate_model
    from llm_prune.models import load_model

    model, tok = load_model(model_dir)
    res = evaluate_model(model, tok, ppl_text=text, seq_len=128, max_windows=windows,
                         tasks=list(COMMONSENSE_TASKS) if tasks_limit else (), limit=tasks_limit)
    out = {"ppl": res["ppl"]["ppl"], "windows": res["ppl"]["windows"]}
    if tasks_limit:
        t = res["tasks"]
        out["avg"] = res["average"]
        out["avg_stderr"] = average_stderr(t)
        out["tasks"] = {k: v[v["metric"]] for k, v in t.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {', '.join(ROWS)}")
    ap.add_argument("--tasks-limit", type=int, default=None, help="also the seven-task average, N items per task")
    ap.add_argument("--dense-ppl", type=float, default=None,
                    help="skip the dense evaluation (ppl and tasks), use this ppl")
    ap.add_argument("--extra", default="", help="extra flags for every `llm-prune prune` run")
    ap.add_argument("--row", action="append", default=[], metavar="NAME=FLAGS",
                    help="an extra row: the default command with FLAGS (repeatable)")
    ap.add_argument("--layers", default="", metavar="N,N,...",
                    help="extra rows plN: the default command with --prune-layers N, for each N")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune_smollm2.json"))
    args = ap.parse_args()
    args.row += [f"pl{n}=--prune-layers {n}" for n in filter(None, args.layers.split(","))]
    for spec in args.row:
        name, _, flags = spec.partition("=")
        ROWS[name] = flags.split()
        if args.rows == ap.get_default("rows"):
            args.rows = name
        elif name not in args.rows.split(","):
            args.rows = f"{args.rows},{name}"
    unknown = [r for r in args.rows.split(",") if r not in ROWS]
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    text = Path(args.text).read_text()
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.dense_ppl is None:
        dense = {"config": "dense", **evaluate(args.model, text, args.windows, args.tasks_limit)}
    else:
        dense = {"config": "dense", "ppl": args.dense_ppl, "windows": args.windows}
    rows.append(dense)
    print(json.dumps(dense), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for name in args.rows.split(","):
                flags = ROWS[name] + args.extra.split()
                out = Path(tmp) / f"{name}-{ratio}"
                cmd = [sys.executable, "-m", "llm_prune", "prune", args.model, "--ratio", str(ratio),
                       "-o", str(out), "--json", *flags]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    raise SystemExit(proc.returncode)
                s = json.loads(proc.stdout)
                row = {"config": f"{name} {ratio:.0%}", "ratio": ratio, "flags": " ".join(flags),
                       "params_before": s["params_before"], "params_after": s["params_after"],
                       "removed": s["removed_fraction"], "target_error": s["target_error"],
                       "calibration_tokens": s["timings"].get("calibration_tokens"),
                       "prune_s": s["timings"]["prune_s"], "score_s": s["timings"]["score_s"],
                       "reconstruct_s": s["timings"].get("reconstruct_s", 0.0), "command_wall_s": wall,
                       "peak_rss_mb": s["peak_rss_bytes"] / 2**20,
                       **evaluate(str(out), text, args.windows, args.tasks_limit)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                out_path.write_text(json.dumps(rows, indent=2))
    print("\n| config | calib. tokens | params after | prune step (s) | command wall (s) | peak RSS (MB) "
          "| ppl@128 | x dense | 7-task avg |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    avg = (lambda r: f"{100 * r['avg']:.2f} ± {100 * r['avg_stderr']:.2f}" if "avg" in r else "")
    print(f"| dense | | {rows[1]['params_before']:,} | | | | {dense['ppl']:.2f} | 1.00 | {avg(dense)} |"
          if len(rows) > 1 else "")
    for r in rows[1:]:
        print(f"| {r['config']} | {r['calibration_tokens']} | {r['params_after']:,} | {r['prune_s']:.1f} | "
              f"{r['command_wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['ppl']:.2f} | "
              f"{r['ppl'] / dense['ppl']:.2f} | {avg(r)} |")


if __name__ == "__main__":
    main()
