"""Instruct's memory against the size of the pairs table it joins with (issue 21, item 4).

    .venv/bin/python benchmarks/instruct_memory.py                          # 1M and 10M pairs rows
    .venv/bin/python benchmarks/instruct_memory.py --pairs 100000 1000000   # quicker

For every size it writes a synthetic ``pairs`` table (uid, url, status; no image bytes) and runs
the instruct stage in a fresh child process over one VQA file of ``--records`` records that name
their images by file name (``image_key: basename``, the default): every record must be looked up
in the pairs table. The records are the same for every size, so only the pairs table grows.

The stage's driver holds metadata only; the join runs in its spill task, a Ray worker of the
child's embedded Ray (``pipelines/instruct/work.py``). So each run's figure is the peak RSS of
the busiest process of the child's tree: the largest ``VmHWM`` (a process's lifetime peak) of
the driver, its Ray workers and Ray's own processes, read while they are still up; the driver's
own peak (its ``VmHWM`` too: ``ru_maxrss`` survives exec, so a child started by this parent
right after it built a large pairs table would report at least the parent's peak) is printed
beside it. The ratio is the largest size's against the smallest's (target
<= 1.25: the lookup is a partitioned join, ``pipelines/instruct/join.py``, not a dict with one
entry per pairs row). ``--old-index`` also measures, at the smallest size only, a
child that builds that dict (what ``ImageIndex`` did), for scale.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa

from bench_tables import build_table, scratch

ROWS_PER_SHARD = 500_000


def url(i: int) -> str:
    return f"https://images.example.com/{i // 1000:05d}/{i:09d}.jpg"


def make_pairs(path: str, rows: int) -> None:
    """``rows`` pairs rows, 0.5% of them failed downloads."""
    from lmeye.tables import TableWriter
    from lmeye.uid import uid_for
    from schemas.pairs import PAIRS

    rng = np.random.default_rng(0)

    def shard(writer: TableWriter, k: int) -> str:
        start = k * ROWS_PER_SHARD
        n = min(ROWS_PER_SHARD, rows - start)
        urls = [url(i) for i in range(start, start + n)]
        status = np.where(rng.random(n) >= 0.005, "success", "failed_to_download")
        table = pa.table({"uid": [uid_for(u) for u in urls], "url": urls, "status": status,
                          **{f.name: pa.nulls(n, f.type) for f in PAIRS.schema if f.name not in ("uid", "url", "status")}},
                         schema=PAIRS.schema)
        name = f"{k:05d}.parquet"
        writer.write(name, table.select(PAIRS.columns))
        return name

    build_table(path, PAIRS, {"bench": "instruct_memory", "rows": rows}, -(-rows // ROWS_PER_SHARD), shard)


def make_records(path: str, records: int, among: int) -> None:
    """VQA records naming images by file name, drawn from the first ``among`` pairs rows (plus a
    few names that are in no table)."""
    rng = np.random.default_rng(1)
    with open(path, "w") as f:
        f.write("[")
        for k, i in enumerate(rng.integers(0, among, records).tolist()):
            name = f"{i:09d}.jpg" if k % 100 else f"nowhere-{k}.jpg"
            f.write(("," if k else "") + json.dumps({"image": name, "question": f"What is in image {i}?", "answer": "a shape"}))
        f.write("]")


def peak_rss_mib(pid: int) -> float:
    """A live process's lifetime peak RSS (``VmHWM``), MiB; 0 when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def busiest_process_mib() -> tuple[float, str]:
    """The largest peak RSS in this process's tree (the driver, Ray's processes and workers)."""
    import psutil

    procs = [psutil.Process(), *psutil.Process().children(recursive=True)]
    peaks = [(peak_rss_mib(p.pid), " ".join(p.cmdline()[:1]) or p.name()) for p in procs if p.is_running()]
    return max(peaks)


