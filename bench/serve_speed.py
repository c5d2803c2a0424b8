"""SmolLM2-135M dense, 20% and 50% pruned, served by llama.cpp (llama-cpp-python): prompt processing
and generation tokens/s, perplexity through llama.cpp vs transformers, and the portable layout's
quality cost.

    python bench/serve_speed.py [--repeats 5] [--ppl-windows 64] [--quality-windows 256]

1. Prune with the default command (`llm-prune prune smollm2-135m --ratio R`) and with `--portable`.
2. Export dense and the default-layout prunes as GGUF (f16 and q8_0) with `llm-prune export`.
3. Speed: batch 1, a 128-token WikiText-2 prompt, then 128 greedily generated tokens (EOS ignored),
   `--repeats` rounds; every round runs every model and dtype in a rotated order, each in a fresh
   process after a short warm-up, so dense and pruned share the machine's load. Reported: median
   tokens/s and the ratio to dense.
4. Perplexity: the first `--ppl-windows` non-overlapping 128-token windows, scored by llama.cpp
   (f16 GGUF) and by transformers (fp32 checkpoint), same token ids.
5. Portable cost: transformers ppl@128 on the first `--quality-windows` windows, default vs portable.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SEQ = 128


def cli(*args: str) -> dict:
    proc = subprocess.run([sys.executable, "-m", "llm_prune", *args, "--json"], capture_output=True, text=True,
                          cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"llm-prune {' '.join(args)} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def windows(tokenizer, text: str, n: int) -> list[list[int]]:
    ids = tokenizer(text, verbose=False)["input_ids"]
    return [ids[i * SEQ:(i + 1) * SEQ] for i in range(min(n, len(ids) // SEQ))]


def engine(path: Path, threads: int, logits_all: bool = False):
    import llama_cpp
    import llama_cpp.llama

    # Weight repacking into extra CPU buffer types (AMX on this Xeon) crashes quantized models in
    # the llama.cpp build measured here; llama-cli's `--no-repack` is the same setting.
    default = llama_cpp.llama_model_default_params

    def no_repack():
        params = default()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = no_repack
    return llama_cpp.Llama(model_path=str(path), n_ctx=2 * SEQ + 8, n_batch=SEQ, n_threads=threads,
                           n_threads_batch=threads,
                 logits_all=logits_all, verbose=False)


def greedy(llm) -> int:
    """Argmax of the last position's logits, read straight from the llama.cpp context."""
    import llama_cpp

    ptr = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
    return int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))


