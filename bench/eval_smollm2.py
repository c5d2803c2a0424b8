"""Dense SmolLM2-135M on the seven zero-shot tasks and WikiText-2 perplexity.

    .venv/bin/python bench/eval_smollm2.py --limit 100 --ppl-tokens 16384 \
        --ppl ../shared/data/wikitext-2-raw-test.txt --seq-len 128,2048

(--limit 0 --ppl-tokens 0 runs the full sets and the whole text.)

Prints a table with wall times and writes JSON to bench/results/eval_smollm2.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llm_prune.evaluate import COMMONSENSE_TASKS, evaluate_model, format_table, read_text_file  # noqa: E402
from llm_prune.models import load_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tasks", default=",".join(COMMONSENSE_TASKS))
    ap.add_argument("--limit", type=int, default=500, help="items per task (0 = full sets)")
    ap.add_argument("--ppl", default=str(REPO / ".." / "shared" / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--seq-len", default="128,2048")
    ap.add_argument("--ppl-tokens", type=int, default=0,
                    help="score only the first N tokens per window length (N // seq_len windows; 0 = whole text)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--output", default=str(REPO / "bench" / "results" / "eval_smollm2.json"))
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    load_s = time.perf_counter() - t0
    text = read_text_file(args.ppl) if args.ppl else None
    timings: dict[str, float] = {}

    def report(event) -> None:
        if event.kind == "metric":
            print(f"  {event.message}: {event.metrics} ({time.perf_counter() - t0:.0f} s)", flush=True)

    def timed(label: str, **kw) -> dict:
        start = time.perf_counter()
        res = evaluate_model(model, tokenizer, batch_size=args.batch_size, on_event=report, **kw)
        timings[label] = time.perf_counter() - start
        print(f"[{label}] {timings[label]:.1f} s", flush=True)
        return res

    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]),
                     "machine": {"cpu_count": os.cpu_count(), "threads": args.threads,
                                 "platform": platform.platform(), "torch": torch.__version__,
                                 "cuda": torch.cuda.is_available()}}

    def save() -> None:  # after every stage, so a long run interrupted still leaves its numbers
        results["wall_s"] = {"load": load_s, **timings, "total": time.perf_counter() - t0}
        out.write_text(json.dumps(results, indent=2) + "\n")

    if args.tasks:
        results.update(timed("tasks", tasks=args.tasks, limit=args.limit or None))
        save()
    for length in ([int(s) for s in args.seq_len.split(",")] if text is not None else []):
        windows = max(1, args.ppl_tokens // length) if args.ppl_tokens else None
        ppl = timed(f"ppl@{length}", ppl_text=text, seq_len=length, max_windows=windows)
        results.setdefault("ppl", ppl["ppl"])
        results.setdefault("ppl_by_seq_len", {}).update(ppl["ppl_by_seq_len"])
        results["params"] = ppl["params"]
        save()
    save()

    print(format_table(results, markdown=True))
    for name, res in results.get("tasks", {}).items():
        print(f"{name:14s} acc {100 * res['acc']:.2f}  acc_norm {100 * res['acc_norm']:.2f}  n {res['n']}  "
              f"{res['seconds']:.0f} s")
    print("wall:", {k: round(v, 1) for k, v in results["wall_s"].items()})
    print("written:", out)


if __name__ == "__main__":
    main()
