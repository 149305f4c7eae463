"""A no-op rerun reads metadata only (issue 21, item 3).

    .venv/bin/python benchmarks/rerun.py [--shards 100] [--shard-mb 0.5] [--factor 10]

Two finished tables with the same shard count, one with ``--factor`` times the bytes of the
other. A no-op rerun is what every stage does first on resume: open its output with
``TableWriter`` (same config, same inputs) and ask ``is_done`` of every shard. Prints the time
of that on both tables and their ratio (target <= 1.5: the rerun does not read the bytes), and,
for scale, the same ratio for reading every shard's sha256 (what ``is_done`` did before, and
what ``lmeye verify`` does on purpose). Times are medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import pyarrow as pa

from bench_tables import build_table, scratch
from lmeye.tables import TableWriter, file_sha256, shard_file
from schemas.pairs import PAIRS

CONFIG = {"bench": "rerun"}


def build(path: str, shards: int, shard_bytes: int) -> list[str]:
    """A finished pairs-like table: each shard one incompressible binary column of ``shard_bytes``."""
    blob = os.urandom(shard_bytes)

    def write(writer: TableWriter, i: int) -> str:
        name = f"{i:05d}.parquet"
        table = pa.table({"uid": [f"{i}"], "url": [f"http://h/{i}"], "image": [blob]})
        writer.write(name, table, input_fingerprint=f"in{i}", compression="none")
        return name

    return build_table(path, PAIRS, CONFIG, shards, write)[1]


def noop_rerun(path: str, names: list[str]) -> float:
    t = time.perf_counter()
    writer = TableWriter(path, PAIRS, config=CONFIG)
    pending = [n for i, n in enumerate(names) if not writer.is_done(n, f"in{i}")]
    elapsed = time.perf_counter() - t
    assert not pending, pending
    return elapsed


def hash_all(path: str, names: list[str]) -> float:
    writer = TableWriter(path, PAIRS, config=CONFIG)
    t = time.perf_counter()
    for name in names:
        file_sha256(writer.fs, f"{writer.root}/{shard_file(name)}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=100)
    ap.add_argument("--shard-mb", type=float, default=0.5)
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    with scratch("lmeye-rerun-bench-") as tmp:
        small_bytes = int(args.shard_mb * 2**20)
        tables = {}
        for label, size in (("1x", small_bytes), (f"{args.factor}x", small_bytes * args.factor)):
            tables[label] = (f"{tmp}/{label}", build(f"{tmp}/{label}", args.shards, size))
            print(f"{label}: {args.shards} shards of {size / 2**20:.1f} MiB", flush=True)
        rerun = {k: statistics.median(noop_rerun(p, n) for _ in range(args.repeats)) for k, (p, n) in tables.items()}
        hashed = {k: statistics.median(hash_all(p, n) for _ in range(args.repeats)) for k, (p, n) in tables.items()}
        small, large = rerun["1x"], rerun[f"{args.factor}x"]
        print(f"no-op rerun: {small * 1e3:.1f} ms (1x) vs {large * 1e3:.1f} ms ({args.factor}x bytes): "
              f"ratio {large / small:.2f} (target <= 1.5)")
        print(f"for scale, hashing every shard (the old is_done; lmeye verify): {hashed['1x'] * 1e3:.0f} ms vs "
              f"{hashed[f'{args.factor}x'] * 1e3:.0f} ms: ratio {hashed[f'{args.factor}x'] / hashed['1x']:.2f}")


if __name__ == "__main__":
    main()
