"""Peak driver memory of the download stage's planning step (no fetching): 1M vs 8M URLs.

    .venv/bin/python benchmarks/download_plan.py [--small 1000000] [--large 8000000]

Writes two synthetic URL lists (parquet; LAION-like URLs and captions, 2% duplicate URLs, a few
non-http ones), then plans each in a fresh process (`pipelines.download.plan_inputs`: read,
uid, dedupe, shard layout, normalised copies) and reports that process's peak RSS. The planner
streams and spills by uid hash, so its memory must not grow with the list.
Prints both peaks and large/small. Target: <= 1.25.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BATCH = 500_000


def write_list(path: Path, rows: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(rows)
    with pq.ParquetWriter(path, pa.schema([("url", pa.string()), ("caption", pa.string())])) as w:
        for start in range(0, rows, BATCH):
            ids = np.arange(start, min(rows, start + BATCH))
            dup = rng.random(len(ids)) < 0.02
            ids = np.where(dup, rng.integers(0, max(start, 1), len(ids)), ids)  # earlier URLs again
            urls = [f"https://img{i % 9973}.cdn.example.com/photos/{i * 2654435761 % 10**12:012d}/{i}.jpg"
                    if i % 50_000 else f"ftp://files.example.com/{i}.jpg" for i in ids.tolist()]
            caps = [f"a photo of item {i} on a table, high resolution, studio light #{i % 997}" for i in ids.tolist()]
            w.write_table(pa.table({"url": urls, "caption": caps}))


CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from lmeye.config import load_config
from pipelines.download import plan_inputs
cfg = load_config(None, {{"download.input": {src!r}, "download.output": {out!r}}}).download
t0 = time.time()
plan = plan_inputs({src!r}, {out!r} + "/_staging", cfg)
print(json.dumps({{"seconds": time.time() - t0, "rows": plan.counts["rows"], "shards": len(plan.all_shards),
                  "duplicate_url": plan.counts["duplicate_url"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def plan_in_child(src: Path, out: Path) -> dict:
    code = CHILD.format(root=str(ROOT), src=str(src), out=str(out))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--large", type=int, default=8_000_000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-download-plan-"))
    try:
        results = {}
        for rows in (args.small, args.large):
            t0 = time.time()
            src = work / f"urls-{rows}.parquet"
            write_list(src, rows)
            print(f"wrote {rows} URLs ({src.stat().st_size / 2**20:.0f} MiB) in {time.time() - t0:.0f}s", flush=True)
            results[rows] = r = plan_in_child(src, work / f"pairs-{rows}")
            print(f"planned {rows} URLs: {r['rows']} rows, {r['duplicate_url']} duplicates, {r['shards']} shards, "
                  f"{r['seconds']:.1f}s, peak RSS {r['peak_rss_mb']:.0f} MiB", flush=True)
            shutil.rmtree(work / f"pairs-{rows}", ignore_errors=True)
            src.unlink()
        ratio = results[args.large]["peak_rss_mb"] / results[args.small]["peak_rss_mb"]
        print(f"peak driver RSS {args.large} / {args.small} URLs: {ratio:.2f} (target <= 1.25)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
