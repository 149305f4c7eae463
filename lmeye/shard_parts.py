"""Shards that workers write: a Ray Data stage's output, a shard's rows spread over many blocks.

A streaming stage (extract, predict) produces blocks whose rows belong to several output
shards (a shard column says which), in whatever order its actors finish them. The driver must
not pull those blocks in to write the shards itself (at LAION scale, patch tokens are ~5 GB a
shard). Instead:

1. ``write_parts`` runs where the pipeline's last step makes its rows (the model actors): each
   block's rows of each shard go to one *part* file under the table's staging folder, and the
   step passes on one small row per part (shard, path, rows, per-part statistics as JSON);
2. the driver reads only those rows (``PartCollector``); once a shard's parts hold all its
   rows, it starts ``assemble_shard`` as a Ray task, which concatenates the parts into the final
   shard with ``ShardWriter`` (temporary name, rename; on object stores one upload), removes them
   and returns the ``ShardInfo`` that the driver records.

Parts are scratch: a run that stops leaves them in ``_staging``, which the stage removes; a rerun
redoes the shards that were not assembled. A part's statistics are flat ``{stat: {key: count}}``
dictionaries, summed per shard.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter, defaultdict
from typing import Any, Callable, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmeye.tables import ShardInfo, ShardWriter

PART_SCHEMA = pa.schema([("shard", pa.string()), ("path", pa.string()), ("rows", pa.int64()), ("stats", pa.string())])


def write_parts(
    block: pa.Table, *, staging: str, shard_col: str, schema: pa.Schema,
    stats_of: Callable[[pa.Table], dict[str, dict[str, int]]],
) -> pa.Table:
    """On a worker: each shard's rows of ``block`` to one part file; returns their PART_SCHEMA rows.
    ``stats_of`` sees a shard's rows with every column (helper columns included) before they are
    cut down to ``schema``."""
    fs, root = fsspec.core.url_to_fs(staging)
    out = []
    for name in pc.unique(block.column(shard_col)).to_pylist():
        part = block.filter(pc.equal(block[shard_col], name))
        stats = stats_of(part)
        data = part.select(schema.names).cast(schema)
        folder = f"{root.rstrip('/')}/{name}"
        fs.makedirs(folder, exist_ok=True)
        path = f"{folder}/{uuid.uuid4().hex}.parquet"
        with fs.open(path, "wb") as f:  # only ever read after this task returned its path
            pq.write_table(data, f, compression="none")  # scratch, read once
        out.append({"shard": name, "path": fs.unstrip_protocol(path), "rows": part.num_rows,
                    "stats": json.dumps(stats, sort_keys=True)})
    return pa.Table.from_pylist(out, schema=PART_SCHEMA)


def add_stats(total: dict[str, Counter], more: dict[str, dict[str, int]]) -> None:
    for stat, counts in more.items():
        total.setdefault(stat, Counter()).update(counts)


class PartCollector:
    """The driver's ledger of parts: which shards have all their rows (metadata only)."""

    def __init__(self, expected: dict[str, int]):
        self.expected = expected
        self.rows: Counter = Counter()
        self.paths: dict[str, list[str]] = defaultdict(list)
        self.stats: dict[str, dict[str, Counter]] = defaultdict(dict)

    def add(self, parts: pa.Table) -> list[str]:
        """Record a batch of part rows; returns the shards it completed."""
        done = []
        for row in parts.to_pylist():
            name = row["shard"]
            self.rows[name] += row["rows"]
            self.paths[name].append(row["path"])
            add_stats(self.stats[name], json.loads(row["stats"]))
            if self.rows[name] > self.expected[name]:
                raise RuntimeError(f"{name}: got {self.rows[name]} rows, expected {self.expected[name]}")
            if self.rows[name] == self.expected[name]:
                done.append(name)
        return done

    def take(self, name: str) -> tuple[list[str], dict[str, dict[str, int]]]:
        """A complete shard's part paths and summed statistics, removed from the ledger."""
        self.rows.pop(name, None)
        stats = {k: dict(v) for k, v in self.stats.pop(name, {}).items()}
        return self.paths.pop(name, []), stats

    def short(self) -> dict[str, tuple[int, int]]:
        """Shards with some parts but not all their rows: name -> (rows, expected)."""
        return {n: (r, self.expected[n]) for n, r in self.rows.items() if 0 < r < self.expected[n]}


