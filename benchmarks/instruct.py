"""Benchmark of the instruct stage: synthetic caption rows through `pipelines.instruct.run`.

    .venv/bin/python benchmarks/instruct.py                      # 1M and 4M rows
    .venv/bin/python benchmarks/instruct.py --rows 100000 400000 # quicker

For every size it writes a synthetic `pairs` table (uid, url, caption, status; no image bytes)
and a `features` table (uid, status, a 1-wide embedding) covering 99% of the images, then runs the stage in a fresh
child process and reads that process's peak RSS (``ru_maxrss``), so each size is measured alone.
A child that only imports the stage gives the baseline RSS. It prints rows/s and peak memory
per size and the peak-memory ratio of the largest size to the smallest: the stage streams, so
the ratio stays near 1 (the target is <= 1.25 for 4M vs 1M rows).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

SHAPES = ["dog", "cat", "bicycle", "train", "pizza", "clock", "giraffe", "boat", "kite", "horse", "bench", "umbrella"]
COLOURS = ["red", "black", "white", "brown", "green", "blue", "yellow", "grey"]
PLACES = ["on a street", "in a field", "next to a building", "on a table", "near the water", "in a kitchen",
          "under a tree", "at the beach", "in a living room", "on a snowy hill"]
VERBS = ["standing", "sitting", "parked", "lying", "waiting", "resting"]
ROWS_PER_SHARD = 200_000


def make_tables(root: str, rows: int, seed: int = 0) -> None:
    """pairs (rows, 0.5% failed downloads) and features (99% of the successful images)."""
    import numpy as np
    import pyarrow as pa

    from lmeye.tables import TableWriter
    from lmeye.uid import uid_for
    from schemas.features import FEATURES, features_schema
    from schemas.pairs import PAIRS

    feat_schema = features_schema(1, "float16")  # a 1-wide embedding: the stage reads uid and status only
    rng = np.random.default_rng(seed)
    pairs = TableWriter(f"{root}/pairs", PAIRS, config={"bench": rows})
    feats = TableWriter(f"{root}/features", FEATURES, config={"bench": rows})
    names = []
    for k, start in enumerate(range(0, rows, ROWS_PER_SHARD)):
        n = min(ROWS_PER_SHARD, rows - start)
        urls = [f"https://images.example.com/{i // 1000:05d}/{i:09d}.jpg" for i in range(start, start + n)]
        uids = [uid_for(u) for u in urls]
        c, s, v, p, c2, s2 = (rng.integers(0, len(x), n) for x in (COLOURS, SHAPES, VERBS, PLACES, COLOURS, SHAPES))
        captions = [f"A {COLOURS[a]} {SHAPES[b]} {VERBS[d]} {PLACES[e]} beside a {COLOURS[f]} {SHAPES[g]}."
                    for a, b, d, e, f, g in zip(c, s, v, p, c2, s2)]
        ok = rng.random(n) >= 0.005
        status = np.where(ok, "success", "failed_to_download")
        table = pa.table({
            "uid": uids, "url": urls, "caption": captions, "status": status,
            **{f.name: pa.nulls(n, f.type) for f in PAIRS.schema if f.name not in ("uid", "url", "caption", "status")},
        }, schema=PAIRS.schema)
        name = f"{k:05d}.parquet"
        pairs.write(name, table)
        has = ok & (rng.random(n) < 0.99)
        k_has = int(has.sum())
        feats.write(name, pa.table({"uid": pa.array(uids).filter(pa.array(has)), "status": pa.array(["success"] * k_has),
                                    "error_message": pa.nulls(k_has, pa.string()),
                                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(np.ones(k_has, np.float16)), 1)},
                                   schema=feat_schema))
        names.append(name)
    pairs.finalize(names, stats={})
    feats.finalize(names, stats={})


def child(root: str, baseline: bool) -> None:
    from lmeye.config import load_config
    from pipelines.instruct import run

    out: dict = {}
    if not baseline:
        cfg = load_config(None, {"data.root": root, "instruct.sources": [{"kind": "captions"}],
                                 "instruct.val_fraction": 0.01})
        t0 = time.perf_counter()
        summary = run(cfg)
        out = {"seconds": time.perf_counter() - t0, "rows_out": summary.rows,
               "records": sum(summary.counts.get(k, 0) for k in ("train", "validation")),
               "partitions": _partitions(cfg.instruct.output)}
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print("RESULT " + json.dumps(out), flush=True)


def _partitions(path: str) -> int:
    from lmeye.tables import Manifest

    return Manifest.load(path).stats["partitions"]


def _run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), *args], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {' '.join(args)} failed with {proc.returncode}")
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 4_000_000])
    ap.add_argument("--workdir", default=None, help="where the tables go (default: a temporary folder, removed)")
    ap.add_argument("--child", metavar="ROOT", help=argparse.SUPPRESS)
    ap.add_argument("--baseline", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.baseline)

    work = args.workdir or tempfile.mkdtemp(prefix="lingcloud-bench-instruct-")
    try:
        base = _run_child(["--child", work, "--baseline"])
        print(f"baseline (imports only): peak RSS {base['maxrss_mib']:.0f} MiB")
        print(f"{'rows':>10} {'partitions':>10} {'seconds':>8} {'rows/s':>9} {'peak RSS MiB':>13}")
        results = []
        for rows in sorted(args.rows):
            root = os.path.join(work, f"n{rows}")
            t0 = time.perf_counter()
            make_tables(root, rows)
            gen = time.perf_counter() - t0
            r = _run_child(["--child", root])
            r["rows"] = rows
            results.append(r)
            print(f"{rows:>10} {r['partitions']:>10} {r['seconds']:>8.1f} {rows / r['seconds']:>9.0f} "
                  f"{r['maxrss_mib']:>13.0f}   (out {r['rows_out']} rows; inputs generated in {gen:.0f}s)", flush=True)
            shutil.rmtree(root, ignore_errors=True)
        if len(results) > 1:
            lo, hi = results[0], results[-1]
            ratio = hi["maxrss_mib"] / lo["maxrss_mib"]
            verdict = "ok" if ratio <= 1.25 else "OVER the 1.25 target"
            print(f"peak memory {hi['rows']:,} vs {lo['rows']:,} rows: {ratio:.3f}x ({verdict}); "
                  f"above baseline: {(hi['maxrss_mib'] - base['maxrss_mib']) / max(lo['maxrss_mib'] - base['maxrss_mib'], 1):.3f}x")
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
