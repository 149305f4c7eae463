"""Shard commits and table opening at 100,000 shards (issue 21, item 2).

    .venv/bin/python benchmarks/manifest.py [--small 1000] [--large 100000] [--commits 50]

For N in (small, large): a table with N - 1 shards committed by ``TableWriter.record`` (each
with download-sized stats, about 1 KB of manifest JSON a shard, as a LAION download records),
then the time of the next ``--commits`` commits (median). Prints:
  * commit ratio large/small (target <= 1.5: a commit costs the same at any shard count);
  * what one commit cost before the journal (the whole ``_manifest.json`` rewritten), at N, for scale;
  * the time to open the large table with ``open_table`` once compacted (``finalize``), and
    ``Manifest.load`` of the uncompacted table (the journal a crash leaves, read back by a rerun).
Only ``record``'s metadata is written: no Parquet shard files (they do not enter a commit's cost).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

from bench_tables import build_table, scratch
from lmeye.tables import Manifest, ShardInfo, TableWriter, open_table
from schemas.pairs import PAIRS

ERRORS = {f"failed to download: HTTP Error {code}: reason {code}": 3 for code in range(400, 420)}


def shard_info(i: int) -> ShardInfo:
    """A download shard's record as the stage writes it (sizes like a real LAION shard's)."""
    return ShardInfo(
        name=f"{i:06d}.parquet", rows=10_000, bytes=350_000_000 + i, sha256=f"{i:064x}",
        inputs=[f"part-{i // 100:05d}.parquet"], input_fingerprint=f"{i:016x}",
        stats={"duration": 812.5, "node": f"{i:056x}",
               "by_status": {"success": 8_600, "failed_to_download": 1_200, "failed_to_resize": 200},
               "errors": ERRORS},
        version=f"mtime:{1.7e9 + i}",
    )


def _record(writer: TableWriter, i: int) -> str:
    info = shard_info(i)
    writer.record(info)
    return info.name


def commit_times(root: str, n: int, commits: int) -> tuple[float, float, TableWriter]:
    """(median seconds of a commit at shard n, seconds of one whole-manifest save at n, writer)."""
    t0 = time.perf_counter()
    writer, _ = build_table(root, PAIRS, {"bench": n}, n - 1, _record, finalize=False)
    print(f"  set-up: {n - 1} commits in {time.perf_counter() - t0:.1f} s", flush=True)
    times = []
    for i in range(n - 1, n - 1 + commits):
        t = time.perf_counter()
        writer.record(shard_info(i))
        times.append(time.perf_counter() - t)
    Path(root + "/old-style").mkdir()
    t = time.perf_counter()
    writer.manifest.save(root + "/old-style")  # the pre-journal commit: the whole manifest, every shard
    whole = time.perf_counter() - t
    shutil.rmtree(root + "/old-style")
    return statistics.median(times), whole, writer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", type=int, default=1_000)
    ap.add_argument("--large", type=int, default=100_000)
    ap.add_argument("--commits", type=int, default=50)
    args = ap.parse_args()
    with scratch("lmeye-manifest-bench-") as tmp:
        results = {}
        for n in (args.small, args.large):
            print(f"N = {n}:", flush=True)
            root = f"{tmp}/t{n}"
            commit, whole, writer = commit_times(root, n, args.commits)
            results[n] = (commit, whole)
            print(f"  commit at shard {n}: {commit * 1e3:.3f} ms (median of {args.commits}); "
                  f"one whole-manifest save (the old commit): {whole * 1e3:.1f} ms", flush=True)
        t = time.perf_counter()
        crashed = Manifest.load(root)  # the large table, uncompacted: its journal holds every shard
        load_journal = time.perf_counter() - t
        assert len(crashed.shards) == args.large - 1 + args.commits
        names = sorted(crashed.shards)
        t, c = time.perf_counter(), time.process_time()
        writer.finalize(names, stats={})
        compaction, compaction_cpu = time.perf_counter() - t, time.process_time() - c
        t, c = time.perf_counter(), time.process_time()
        reader = open_table(root, PAIRS)
        opened, opened_cpu = time.perf_counter() - t, time.process_time() - c
        assert len(reader.shard_names) == len(names)
        small, large = results[args.small][0], results[args.large][0]
        print(f"commit ratio (shard {args.large} / shard {args.small}): {large / small:.2f} (target <= 1.5)")
        print(f"old whole-manifest commit at shard {args.large} / journal commit: "
              f"{results[args.large][1] / large:.0f}x")
        size = Path(root, "_manifest.json").stat().st_size
        print(f"open_table of a {len(names)}-shard table (compacted, {size / 1e6:.0f} MB manifest): {opened:.2f} s "
              f"({opened_cpu:.2f} s CPU); Manifest.load of it uncompacted (journal): {load_journal:.2f} s; "
              f"finalize's compaction: {compaction:.2f} s ({compaction_cpu:.2f} s CPU)")


if __name__ == "__main__":
    main()
