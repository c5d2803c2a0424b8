"""SmolLM2-135M pruned by 20% and 50% of total parameters (Taylor; uniform and adaptive):
pruning wall time, peak RSS, parameters and WikiText-2 ppl@128 before and after.

    .venv/bin/python bench/prune_smollm2.py [--text ../shared/data/wikitext-2-raw-test.txt] [--windows 256]

Each pruning runs as its own `llm-prune prune --json` process so wall time and peak RSS are that
command's own. Perplexity: first N non-overlapping 128-token windows of the text.
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
CONFIGS = [
    ("uniform", []),
    ("adaptive", ["--allocation", "adaptive"]),
]


def ppl(model_dir: str, text: str, windows: int) -> dict:
    from llm_prune.evaluate import perplexity
    from llm_prune.models import load_model

    model, tok = load_model(model_dir)
    t0 = time.perf_counter()
    out = perplexity(model, tok, text, seq_len=128, max_windows=windows)
    out["wall_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--extra", default="", help="extra flags for every `llm-prune prune` run")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prune_smollm2.json"))
    args = ap.parse_args()
    text = Path(args.text).read_text()
    rows = []
    dense = ppl(args.model, text, args.windows)
    rows.append({"config": "dense", "ppl": dense["ppl"], "windows": dense["windows"]})
    print(f"dense ppl@128 {dense['ppl']:.2f} ({dense['windows']} windows)", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for ratio in [float(r) for r in args.ratios.split(",")]:
            for name, flags in CONFIGS:
                out = Path(tmp) / f"{name}-{ratio}"
                cmd = [str(ROOT / ".venv" / "bin" / "llm-prune"), "prune", args.model, "--ratio", str(ratio),
                       "-o", str(out), "--json", *flags, *args.extra.split()]
                t0 = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                if proc.returncode != 0:
                    print(proc.stderr, file=sys.stderr)
                    raise SystemExit(proc.returncode)
                s = json.loads(proc.stdout)
                p = ppl(str(out), text, args.windows)
                row = {"config": f"{name} {ratio:.0%}", "ratio": ratio, "flags": " ".join(flags + args.extra.split()),
                       "params_before": s["params_before"], "params_after": s["params_after"],
                       "removed": s["removed_fraction"], "target_error": s["target_error"],
                       "prune_s": s["timings"]["prune_s"], "score_s": s["timings"]["score_s"],
                       "command_wall_s": wall, "peak_rss_mb": s["peak_rss_bytes"] / 2**20, "ppl": p["ppl"],
                       "windows": p["windows"]}
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))
    print("\n| config | params after | removed | prune step (s) | command wall (s) | peak RSS (MB) | ppl@128 |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| dense | {rows[1]['params_before']:,} | 0 | | | | {dense['ppl']:.2f} |" if len(rows) > 1 else "")
    for r in rows[1:]:
        print(f"| {r['config']} | {r['params_after']:,} | {100 * r['removed']:.2f}% | {r['prune_s']:.1f} | "
              f"{r['command_wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['ppl']:.2f} |")


if __name__ == "__main__":
    main()