def child(root: str, mode: str) -> None:
    out: dict = {}
    if mode == "stage":
        from lmeye.config import load_config
        from pipelines.instruct import run

        cfg = load_config(None, {"data.root": root, "instruct.require_features": False, "ray.num_cpus": 2,
                                 "instruct.sources": [{"kind": "vqa", "path": f"{root}/records.json"}]})
        t0 = time.perf_counter()
        summary = run(cfg)
        out = {"seconds": time.perf_counter() - t0, "rows_out": summary.rows,
               "not_in_pairs": summary.failures.get("vqa: rejected: image_not_in_pairs", 0)}
        out["busiest_mib"], out["busiest"] = busiest_process_mib()
    elif mode == "old-index":  # ImageIndex's dict: join key -> uid, one entry per pairs row
        from lmeye.tables import TableReader
        from pipelines.instruct.images import key_of
        from schemas.pairs import PAIRS

        index: dict[str, str] = {}
        for batch in TableReader(f"{root}/pairs", PAIRS).iter_batches(columns=["uid", "url", "status"]):
            d = batch.to_pydict()
            for uid, u, s in zip(d["uid"], d["url"], d["status"]):
                index[key_of(u, "basename")] = uid if s == "success" else "?failed"
        out = {"entries": len(index)}
    else:  # baseline: the imports only
        import pipelines.instruct  # noqa: F401
    # VmHWM, not ru_maxrss: ru_maxrss survives exec, so a child started by a parent that had just
    # built a large pairs table would report at least the parent's peak
    out["driver_mib"] = peak_rss_mib(os.getpid())
    out["maxrss_mib"] = max(out["driver_mib"], out.get("busiest_mib", 0.0))
    print("RESULT " + json.dumps(out), flush=True)


def run_child(root: str, mode: str) -> dict:
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", root, "--mode", mode],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"child {mode} {root} failed with {proc.returncode}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--old-index", action="store_true")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stage", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.mode)

    sizes = sorted(args.pairs)
    with scratch("lmeye-instruct-memory-") as work:
        base = run_child(work, "baseline")
        print(f"baseline (imports only): peak RSS {base['maxrss_mib']:.0f} MiB; {args.records:,} VQA records, "
              f"image_key basename", flush=True)
        results = []
        for rows in sizes:
            root = f"{work}/n{rows}"
            os.makedirs(root)
            t0 = time.perf_counter()
            make_pairs(f"{root}/pairs", rows)
            make_records(f"{root}/records.json", args.records, sizes[0])
            gen = time.perf_counter() - t0
            r = run_child(root, "stage")
            results.append((rows, r))
            print(f"pairs {rows:>11,}: peak RSS {r['maxrss_mib']:7.0f} MiB ({r['busiest']}; driver {r['driver_mib']:.0f} MiB), "
                  f"{r['seconds']:6.1f} s, "
                  f"{r['rows_out']:,} rows out ({r['not_in_pairs']:,} records not in pairs); inputs made in {gen:.0f} s",
                  flush=True)
            if args.old_index and rows == sizes[0]:
                old = run_child(root, "old-index")
                print(f"  for scale, the old per-row dict alone at {rows:,} rows: peak RSS {old['maxrss_mib']:.0f} MiB "
                      f"({old['entries']:,} entries)", flush=True)
            shutil.rmtree(root, ignore_errors=True)
        if len(results) > 1:
            (lo_rows, lo), (hi_rows, hi) = results[0], results[-1]
            ratio = hi["maxrss_mib"] / lo["maxrss_mib"]
            print(f"peak RSS {hi_rows:,} vs {lo_rows:,} pairs rows: {ratio:.3f}x "
                  f"({'ok' if ratio <= 1.25 else 'OVER'} the 1.25 target); above the baseline: "
                  f"{(hi['maxrss_mib'] - base['maxrss_mib']) / max(lo['maxrss_mib'] - base['maxrss_mib'], 1):.3f}x")


if __name__ == "__main__":
    main()
