"""SemDeDup at scale and perceptual-hash throughput: the two costs of `lmeye curate` that grow with the table.

    .venv/bin/python benchmarks/curate.py [--rows 1000000] [--dim 512] [--subset 50000] [--threads 2]

1. *SemDeDup*: ``--rows`` synthetic unit embeddings (float16 in memory, ``--dim`` wide) drawn around
   ``--topics`` topic centres (same-topic cosine about 0.5, like CLIP image embeddings of one
   subject), with planted near-duplicate groups of 2-4 copies (copy-to-source cosine about 0.985).
   The stage's own functions (``pipelines.curate.semdedup``: faiss k-means on a sample, nearest
   centroid by batch, per-cluster cosine in column blocks) find the duplicates; recall and
   precision of the planted pairs are reported (target >= 0.98 each).
   Baseline: exact all-pairs search (blocked matmul, same threshold) on the first ``--subset``
   rows, timed, and scaled by (rows / subset)^2 to the full table: the ratio is
   SemDeDup's wall time over the scaled all-pairs time. SemDeDup on that same subset is also run,
   and its pairs compared with the exact ones (what clustering loses).
2. *phash*: ``imagehash.phash`` (as the stage computes it, JPEG bytes in) over ``--images``
   256x256 JPEGs, one thread: images/s per core.

Peak RSS is printed at the end (target: under ~3 GB at 1,000,000 x 512).
"""

from __future__ import annotations

import argparse
import io
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.curate import scores, semdedup  # noqa: E402

COPY_NOISE = 0.0078  # per-dimension noise of a planted copy at 512-d: cosine to its source ~0.985
TOPIC_NOISE = 0.045  # per-dimension spread around a topic centre: same-topic cosine ~0.5