def speed_once(llm, prompt: list[int], gen: int) -> tuple[float, float]:
    """(prompt tokens/s, generated tokens/s) for one prompt and `gen` greedy tokens."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    for _ in range(gen):
        llm.eval([greedy(llm)])
    t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), gen / (t2 - t1)


def engine_ppl(llm, wins: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in wins:
        llm.reset()
        llm.eval(w)
        logits = np.asarray(llm.scores[:len(w) - 1], dtype=np.float64)
        logz = logits.max(-1) + np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1))
        nll += float((logz - logits[np.arange(len(w) - 1), w[1:]]).sum())
        count += len(w) - 1
    return math.exp(nll / count)


def in_engine(task: str, gguf: Path, threads: int, data, gen: int = 0):
    """Run `task` on one GGUF in a child process (llama.cpp only, no torch) and return its result."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump({"task": task, "gguf": str(gguf), "threads": threads, "data": data, "gen": gen}, fh)
    proc = subprocess.run([sys.executable, __file__, "--in-engine", fh.name], capture_output=True, text=True)
    Path(fh.name).unlink()
    if proc.returncode:
        raise SystemExit(f"llama.cpp {task} on {gguf.name} failed: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def engine_main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    llm = engine(Path(job["gguf"]), job["threads"], logits_all=job["task"] == "ppl")
    if job["task"] == "speed":
        speed_once(llm, job["data"][:16], 4)  # warm-up: page in weights, allocate buffers
        print(json.dumps(speed_once(llm, job["data"], job["gen"])))
    else:
        print(json.dumps(engine_ppl(llm, job["data"])))


def hf_ppl(model_dir: str, text: str, n: int) -> float:
    from llm_prune.evaluate import perplexity
    from llm_prune.models import load_model

    model, tok = load_model(model_dir)
    return perplexity(model, tok, text, seq_len=SEQ, max_windows=n)["ppl"]


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--in-engine":
        return engine_main(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--text", default=str(ROOT.parent / "shared" / "data" / "wikitext-2-raw-test.txt"))
    ap.add_argument("--ratios", default="0.2,0.5")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1,
                    help="llama.cpp threads; 1 because the 2 cores are shared (see bench/README.md)")
    ap.add_argument("--ppl-windows", type=int, default=64)
    ap.add_argument("--quality-windows", type=int, default=256)
    ap.add_argument("--layouts", default="default,portable")
    ap.add_argument("--extra", default="", help="extra flags for the default-layout prune, e.g. '--round-to 64'")
    ap.add_argument("--work", default=None, help="keep checkpoints and GGUF files here (default: a temp dir)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve_speed.json"))
    args = ap.parse_args()
    from llm_prune.models import load_model, resolve_source

    text = Path(args.text).read_text()
    results: dict = {"args": vars(args)}
    work = Path(args.work or tempfile.mkdtemp(prefix="serve_speed-"))
    work.mkdir(parents=True, exist_ok=True)
    source = resolve_source(args.model)
    if source.gguf_file:
        load_model(args.model)  # the first load of an alias writes its safetensors cache
        source = resolve_source(args.model)
    models = {"dense": source.path}
    for r in [float(x) for x in args.ratios.split(",")]:
        for layout, flags in (("default", args.extra.split()), ("portable", ["--portable"])):
            if layout not in args.layouts.split(","):
                continue
            out = work / f"{layout}-{r:g}"
            if not (out / "config.json").exists():
                s = cli("prune", args.model, "--ratio", str(r), "-o", str(out), *flags)
                print(f"pruned {layout} {r:.0%}: {s['params_after']:,} params "
                      f"(remote code: {s['needs_remote_code']})", flush=True)
            models[f"{layout}-{r:.0%}"] = str(out)

    served = ["dense"] + [k for k in models if k.startswith("default-")]
    ggufs = {}
    for name in served:
        for dtype in ("f16", "q8_0"):
            path = work / f"{name}-{dtype}.gguf"
            if not path.exists():
                cli("export", models[name], "--format", "gguf", "--dtype", dtype, "-o", str(path))
            ggufs[(name, dtype)] = path

    # Speed, interleaved: each round visits every (model, dtype) in a rotated order.
    tok = load_model(models["dense"])[1]
    prompt = windows(tok, text, 1)[0]
    # Each measurement is its own process holding one engine (no torch in it), after a warm-up.
    keys = list(ggufs)
    samples: dict = {key: [] for key in keys}
    for rep in range(args.repeats):
        order = keys[rep % len(keys):] + keys[:rep % len(keys)]
        for key in order:
            samples[key].append(tuple(in_engine("speed", ggufs[key], args.threads, prompt, gen=args.gen)))
        print(f"speed round {rep + 1}/{args.repeats}: " + ", ".join(
            f"{k[0]} {k[1]} {samples[k][-1][1]:.1f}" for k in keys) + " gen tok/s", flush=True)
    speed = []
    for (name, dtype), runs in samples.items():
        pp = statistics.median(r[0] for r in runs)
        tg = statistics.median(r[1] for r in runs)
        speed.append({"model": name, "dtype": dtype, "pp_tok_s": pp, "tg_tok_s": tg,
                      "gguf_bytes": ggufs[(name, dtype)].stat().st_size, "runs": runs})
    for row in speed:
        base = next(d for d in speed if d["model"] == "dense" and d["dtype"] == row["dtype"])
        row["pp_ratio"], row["tg_ratio"] = row["pp_tok_s"] / base["pp_tok_s"], row["tg_tok_s"] / base["tg_tok_s"]
    results["speed"] = speed
    print("\n| model | GGUF | size (MB) | prompt tok/s | × dense | generation tok/s | × dense |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in speed:
        print(f"| {r['model']} | {r['dtype']} | {r['gguf_bytes'] / 1e6:.0f} | {r['pp_tok_s']:.0f} | "
              f"{r['pp_ratio']:.2f} | {r['tg_tok_s']:.1f} | {r['tg_ratio']:.2f} |", flush=True)

    # Perplexity through llama.cpp (f16) vs transformers (fp32), same windows.
    wins = windows(tok, text, args.ppl_windows)
    ppl_rows = []
    for name in served:
        got = in_engine("ppl", ggufs[(name, "f16")], args.threads, wins)
        ref = hf_ppl(models[name], text, len(wins))
        ppl_rows.append({"model": name, "windows": len(wins), "llama_cpp_f16": got, "transformers_fp32": ref,
                         "rel_diff": got / ref - 1})
        print(f"ppl@{SEQ} {name}: llama.cpp f16 {got:.3f}, transformers {ref:.3f} ({100 * (got / ref - 1):+.2f}%)",
              flush=True)
    results["ppl"] = ppl_rows

    # The portable layout's quality cost.
    quality = []
    for name in models:
        quality.append({"model": name, "windows": args.quality_windows,
                        "ppl": hf_ppl(models[name], text, args.quality_windows)})
        print(f"ppl@{SEQ} ({args.quality_windows} windows) {name}: {quality[-1]['ppl']:.2f}", flush=True)
    results["quality"] = quality
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
