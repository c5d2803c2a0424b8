"""Semantic-structural clustering: a sparse k-nearest-neighbour affinity graph over instruction
embeddings, a spectral embedding of its normalised Laplacian (the manifold step), then k-means.

Memory stays linear in N: the graph holds N*n_neighbors edges, the eigensolver works on that
sparse matrix, and the neighbour search runs in bounded chunks. No N*N matrix is formed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import eigsh

from llm_prune.errors import UserError


@dataclass
class Clustering:
    labels: np.ndarray  # (N,) cluster id per record, 0..k-1
    num_clusters: int
    method: str  # "given" | "eigengap"
    eigenvalues: list[float] = field(default_factory=list)  # smallest of the normalised Laplacian

    def sizes(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=self.num_clusters)


def knn_affinity(x: np.ndarray, n_neighbors: int = 15, max_components: int | None = None,
                 working_memory_mb: int = 256) -> sp.csr_matrix:
    """Symmetric sparse affinity with self-tuning Gaussian weights, w_ij = exp(-d_ij^2 / (s_i s_j)),
    s_i = distance to the i-th point's furthest kept neighbour (Zelnik-Manor & Perona), so dense and
    sparse topics are both connected at their own scale. Beyond `max_components` connected
    components, the smallest ones (typically runs of duplicate prompts) are bridged to their
    nearest points outside, so they cannot crowd out the real structure."""
    from sklearn import config_context
    from sklearn.neighbors import NearestNeighbors

    n = x.shape[0]
    k = min(n_neighbors, n - 1)
    with config_context(working_memory=working_memory_mb):
        nn = NearestNeighbors(n_neighbors=k + 1, metric="euclidean", algorithm="brute").fit(x)
        dist, idx = nn.kneighbors(x)
    dist, idx = dist[:, 1:], idx[:, 1:]  # drop the point itself
    floor = max(float(np.median(dist[:, -1])) * 1e-2, 1e-6)  # duplicates must not get a zero scale
    scale = np.maximum(dist[:, -1], floor)
    rows = np.repeat(np.arange(n), k)
    cols = idx.ravel()
    d = dist.ravel()
    w = _kernel(rows, cols, d, scale, n)
    if max_components is not None:
        extra = _bridges(x, w, nn, scale, k, max_components, working_memory_mb)
        if extra is not None:
            rows, cols, d = (np.concatenate([a, b]) for a, b in zip((rows, cols, d), extra))
            w = _kernel(rows, cols, d, scale, n)
    return w


def _kernel(rows, cols, d, scale, n) -> sp.csr_matrix:
    weights = np.exp(-(d ** 2) / (scale[rows] * scale[cols]))
    w = sp.csr_matrix((weights.astype(np.float64), (rows, cols)), shape=(n, n))
    return w.maximum(w.T).tocsr()


def _bridges(x, w, nn, scale, k, max_components, working_memory_mb):
    """Edges from each point of the smallest components to its k nearest points outside them."""
    from scipy.sparse.csgraph import connected_components
    from sklearn import config_context

    count, comp = connected_components(w, directed=False)
    if count <= max_components:
        return None
    sizes = np.bincount(comp)
    small = np.argsort(-sizes, kind="stable")[max_components:]
    rows, cols, dists = [], [], []
    with config_context(working_memory=working_memory_mb):
        for c in small:
            members = np.flatnonzero(comp == c)
            want = min(int(sizes[c]) + k, x.shape[0] - 1)
            dist, idx = nn.kneighbors(x[members], n_neighbors=want + 1)
            for i, drow, irow in zip(members, dist, idx):
                outside = comp[irow] != c
                rows.append(np.full(int(min(outside.sum(), k)), i))
                cols.append(irow[outside][:k])
                dists.append(np.maximum(drow[outside][:k], 1e-6))
    return np.concatenate(rows), np.concatenate(cols), np.concatenate(dists)


def spectral_embedding(w: sp.csr_matrix, n_components: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvectors for the smallest eigenvalues of L = I - D^-1/2 W D^-1/2 (returned ascending).
    They are the largest of S = D^-1/2 W D^-1/2, which ARPACK finds from the sparse matrix alone.
    Each connected component c contributes an exact eigenvector D^1/2 1_c (eigenvalue 0 of L);
    Lanczos tends to miss copies of a repeated eigenvalue, so those are written down directly and
    deflated, and ARPACK looks only for the rest."""
    from scipy.sparse.csgraph import connected_components
    from scipy.sparse.linalg import LinearOperator

    deg = np.asarray(w.sum(axis=1)).ravel()
    sqrt_deg = np.sqrt(np.maximum(deg, 1e-12))
    s = sp.diags(1.0 / sqrt_deg) @ w @ sp.diags(1.0 / sqrt_deg)
    n = w.shape[0]
    m = min(n_components, n - 2)
    count, comp = connected_components(w, directed=False)
    order = np.argsort(-np.bincount(comp), kind="stable")[:m]
    null = np.zeros((n, len(order)))
    for j, c in enumerate(order):
        v = np.where(comp == c, sqrt_deg, 0.0)
        null[:, j] = v / np.linalg.norm(v)
    rest = m - len(order)
    if rest <= 0:
        return np.zeros(m), null
    op = LinearOperator((n, n), dtype=np.float64,
                        matvec=lambda v: s @ v - null @ (null.T @ v),
                        matmat=lambda v: s @ v - null @ (null.T @ v))
    v0 = np.random.default_rng(seed).uniform(-1, 1, n)
    v0 -= null @ (null.T @ v0)
    ncv = min(n - 1, max(2 * rest + 1, 64))
    vals, vecs = eigsh(op, k=rest, which="LA", v0=v0, ncv=ncv, tol=1e-6, maxiter=max(1000, 20 * n))
    top = np.argsort(-vals)
    eigenvalues = np.concatenate([np.zeros(len(order)), 1.0 - vals[top]])
    return eigenvalues, np.hstack([null, vecs[:, top]])


