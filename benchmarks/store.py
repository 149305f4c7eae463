"""Feature-store random reads: 1,000 random uids from a 200,000-row `features` table (512-d float16).

    .venv/bin/python benchmarks/store.py [--rows 200000] [--dim 512] [--lookups 1000] [--repeats 5]

Compares, in one process on the same table and the same uids:
  * baseline: a pyarrow filter over the Parquet table (``uid in [...]``), what a reader without
    the store would do;
  * ``FeatureStore.get`` (serving copy: sorted 128-bit uid index as two uint64 arrays + memory-mapped columns);
  * Lance ``take`` of the same rows by position, when ``pylance`` is installed (``pip install pylance``).
Targets: get >= 20x faster than the filter; within 2x of Lance. Times are medians over
``--repeats`` fresh uid samples (first call reported too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmeye.store import FeatureStore  # noqa: E402
from lmeye.tables import TableWriter  # noqa: E402
from lmeye.uid import uid_for  # noqa: E402
from schemas.features import FEATURES, SUCCESS, features_schema  # noqa: E402


def build_table(path: str, rows: int, dim: int, shards: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    uids = [uid_for(f"https://example.com/img/{i}.jpg") for i in range(rows)]
    schema = features_schema(dim, "float16", None, {"model": "bench", "dtype": "float16", "embed_dim": str(dim)})
    writer = TableWriter(path, FEATURES, config={"bench": seed, "rows": rows})
    per = -(-rows // shards)
    names = []
    for k, start in enumerate(range(0, rows, per)):
        n = min(per, rows - start)
        vecs = rng.standard_normal((n, dim)).astype(np.float16)
        table = pa.table(
            {
                "uid": pa.array(uids[start : start + n]),
                "status": pa.array([SUCCESS] * n),
                "error_message": pa.nulls(n, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim),
            },
            schema=schema,
        )
        name = f"{k:05d}.parquet"
        writer.write(name, table)
        names.append(name)
    writer.finalize(names, stats={}, metadata={"model": "bench"})
    return uids


def timed(fn, repeats: int, samples: list[list[str]]) -> tuple[float, float, object]:
    times, out = [], None
    for i in range(repeats):
        t = time.perf_counter()
        out = fn(samples[i])
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dir", help="work directory (default: a temporary one)")
    args = ap.parse_args()
    work = args.dir or tempfile.mkdtemp(prefix="lingcloud-bench-store-")
    try:
        return run(args, work)
    finally:
        if not args.dir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)


def run(args, work: str) -> int:
    path = os.path.join(work, "features")
    t = time.perf_counter()
    uids = build_table(path, args.rows, args.dim, args.shards)
    print(f"table: {args.rows} rows x {args.dim} float16 in {args.shards} shards ({time.perf_counter() - t:.1f}s) at {path}")

    t = time.perf_counter()
    store = FeatureStore.open(path)
    print(f"serving copy built on first open: {time.perf_counter() - t:.2f}s ({store.serving_dir})")
    t = time.perf_counter()
    store = FeatureStore.open(path)
    print(f"reopen (copy in step with the manifest): {(time.perf_counter() - t) * 1e3:.1f} ms")

    rng = np.random.default_rng(1)
    samples = [[uids[i] for i in rng.choice(args.rows, args.lookups, replace=False)] for _ in range(args.repeats)]

    def baseline(sample):
        return pq.read_table(path, columns=["uid", "embedding"], filters=pc.field("uid").isin(sample))

    def ours(sample):
        return store.get(sample)["embedding"]

    b_first, b_med, b_out = timed(baseline, args.repeats, samples)
    o_first, o_med, o_out = timed(ours, args.repeats, samples)
    # same vectors either way
    got = dict(zip(b_out["uid"].to_pylist(), b_out["embedding"].to_pylist()))
    assert all(np.array_equal(np.asarray(got[u], np.float16), o_out[i]) for i, u in enumerate(samples[-1]))
    print(f"pyarrow filter over the Parquet table: median {b_med * 1e3:8.1f} ms (first {b_first * 1e3:.1f} ms)")
    print(f"FeatureStore.get:                      median {o_med * 1e3:8.1f} ms (first {o_first * 1e3:.1f} ms)")
    print(f"  speed-up vs filter: {b_med / o_med:.0f}x (target >= 20x)")

    try:
        import lance
    except ImportError:
        print("Lance: pylance not installed; skipped (pip install pylance)")
        return 0
    table = pa.concat_tables(pq.read_table(os.path.join(path, n), columns=["uid", "embedding"]) for n in sorted(
        f for f in os.listdir(path) if f.endswith(".parquet")))
    lpath = os.path.join(work, "features.lance")
    lance.write_dataset(table, lpath, mode="overwrite")
    ds = lance.dataset(lpath)
    row_of = {u: i for i, u in enumerate(table["uid"].to_pylist())}  # Lance gets positions for free
    pos_samples = [[row_of[u] for u in s] for s in samples]

    def lance_take(positions):
        return ds.take(positions, columns=["embedding"])

    l_first, l_med, _ = timed(lance_take, args.repeats, pos_samples)
    print(f"Lance take (positions given):          median {l_med * 1e3:8.1f} ms (first {l_first * 1e3:.1f} ms)")
    print(f"  get / Lance take: {o_med / l_med:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
