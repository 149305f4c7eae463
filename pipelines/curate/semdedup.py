"""SemDeDup (Abbas et al. 2023) over image embeddings, plus perceptual-hash duplicates.

1. k-means (faiss) on a seeded sample of the embeddings, spherical (cosine) as SemDeDup uses it;
2. every embedding is assigned to its nearest centroid, a batch at a time;
3. within each cluster, in a fixed order, a row is a duplicate of the *first* earlier row whose
   cosine is at least the threshold (SemDeDup's rule: the upper triangle's column maximum), or whose
   64-bit phash is within ``phash_max_distance`` bits (and, with ``phash_min_cosine``, whose cosine is
   also at least that: a phash is colour-blind): one row kept per group.

Why faiss and not scikit-learn: faiss's k-means and nearest-centroid search are BLAS matmuls with
its own threads, ~10x faster than scikit-learn's (Mini)BatchKMeans on 512-d rows, and the
assignment streams batch by batch (``index.search``) with only the centroids in memory;
SemDeDup's reference code uses faiss too. Memory: the k-means sample, the centroids, and one
cluster (processed in column blocks of ``BLOCK`` rows, so an oversized cluster costs
``rows x BLOCK`` floats, not ``rows^2``).
"""

from __future__ import annotations

from typing import Optional

import numpy as np

BLOCK = 2048


def default_clusters(rows: int) -> int:
    return max(1, int(round(np.sqrt(rows / 2))))


def train_kmeans(sample: np.ndarray, k: int, iterations: int, seed: int, threads: Optional[int] = None) -> np.ndarray:
    """Spherical k-means centroids (k x d, unit rows) trained on ``sample``."""
    import faiss

    if threads:
        faiss.omp_set_num_threads(threads)
    x = np.ascontiguousarray(sample, dtype=np.float32)
    k = max(1, min(k, len(x)))
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, verbose=False,
                      max_points_per_centroid=max(256, -(-len(x) // k)))
    km.train(x)
    return km.centroids.copy()


class Assigner:
    """Nearest centroid (inner product on unit vectors = cosine) of a batch of embeddings."""

    def __init__(self, centroids: np.ndarray):
        import faiss

        self.index = faiss.IndexFlatIP(centroids.shape[1])
        self.index.add(np.ascontiguousarray(centroids, dtype=np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        _, labels = self.index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
        return labels[:, 0].astype(np.int64)


def normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(n > 0, n, 1)


def duplicates_in_cluster(
    emb: np.ndarray, threshold: float, hashes: Optional[np.ndarray] = None, hash_valid: Optional[np.ndarray] = None,
    phash_max_distance: int = -1, phash_min_cosine: Optional[float] = None,
) -> np.ndarray:
    """For rows in their kept order: the index of the first earlier row each duplicates, -1 if none.

    ``emb`` unit rows (m x d); ``hashes`` uint64 phashes with ``hash_valid`` saying which are real; a
    phash match counts only where the cosine is at least ``phash_min_cosine`` (None: always).
    """
    m = len(emb)
    first = np.full(m, -1, np.int64)
    if m < 2:
        return first
    e = np.ascontiguousarray(emb, dtype=np.float32)
    use_hash = hashes is not None and phash_max_distance >= 0
    for start in range(0, m, BLOCK):
        stop = min(m, start + BLOCK)
        sim = e[:stop] @ e[start:stop].T  # rows 0..stop-1 against columns start..stop-1
        match = sim >= threshold
        if use_hash:
            bits = np.bitwise_count(np.bitwise_xor(hashes[:stop, None], hashes[None, start:stop]))
            valid = hash_valid[:stop, None] & hash_valid[None, start:stop]
            near = (bits <= phash_max_distance) & valid
            if phash_min_cosine is not None:
                near &= sim >= phash_min_cosine
            match |= near
        rows = np.arange(stop)[:, None]
        cols = np.arange(start, stop)[None, :]
        match &= rows < cols  # only earlier rows count
        has = match.any(axis=0)
        first[start:stop][has] = match.argmax(axis=0)[has]
    return first


def dedup_clusters(labels: np.ndarray, emb: np.ndarray, threshold: float, order: Optional[np.ndarray] = None,
                   hashes: Optional[np.ndarray] = None, hash_valid: Optional[np.ndarray] = None,
                   phash_max_distance: int = -1, phash_min_cosine: Optional[float] = None) -> np.ndarray:
    """``duplicate_of`` for every row (a row index, -1 when kept), cluster by cluster.

    ``order``: a sort key deciding which row of a group is kept (the smallest); default the row index.
    """
    n = len(labels)
    out = np.full(n, -1, np.int64)
    key = np.arange(n) if order is None else order
    by = np.lexsort((key, labels))
    bounds = np.flatnonzero(np.diff(labels[by])) + 1
    for members in np.split(by, bounds):
        if len(members) < 2:
            continue
        first = duplicates_in_cluster(
            emb[members], threshold,
            None if hashes is None else hashes[members], None if hash_valid is None else hash_valid[members],
            phash_max_distance, phash_min_cosine,
        )
        dup = first >= 0
        out[members[dup]] = members[first[dup]]
    return out
