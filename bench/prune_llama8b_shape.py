"""A randomly initialised Llama-3-8B-shaped model in bfloat16, pruned by 20% of its parameters with
the default method (uniform widths, OBS choosing the units inside output reconstruction on 20,480
tokens): wall time of the pruning and peak GPU memory.

    python bench/prune_llama8b_shape.py --prepare bench/gpu-inputs    # here: tokenizer, text, wheels
    pip install --no-index --find-links bench/gpu-inputs/wheels pydantic   # on the CUDA machine, then
    python bench/prune_llama8b_shape.py --inputs bench/gpu-inputs
    python bench/prune_llama8b_shape.py --shape tiny --device cpu     # the same path, small

The weights are random (the cost of pruning depends on the shapes, not on what the model
knows). Token ids come from SmolLM2's tokenizer (a 49,152-token vocabulary, inside Llama-3's
128,256) on the built-in LAMBADA passages; `--prepare` writes both to a folder, with wheels of
pydantic (which the recipe needs), so a machine without those packages or a network can run it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-3-8B, and a small model of the same proportions for a quick check anywhere
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False),
    "tiny": dict(hidden_size=512, intermediate_size=1792, num_hidden_layers=12, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=49152, rope_theta=500000.0, max_position_embeddings=2048,
                 tie_word_embeddings=True),
}


def prepare(folder: Path, python_version: str) -> None:
    from llm_prune.calibration import default_passages
    from llm_prune.models import load_model

    folder.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_model("smollm2-135m")
    tokenizer.save_pretrained(folder / "tokenizer")
    with open(folder / "calibration.jsonl", "w", encoding="utf-8") as fh:
        for text in default_passages():
            fh.write(json.dumps({"text": text}) + "\n")
    # The recipe's schema needs pydantic, which a bare GPU image may lack (it has no network).
    subprocess.run([sys.executable, "-m", "pip", "download", "pydantic", "--only-binary=:all:", "--implementation",
                    "cp", "--python-version", python_version, "--platform", "manylinux2014_x86_64", "-q",
                    "-d", str(folder / "wheels")], check=True)
    print(f"wrote {folder}/tokenizer, {folder}/calibration.jsonl and {folder}/wheels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--inputs", type=Path, help="folder written by --prepare (default: the installed packages)")
    ap.add_argument("--prepare", type=Path, metavar="FOLDER",
                    help="write the tokenizer, the text and pydantic's wheels, then stop")
    ap.add_argument("--python-version", default="312", help="--prepare: the GPU machine's Python (wheels)")
    args = ap.parse_args()
    if args.prepare:
        prepare(args.prepare, args.python_version)
        return

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from llm_prune.models import load_model
    from llm_prune.plan import count_params
    from llm_prune.prune import prune_model
    from llm_prune.recipe import Budget, PruningConfig

    if args.inputs:
        tokenizer = AutoTokenizer.from_pretrained(args.inputs / "tokenizer")
        cfg = PruningConfig(calibration=str(args.inputs / "calibration.jsonl"))
    else:
        tokenizer, cfg = load_model("smollm2-135m")[1], PruningConfig()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on the GPU machine, or pass --shape tiny --device cpu")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    torch.set_default_dtype(torch.bfloat16)
    with device:
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[args.shape])).eval()
    torch.set_default_dtype(torch.float32)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    weights = torch.cuda.memory_allocated() if cuda else None
    before = count_params(model)
    t0 = time.perf_counter()
    result = prune_model(model, tokenizer, Budget(ratio=args.ratio), cfg)
    if cuda:
        torch.cuda.synchronize()
    row = {"shape": args.shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "ratio": args.ratio, "params_before": before, "params_after": count_params(result.model),
           "build_s": round(build_s, 1), "prune_s": round(time.perf_counter() - t0, 1),
           "timings": {k: round(v, 1) for k, v in result.timings.items()}}
    if cuda:
        row["weights_gib"] = round(weights / 2**30, 2)
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        row["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