def eigengap_k(eigenvalues: np.ndarray, max_clusters: int) -> int:
    """k with the largest gap lambda_{k+1} - lambda_k among k in [2, max_clusters]."""
    top = min(max_clusters, len(eigenvalues) - 1)
    if top < 2:
        return 2
    gaps = np.diff(eigenvalues[: top + 1])
    return int(np.argmax(gaps[1:]) + 2)


def check_cluster_count(n: int, num_clusters: int | None) -> None:
    """What clustering `n` records into `num_clusters` (None: chosen) needs; `run` asks before it prunes."""
    if n < 4:
        raise UserError(f"the pool has {n} records; clustering needs at least 4", param="pool")
    if num_clusters is not None:
        if num_clusters < 2:
            raise UserError("--clusters must be at least 2", param="num_clusters")
        if num_clusters > n // 2:
            raise UserError(f"--clusters {num_clusters} is too many for {n} records (at most {n // 2})",
                            param="num_clusters")


def cluster_embeddings(x: np.ndarray, num_clusters: int | None = None, *, n_neighbors: int = 15,
                       max_clusters: int | None = None, seed: int = 0) -> Clustering:
    """Cluster embeddings (N x d). `num_clusters=None` picks k by the eigengap heuristic."""
    from sklearn.cluster import KMeans

    n = x.shape[0]
    check_cluster_count(n, num_clusters)
    if max_clusters is None:
        # Enough room for many capabilities, while every cluster keeps a few dozen samples on average.
        max_clusters = int(np.clip(np.sqrt(n / 2), 2, 50))
    want = num_clusters if num_clusters is not None else max_clusters
    # Leave the eigengap room to find structure beyond the graph's connected pieces.
    keep = num_clusters if num_clusters is not None else max(2, max_clusters // 2)
    w = knn_affinity(np.asarray(x, dtype=np.float32), n_neighbors=n_neighbors, max_components=keep)
    eigenvalues, vectors = spectral_embedding(w, want + 1, seed=seed)
    if num_clusters is None:
        k, method = eigengap_k(eigenvalues, max_clusters), "eigengap"
    else:
        k, method = num_clusters, "given"
    # Ng-Jordan-Weiss: k-means on the row-normalised first k eigenvectors.
    emb = vectors[:, :k]
    emb = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    labels = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(emb)
    # Renumber by size (largest first) so reports read the same from run to run.
    order = np.argsort(-np.bincount(labels, minlength=k), kind="stable")
    remap = np.empty(k, dtype=np.int64)
    remap[order] = np.arange(k)
    return Clustering(labels=remap[labels], num_clusters=k, method=method,
                      eigenvalues=[float(v) for v in eigenvalues[: max(k + 2, 12)]])