def assemble_shard(
    path: str, name: str, schema: pa.Schema, parts: Iterable[str], *, row_group_rows: int,
    inputs: list[str], input_fingerprint: str, stats: dict[str, Any],
) -> ShardInfo:
    """Concatenate ``parts`` (in order) into shard ``name`` of the table at ``path``, remove them,
    and describe the shard. Runs where Ray puts it: the rows never pass through the driver."""
    parts = list(parts)
    writer = ShardWriter(path, name, schema)
    pending: list[pa.Table] = []
    held = 0
    try:
        for part in parts:
            with fsspec.open(part, "rb") as f:
                table = pq.read_table(f)
            pending.append(table)
            held += table.num_rows
            if held >= row_group_rows:  # row groups of row_group_rows, whatever the parts' sizes
                writer.write(pa.concat_tables(pending), row_group_size=row_group_rows)
                pending, held = [], 0
        if pending:
            writer.write(pa.concat_tables(pending), row_group_size=row_group_rows)
        info = writer.close(inputs=inputs, input_fingerprint=input_fingerprint, stats=stats)
    except BaseException:
        writer.abort()
        raise
    for part in parts:
        fs, p = fsspec.core.url_to_fs(part)
        fs.rm_file(p)
    return info


class ShardAssembler:
    """The driver's side: part rows in, assembly tasks out, ``ShardInfo``s recorded as they return.

    A thread records each assembled shard as soon as its task returns (not when the next batch
    of part rows happens to arrive), so a stage killed mid-run keeps every shard assembled
    before the kill. ``shard_args(name)`` gives ``assemble_shard``'s ``inputs`` and
    ``input_fingerprint`` for a shard.
    """

    def __init__(self, writer, schema: pa.Schema, expected: dict[str, int], shard_args: Callable[[str], dict[str, Any]],
                 *, row_group_rows: int, **remote_args: Any):
        import ray

        self.writer, self.schema, self.shard_args = writer, schema, shard_args
        self.row_group_rows = row_group_rows
        self.collector = PartCollector(expected)
        self.task = ray.remote(assemble_shard).options(**remote_args)
        self.assembling: dict[Any, str] = {}
        self.written = 0
        self.failure: BaseException | None = None
        self._lock = threading.Lock()  # assembling, written, failure and the writer's journal
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._record_loop, name="shard-assembler", daemon=True)
        self._thread.start()

    def feed(self, parts: pa.Table) -> int:
        """Record a batch of part rows, start the shards it completes; returns the rows it added."""
        for name in self.collector.add(parts):
            paths, stats = self.collector.take(name)
            ref = self.task.remote(self.writer.path, name, self.schema, paths, row_group_rows=self.row_group_rows,
                                   stats=stats, **self.shard_args(name))
            with self._lock:
                self.assembling[ref] = name
        return int(pc.sum(parts["rows"]).as_py() or 0)

    def _record(self, ref) -> None:
        import ray

        try:
            info = ray.get(ref)
        except ray.exceptions.RayError as err:  # that shard is redone by a later pass or run
            with self._lock:
                self.assembling.pop(ref, None)
                self.failure = self.failure or err
            return
        with self._lock:
            self.assembling.pop(ref, None)
            self.writer.record(info)
            self.written += 1

    def _record_loop(self) -> None:
        import ray

        while not self._stop.is_set():
            with self._lock:
                refs = list(self.assembling)
            if not refs:
                self._stop.wait(0.05)
                continue
            ready, _ = ray.wait(refs, num_returns=1, timeout=0.2)
            for ref in ready:
                self._record(ref)

    def _drain(self) -> None:
        """Stop the thread, then record every assembly still running (waiting for each)."""
        self._stop.set()
        self._thread.join()
        for ref in list(self.assembling):
            self._record(ref)

    def finish(self) -> int:
        """After the last batch: every shard assembled and recorded; returns how many."""
        self._drain()
        if self.failure is not None:
            raise self.failure
        short = self.collector.short()
        if short:
            raise RuntimeError("the pipeline ended with shards short of rows: "
                               + ", ".join(f"{n} ({r}/{e})" for n, (r, e) in sorted(short.items())))
        return self.written

    def salvage(self) -> None:
        """After a failure: record the shards whose assembly finishes anyway (finished work);
        the rest are redone by a later pass or run."""
        self._drain()
