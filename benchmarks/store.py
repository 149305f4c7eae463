"""Feature-store random reads, serving-copy builds and incremental rebuilds, up to 10M rows.

    .venv/bin/python benchmarks/store.py [--rows 200000] [--dim 512] [--lookups 1000] [--repeats 5]
    .venv/bin/python benchmarks/store.py --rows 10000000 --dim 768 --dir /tmp/x --free-parquet   # ~35 GB of disk at peak

Measures, in one run on one synthetic `features` table (float16 embeddings, random uids, written
as extraction writes its shards: zstd, dictionary encoding):
  * the serving copy's full build on first open, in a fresh child process: seconds and peak RSS
    (target <= 2 GB while building), and the uid index alone rebuilt from the segments, sorted
    whole in memory against sorted in runs of ``INDEX_SORT_ROWS`` and merged (the store's way);
  * adding ``--add-rows`` rows (default: a tenth) as new shards and reopening: the rebuild makes
    only the new shards' segments and a new uid index; its time against the full build (target <= 0.2);
  * random ``FeatureStore.get`` of ``--lookups`` uids against, on the same rows and uid samples,
    a pyarrow filter over the Parquet table (``uid in [...]``, up to 1M rows: it reads the whole
    column; target get >= 20x faster) and Lance ``take`` by position (pylance, the ``bench`` extra;
    target get <= 1x Lance; Lance's own lookup by uid, with a BTREE index on a uid column,
    is printed beside them for context), medians over ``--repeats`` samples, each state on rows of its own:
    Both copies' vectors are first read through, interleaved (a VM host may cache what its guest
    read or wrote: the copy written last would read from that cache, the other from the disk).
      - cold: both copies' files evicted from the page cache before each call, the store freshly
        opened (on a serving node, a process that opened the table). Its uid index is read into
        the process at open when under ``--index-memory`` (default: the store's, 1 GiB): the open's
        time from a cold cache and the bytes it holds are printed;
      - cold, index mapped: the same with ``index_memory=0``, the path of a table over the budget:
        each lookup reads its index block through the page cache;
      - cold, index mapped, index cached: that path with the index file read into the page cache;
      - warm: after an untimed call on the same uids.
``--free-parquet`` deletes the Parquet shards once the store is built and before the Lance copy is
written (from the store's segments), so the run holds two copies of the vectors at a time, not three.
With ``--dir``, a finished base table of the same size found there is reused (``--generate-only``
writes it and stops); ``--reads-only`` reruns the read comparison on what a run left in ``--dir``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import multiprocessing as mp
import os
import resource
import shutil
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

from lmeye.store import INDEX_MEMORY, INDEX_SORT_ROWS, FeatureStore  # noqa: E402
from lmeye.tables import Manifest, TableWriter, shard_file  # noqa: E402
from schemas.features import FEATURES, SUCCESS, features_schema  # noqa: E402

GB = 1 << 30


def random_uids(rng: np.random.Generator, n: int) -> pa.Array:
    """n random 32-hex-digit uids as an Arrow string array, with no Python object per row."""
    text = rng.bytes(16 * n).hex().encode()
    offsets = np.arange(0, 32 * n + 1, 32, dtype=np.int32)
    return pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text))


def write_shards(writer: TableWriter, schema: pa.Schema, first: int, rows: int, per: int, dim: int,
                 rng: np.random.Generator, block: np.ndarray) -> list[str]:
    """Shards of ``per`` rows from global row ``first``, written as extraction writes them
    (``TableWriter`` defaults: zstd, dictionary encoding); returns their names."""
    names = []
    for start in range(first, first + rows, per):
        n = min(per, first + rows - start)
        vecs = np.roll(block[:n], start // per, axis=1)  # one random block, shifted per shard: distinct rows, fast
        table = pa.table(
            {
                "uid": random_uids(rng, n),
                "status": pa.array(np.full(n, SUCCESS, dtype=object), pa.string()),
                "error_message": pa.nulls(n, pa.string()),
                "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)), dim),
            },
            schema=schema,
        )
        name = f"{start // per:05d}.parquet"
        writer.write(name, table)
        names.append(name)
    return names


def peak_rss() -> int:
    """This process's own peak RSS (VmHWM): ru_maxrss would carry the parent's over fork and exec."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open_and_report(path: str, sort_rows: int, queue) -> None:
    import lmeye.store

    lmeye.store.INDEX_SORT_ROWS = sort_rows
    t = time.perf_counter()
    store = FeatureStore.open(path, index_memory=0)  # the build's memory, not the index's once built
    queue.put((time.perf_counter() - t, peak_rss(), store.info()["rows_served"]))


