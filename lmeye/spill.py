"""Hash-partition spill files: rows appended to P local Arrow IPC streams, one per partition.

The stages that must bring every row of one key together without holding the whole input
(download's URL dedup, instruct's per-image partitions and its image-reference join) write
their rows here chunk by chunk, each row to the partition its caller chose, and then read one
partition at a time: the memory a partition needs, not the input's, bounds the process.

The caller decides the partition of a row (its own hash of its own key), so one helper serves
keys of any kind; ``Spill.write`` only groups a chunk by partition and appends each group.
"""

from __future__ import annotations

import os
import resource
from typing import Iterator

import numpy as np
import pyarrow as pa


class Spill:
    """P append-only Arrow IPC stream files ``<folder>/<prefix>-<p>.arrow`` of one schema.

    Rows keep their order within a partition (a stable grouping), which is what lets a reader
    find the first copy of a key by position."""

    def __init__(self, folder: str, prefix: str, partitions: int, schema: pa.Schema):
        self.folder, self.prefix, self.partitions, self.schema = folder, prefix, partitions, schema
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.rows = 0

    def path(self, p: int) -> str:
        return os.path.join(self.folder, f"{self.prefix}-{p:05d}.arrow")

    def write(self, table: pa.Table, parts: np.ndarray) -> None:
        """Append each row of ``table`` to partition ``parts[row]`` (ints in [0, partitions))."""
        if table.num_rows == 0:
            return
        parts = np.asarray(parts)
        order = np.argsort(parts, kind="stable")
        sorted_parts = parts[order]
        table = table.take(pa.array(order))
        bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
        starts = np.concatenate([[0], bounds]).tolist()
        ends = np.concatenate([bounds, [len(sorted_parts)]]).tolist()
        for s, e in zip(starts, ends):
            p = int(sorted_parts[s])
            w = self.writers.get(p)
            if w is None:
                w = self.writers[p] = pa.ipc.new_stream(self.path(p), self.schema)
            w.write_table(table.slice(s, e - s))
        self.rows += table.num_rows

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()

    def read(self, p: int) -> pa.Table:
        """Partition p's rows, in the order written (an empty table when none went there)."""
        if not os.path.exists(self.path(p)):
            return self.schema.empty_table()
        with pa.memory_map(self.path(p)) as src:
            return pa.ipc.open_stream(src).read_all()

    def batches(self, p: int) -> Iterator[pa.RecordBatch]:
        """Partition p's rows batch by batch, for a caller that splits it again."""
        if not os.path.exists(self.path(p)):
            return
        with pa.memory_map(self.path(p)) as src:
            yield from pa.ipc.open_stream(src)

    def size(self, p: int) -> int:
        """Bytes spilled to partition p so far (0: none)."""
        return os.path.getsize(self.path(p)) if os.path.exists(self.path(p)) else 0

    def remove(self, p: int) -> None:
        if os.path.exists(self.path(p)):
            os.remove(self.path(p))


def raise_open_files_limit(need: int) -> None:
    """Raise the soft limit on open files to fit ``need`` spill streams, where the hard one allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need + 64:
        target = need + 64 if hard == resource.RLIM_INFINITY else min(hard, need + 64)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