def make_embeddings(rows: int, dim: int, topics: int, groups: int, seed: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """float16 unit rows; the planted groups as arrays of row indices (source first)."""
    rng = np.random.default_rng(seed)
    centres = semdedup.normalise(rng.standard_normal((topics, dim)))
    x = np.empty((rows, dim), np.float16)
    step = 65536
    scale = TOPIC_NOISE * np.sqrt(512 / dim)
    for start in range(0, rows, step):
        n = min(step, rows - start)
        v = centres[rng.integers(0, topics, n)] + scale * rng.standard_normal((n, dim)).astype(np.float32)
        x[start:start + n] = semdedup.normalise(v)
    sizes = rng.integers(2, 5, groups)
    members = rng.permutation(rows)[: int(sizes.sum())]
    out = []
    at = 0
    copy = COPY_NOISE * np.sqrt(512 / dim)
    for s in sizes:
        g = np.sort(members[at:at + s])
        at += s
        src = x[g[0]].astype(np.float32)
        x[g[1:]] = semdedup.normalise(src + copy * rng.standard_normal((s - 1, dim)).astype(np.float32))
        out.append(g)
    return x, out


def semdedup_all(x: np.ndarray, threshold: float, clusters: int, sample: int, iterations: int, seed: int, threads: int) -> np.ndarray:
    """duplicate_of for every row (-1: kept), as the stage does it, batch by batch."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    centroids = semdedup.train_kmeans(x[pick].astype(np.float32), clusters, iterations, seed, threads=threads)
    assign = semdedup.Assigner(centroids)
    labels = np.empty(len(x), np.int64)
    for start in range(0, len(x), 65536):
        labels[start:start + 65536] = assign(x[start:start + 65536].astype(np.float32))
    out = np.full(len(x), -1, np.int64)
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order])) + 1
    for members in np.split(order, bounds):
        if len(members) > 1:
            first = semdedup.duplicates_in_cluster(x[members].astype(np.float32), threshold)
            dup = first >= 0
            out[members[dup]] = members[first[dup]]
    return out


def all_pairs(x: np.ndarray, threshold: float) -> set[tuple[int, int]]:
    """Every pair (i < j) at or above the threshold, by blocked exact matmul."""
    x = x.astype(np.float32)
    found = set()
    block = 4096
    for start in range(0, len(x), block):
        sim = x[start:start + block] @ x.T
        i, j = np.nonzero(sim >= threshold)
        i = i + start
        keep = i < j
        found.update(zip(i[keep].tolist(), j[keep].tolist()))
    return found


def components(dup: np.ndarray) -> np.ndarray:
    """Root of every row following duplicate_of links (the groups SemDeDup formed)."""
    root = np.arange(len(dup))
    has = dup >= 0
    root[has] = dup[has]
    while True:  # duplicate_of points to an earlier row, so this converges
        nxt = root[root]
        if np.array_equal(nxt, root):
            return root
        root = nxt


def quality(dup: np.ndarray, groups: list[np.ndarray]) -> tuple[float, float, int]:
    """(recall of planted pairs, precision of predicted links, predicted links)."""
    root = components(dup)
    planted = found = 0
    group_of = {}
    for k, g in enumerate(groups):
        for a in range(len(g)):
            group_of[int(g[a])] = k
            for b in range(a + 1, len(g)):
                planted += 1
                found += int(root[g[a]] == root[g[b]])
    links = np.flatnonzero(dup >= 0)
    right = sum(1 for j in links if group_of.get(int(j), -1) == group_of.get(int(dup[j]), -2))
    return found / max(1, planted), right / max(1, len(links)), len(links)


def phash_rate(images: int, seed: int) -> tuple[float, float]:
    """(images per CPU-second of this process, images per wall second): on a loaded machine the
    first is the per-core figure, the second what this run got."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(images):  # smooth random images (upsampled noise), JPEG-encoded like downloaded ones
        small = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((256, 256), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        blobs.append(buf.getvalue())
    t, c = time.perf_counter(), time.process_time()
    hashes = [scores.phash_hex(b) for b in blobs]
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    assert all(hashes)
    return images / cpu, images / wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--topics", type=int, default=2000)
    ap.add_argument("--groups", type=int, default=20_000, help="planted near-duplicate groups (2-4 rows each)")
    ap.add_argument("--subset", type=int, default=50_000)
    ap.add_argument("--threshold", type=float, default=0.95)
    ap.add_argument("--clusters", type=int, default=None, help="default: the stage's sqrt(rows / 2)")
    ap.add_argument("--sample", type=int, default=100_000, help="k-means training rows (the stage's kmeans_sample)")
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--images", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    t = time.perf_counter()
    x, groups = make_embeddings(args.rows, args.dim, args.topics, args.groups, args.seed)
    print(f"embeddings: {args.rows} x {args.dim} float16, {len(groups)} planted groups "
          f"({sum(len(g) for g in groups)} rows), made in {time.perf_counter() - t:.1f}s")
    k = args.clusters or semdedup.default_clusters(args.rows)

    t = time.perf_counter()
    dup = semdedup_all(x, args.threshold, k, args.sample, args.iterations, args.seed, args.threads)
    t_sem = time.perf_counter() - t
    recall, precision, links = quality(dup, groups)
    print(f"SemDeDup ({k} clusters, k-means on {min(args.sample, args.rows)} rows): {t_sem:.1f}s, "
          f"{links} duplicates; planted pairs recall {recall:.4f}, precision {precision:.4f} (target >= 0.98 each)")

    n = min(args.subset, args.rows)
    sub = x[:n]
    t = time.perf_counter()
    exact = all_pairs(sub, args.threshold)
    t_all = time.perf_counter() - t
    scaled = t_all * (args.rows / n) ** 2
    sub_dup = semdedup_all(sub, args.threshold, semdedup.default_clusters(n), args.sample, args.iterations, args.seed, args.threads)
    sub_root = components(sub_dup)
    kept_exact = sum(1 for i, j in exact if sub_root[i] == sub_root[j])
    print(f"exact all-pairs on {n} rows: {t_all:.1f}s, {len(exact)} pairs; scaled to {args.rows} rows: {scaled:.0f}s")
    print(f"  SemDeDup on the same {n} rows finds {kept_exact}/{len(exact)} of the exact pairs")
    print(f"  ratio SemDeDup / scaled all-pairs at {args.rows} rows: {t_sem / scaled:.4f} ({scaled / t_sem:.0f}x faster)")
    del x, sub

    per_core, per_wall = phash_rate(args.images, args.seed)
    print(f"phash: {per_core:.0f} images per CPU-second, one thread (256x256 JPEG bytes in, decode included); "
          f"{per_wall:.0f} images/s of wall time in this run")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"peak RSS {rss:.2f} GB (target < ~3 GB); {os.cpu_count()} CPUs seen, {args.threads} threads used")


if __name__ == "__main__":
    main()