def open_in_child(path: str, sort_rows: int = INDEX_SORT_ROWS) -> tuple[float, int, int]:
    """(seconds, peak RSS bytes, rows) of ``FeatureStore.open`` in a fresh process: the build's own
    memory; ``sort_rows``: ``lmeye.store.INDEX_SORT_ROWS`` there (rows the index build sorts at a time)."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_open_and_report, args=(path, sort_rows, queue))
    proc.start()
    out = queue.get()
    proc.join()
    return out


def drop_cache(files: list[str]) -> None:
    """Evict ``files`` from the page cache (pages not mapped by any process): a cold read. Written
    back first: the kernel keeps dirty pages, such as those of a copy just built."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def read_through_evenly(first: list[str], second: list[str], chunk: int = 1 << 24) -> None:
    """Read two copies' files through, alternating by bytes read, and evict each chunk from the page
    cache. On a VM whose host caches the guest's disk, a copy just written (Lance's, here) reads from
    that cache while an older one reads from the disk: ``cold`` would compare the two caches."""
    def chunks(files):
        for file in files:
            fd = os.open(file, os.O_RDONLY)
            try:
                for off in range(0, os.path.getsize(file), chunk):
                    yield fd, off
            finally:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)

    live, done = [chunks(first), chunks(second)], [0, 0]
    while live:
        k = min(range(len(live)), key=done.__getitem__)
        step = next(live[k], None)
        if step is None:
            live.pop(k), done.pop(k)
            continue
        done[k] += len(os.pread(step[0], chunk, step[1]))
        os.posix_fadvise(step[0], step[1], chunk, os.POSIX_FADV_DONTNEED)


def store_files(store: FeatureStore) -> list[str]:
    """What a ``get`` of embeddings reads: the version's uid index and the segments' vectors."""
    index = [os.path.join(store.serving_dir, f) for f in os.listdir(store.serving_dir) if f.endswith(".npy")]
    return index + [f for f, _ in store.segment_files("embedding")]


def lance_files(lpath: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(lpath) for f in fs]


def uids_at(store: FeatureStore, positions: np.ndarray) -> list[str]:
    """The uids of the store's global rows ``positions`` (the segments laid end to end), from its segments."""
    words = {c: np.concatenate([np.load(f, mmap_mode="r") for f, _ in store.segment_files(c)]) for c in ("uid_hi", "uid_lo")}
    return [f"{int(h):016x}{int(lo):016x}" for h, lo in zip(words["uid_hi"][positions], words["uid_lo"][positions])]


def table_is(path: str, names: list[str], rows: int) -> bool:
    """Whether ``path`` already holds the finished base table of this run (``--dir`` reused)."""
    m = Manifest.load(path)
    return m is not None and m.complete and sorted(m.shards) == names and m.num_rows == rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--lookups", type=int, default=1000)
    ap.add_argument("--shard-rows", type=int, default=100_000, help="rows per shard")
    ap.add_argument("--add-rows", type=int, default=None, help="rows added as new shards (default: rows / 10)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--index-memory", type=int, default=INDEX_MEMORY,
                    help="FeatureStore.open(index_memory=) of the 'cold' and 'warm' states (bytes; default 1 GiB)")
    ap.add_argument("--seed", type=int, default=3, help="of the uid samples (another one for a rerun: fresh rows)")
    ap.add_argument("--filter-baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="time the pyarrow filter too (default: up to 1M rows)")
    ap.add_argument("--free-parquet", action="store_true", help="delete the Parquet shards before writing the Lance copy")
    ap.add_argument("--dir", help="work directory (default: a temporary one, deleted at the end); a finished "
                    "base table of the same size found there is reused")
    ap.add_argument("--generate-only", action="store_true", help="write the base table into --dir and stop")
    ap.add_argument("--reads-only", action="store_true",
                    help="only the read comparison, on the store and Lance copy a previous run left in --dir")
    args = ap.parse_args()
    if (args.generate_only or args.reads_only) and not args.dir:
        ap.error("--generate-only and --reads-only need --dir")
    work = args.dir or tempfile.mkdtemp(prefix="lingcloud-bench-store-")
    os.makedirs(work, exist_ok=True)
    try:
        return run(args, work)
    finally:
        if not args.dir:
            shutil.rmtree(work, ignore_errors=True)


def run(args, work: str) -> int:
    path = os.path.join(work, "features")
    rows, dim, per = args.rows, args.dim, min(args.shard_rows, args.rows)
    add = args.rows // 10 if args.add_rows is None else args.add_rows
    rng = np.random.default_rng(0)
    schema = features_schema(dim, "float16", None, {"model": "bench", "dtype": "float16", "embed_dim": str(dim)})
    config = {"bench": 0, "rows": rows, "dim": dim, "per": per}
    names = [f"{i:05d}.parquet" for i in range((rows + per - 1) // per)]

    if not args.reads_only:
        if table_is(path, names, rows):
            print(f"table: {rows:,} rows x {dim} float16 in {len(names)} shards, reused from {path}")
        else:
            block = rng.standard_normal((per, dim)).astype(np.float16)
            t = time.perf_counter()
            writer = TableWriter(path, FEATURES, config=config, overwrite=True)
            names = write_shards(writer, schema, 0, rows, per, dim, rng, block)
            writer.finalize(names, stats={}, metadata={"model": "bench"})
            print(f"table: {rows:,} rows x {dim} float16 in {len(names)} shards ({time.perf_counter() - t:.1f}s) at {path}",
                  flush=True)
        if args.generate_only:
            return 0
        shutil.rmtree(os.path.join(path, "_serving"), ignore_errors=True)  # a reused table's copy: built afresh

        full_s, full_rss, served = open_in_child(path)
        print(f"serving copy, full build on first open: {full_s:.1f}s, peak RSS {full_rss / GB:.2f} GB (target <= 2 GB), "
              f"{served:,} rows", flush=True)

        t = time.perf_counter()
        writer = TableWriter(path, FEATURES, config=config)  # same config: the finished shards are kept
        block = np.random.default_rng(1).standard_normal((per, dim)).astype(np.float16)
        added = write_shards(writer, schema, rows, add, per, dim, np.random.default_rng(2), block)
        writer.finalize(names + added, stats={}, metadata={"model": "bench"})
        print(f"added {add:,} rows as {len(added)} new shards ({time.perf_counter() - t:.1f}s)")
        inc_s, inc_rss, served = open_in_child(path)
        store = FeatureStore.open(path)
        built = store.info()["segments_built"]
        print(f"serving copy after the addition: {inc_s:.1f}s, peak RSS {inc_rss / GB:.2f} GB, {served:,} rows, "
              f"{built} segment(s) built: {inc_s / full_s:.3f}x the full build (target <= 0.2)", flush=True)
        assert built == len(added) and served == rows + add

        t = time.perf_counter()
        FeatureStore.open(path)
        print(f"reopen (copy in step with the manifest): {(time.perf_counter() - t) * 1e3:.1f} ms")
        # the index alone, rebuilt from the segments (kept) twice: sorted whole in memory (as before
        # INDEX_SORT_ROWS), then in runs of INDEX_SORT_ROWS spilled and merged (the store's way)
        index_dir = store.serving_dir
        got = {}
        for label, sort_rows in (("sorted whole", rows + add), ("in runs", INDEX_SORT_ROWS)):
            shutil.rmtree(index_dir)
            got[label] = open_in_child(path, sort_rows)
        (w_s, w_rss, _), (r_s, r_rss, _) = got["sorted whole"], got["in runs"]
        print(f"index rebuilt alone ({rows + add:,} rows, segments kept): sorted whole {w_s:.1f}s, peak RSS "
              f"{w_rss / GB:.2f} GB; in runs of {INDEX_SORT_ROWS:,} {r_s:.1f}s, peak RSS {r_rss / GB:.2f} GB: "
              f"{r_rss / w_rss:.2f}x the memory, {r_s / w_s:.2f}x the time", flush=True)
        print(f"disk: Parquet table {du(path, skip='_serving') / GB:.2f} GB, "
              f"serving copy {du(os.path.join(path, '_serving')) / GB:.2f} GB")
    store = FeatureStore.open(path)
    served = store.num_rows

    states = ("cold", "cold, index mapped", "cold, index mapped, index cached", "warm")
    n_samples = args.repeats * len(states)  # every state its own rows: none read before (the disk may cache too)
    # and Lance's lookup by uid rows of its own too: it reads the same Lance files as its take
    if served < args.lookups * n_samples * 2:
        raise SystemExit(f"{served:,} rows served: too few for {n_samples * 2} samples of {args.lookups} distinct rows "
                         "(fewer --repeats or --lookups)")
    want = np.random.default_rng(args.seed).choice(served, args.lookups * n_samples * 2, replace=False)
    positions = [want[k * args.lookups:(k + 1) * args.lookups] for k in range(n_samples * 2)]
    samples = [uids_at(store, p) for p in positions]

    def ours(sample):
        return store.get(sample)["embedding"]

    if not args.reads_only and (args.filter_baseline if args.filter_baseline is not None else rows <= 1_000_000):
        def baseline(sample):
            return pq.read_table(path, columns=["uid", "embedding"], filters=pc.field("uid").isin(sample))

        b_t, o_t = [], []
        for sample in samples:
            t = time.perf_counter()
            b_out = baseline(sample)
            b_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            o_out = ours(sample)
            o_t.append(time.perf_counter() - t)
        got = dict(zip(b_out["uid"].to_pylist(), b_out["embedding"].to_pylist()))
        assert all(np.array_equal(np.asarray(got[u], np.float16), o_out[i]) for i, u in enumerate(samples[-1]))
        b_med, o_med = statistics.median(b_t), statistics.median(o_t)
        print(f"pyarrow filter over the Parquet table:    median {b_med * 1e3:8.1f} ms")
        print(f"FeatureStore.get of {args.lookups} uids:           median {o_med * 1e3:8.2f} ms")
        print(f"  get speed-up vs filter: {b_med / o_med:.0f}x (target >= 20x)")

    try:
        import lance
    except ImportError:
        print("Lance: pylance not installed; skipped (pip install -e '.[bench]')")
        return report_rss()
    lpath = os.path.join(work, "features.lance")
    if (args.reads_only and os.path.isdir(lpath) and lance.dataset(lpath).count_rows() == served
            and "uid" in lance.dataset(lpath).schema.names):
        ds = lance.dataset(lpath)
        print(f"Lance copy of the same {served:,} rows reused from {lpath}")
    else:
        if args.free_parquet:
            for name in Manifest.load(path).shards:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(path, shard_file(name)))
            print("Parquet shards deleted (--free-parquet); Lance is written from the store's segments")
        t = time.perf_counter()
        lance.write_dataset(segment_batches(store, dim), lpath, mode="overwrite",
                            schema=pa.schema([pa.field("uid", pa.string()), pa.field("embedding", pa.list_(pa.float16(), dim))]))
        written = time.perf_counter() - t
        t = time.perf_counter()
        lance.dataset(lpath).create_scalar_index("uid", "BTREE")
        ds = lance.dataset(lpath)
        print(f"Lance copy of the same {ds.count_rows():,} rows, in the store's row order ({written:.1f}s), and a BTREE index "
              f"on its uid column ({time.perf_counter() - t:.1f}s): {du(lpath) / GB:.2f} GB", flush=True)

    def lance_take(pos):
        return ds.take(pos.tolist(), columns=["embedding"])

    def lance_by_uid(sample):  # context: Lance's own lookup by key (result in its order, not the request's)
        out = ds.to_table(columns=["embedding"], filter=pc.field("uid").isin(sample))
        assert out.num_rows == len(sample)

    def same(o_out, l_out) -> None:  # the same vectors either way: Lance rows are the store's row numbers
        taken = l_out.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
        assert np.array_equal(taken, o_out)

    files = store_files(store) + lance_files(lpath)  # one version all along: the same files whatever the store's budget
    t = time.perf_counter()
    read_through_evenly([f for f, _ in store.segment_files("embedding")], lance_files(lpath))
    print(f"both copies' vectors read through, interleaved, then evicted ({time.perf_counter() - t:.1f}s): a VM host's "
          "cache of what its guest read or wrote now holds them in equal shares, not the copy written last", flush=True)
    index = [f for f in files if f.startswith(store.serving_dir)]
    opens = []
    for s_i, state in enumerate(states):
        # cold states: both copies' files evicted from the page cache before each call, the store
        # reopened (a store's mapped pages stay cached while mapped) with the files evicted before
        # the open and again after it (a resident index is then in the process only, as on a node
        # whose process opened the table earlier); "index cached": the mapped index file read into
        # the page cache after the eviction. Lance keeps its open dataset
        budget = 0 if "mapped" in state else args.index_memory
        ours_t, lance_t, by_uid_t = [], [], []
        for k in range(s_i * args.repeats, (s_i + 1) * args.repeats):
            if state == "warm":
                if k == s_i * args.repeats:
                    store = FeatureStore.open(path, index_memory=budget)
                ours(samples[k]), lance_take(positions[k])
            else:
                store = None
                gc.collect()
                drop_cache(files)
                t = time.perf_counter()
                store = FeatureStore.open(path, index_memory=budget)
                if state == "cold":
                    opens.append(time.perf_counter() - t)
                drop_cache(files)
                if state.endswith("index cached"):
                    for f in index:
                        with open(f, "rb") as fh:
                            while fh.read(1 << 24):
                                pass
            for side in ((0, 1) if k % 2 == 0 else (1, 0)):  # who goes first alternates: a shared disk's queue
                t = time.perf_counter()
                if side == 0:
                    o_out = ours(samples[k])
                    ours_t.append(time.perf_counter() - t)
                else:
                    l_out = lance_take(positions[k])
                    lance_t.append(time.perf_counter() - t)
            same(o_out, l_out)
            t = time.perf_counter()
            lance_by_uid(samples[n_samples + k])  # last, on rows of its own: after the two compared
            by_uid_t.append(time.perf_counter() - t)
        if state == "cold":
            print(f"cold open (files evicted), index {'in memory' if store.index_resident else 'memory-mapped'}: median "
                  f"{statistics.median(opens) * 1e3:.0f} ms, holding {store.memory_bytes / 2**20:.1f} MiB "
                  f"(--index-memory {args.index_memory:,} bytes)", flush=True)
        o_med, l_med = statistics.median(ours_t), statistics.median(lance_t)
        print(f"{state}: FeatureStore.get of {args.lookups} uids median {o_med * 1e3:.2f} ms, Lance take of the same rows "
              f"(positions given) median {l_med * 1e3:.2f} ms: get / take {o_med / l_med:.2f}x (target <= 1x); per repeat "
              + ", ".join(f"{a * 1e3:.1f}/{b * 1e3:.1f}" for a, b in zip(ours_t, lance_t)) + " ms; for context, Lance by uid "
              f"(BTREE index, filter uid in [...], rows of its own) median {statistics.median(by_uid_t) * 1e3:.2f} ms", flush=True)
    return report_rss()


def du(folder: str, skip: str = "") -> int:
    """Bytes of the files under ``folder`` (not under its subfolder ``skip``)."""
    return sum(os.path.getsize(os.path.join(d, f)) for d, sub, fs in os.walk(folder)
               for f in fs if not (skip and os.path.relpath(d, folder).split(os.sep)[0] == skip))


def segment_batches(store: FeatureStore, dim: int, chunk: int = 65536):
    """The store's rows in order, uid and embedding, read with plain reads (no mapping: the RSS stays flat)."""
    for (file, n), (hi_file, _), (lo_file, _) in zip(*(store.segment_files(c) for c in ("embedding", "uid_hi", "uid_lo"))):
        words = np.stack([np.load(hi_file), np.load(lo_file)], axis=1).astype(">u8")  # big-endian: hex digits in order
        with open(file, "rb") as f:
            np.lib.format.read_magic(f)
            np.lib.format.read_array_header_1_0(f)
            for start in range(0, n, chunk):
                m = min(chunk, n - start)
                vals = np.fromfile(f, dtype=np.float16, count=m * dim)
                text = words[start:start + m].tobytes().hex().encode()
                uid = pa.StringArray.from_buffers(m, pa.py_buffer(np.arange(0, 32 * m + 1, 32, dtype=np.int32)), pa.py_buffer(text))
                arr = pa.FixedSizeListArray.from_arrays(pa.array(vals), dim)
                yield pa.RecordBatch.from_arrays([uid, arr], names=["uid", "embedding"])


def report_rss() -> int:
    peak = peak_rss()
    print(f"benchmark process peak RSS: {peak / GB:.2f} GB (builds ran in child processes, reported above)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
