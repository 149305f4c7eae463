"""Image references -> uids at any scale: a partitioned join of a source's records with the
``pairs`` table, so no structure on the driver grows with either side.

A file source whose ``image_key`` needs the pairs table (basename, path, coco_id) is resolved in
three steps, each holding one bounded partition at a time:

1. ``PairsIndex``: the pairs table is streamed once per rule (uid, url and status only) and each
   row's join key and value (its uid, or ``FAILED`` for a failed download) spilled to P files by
   a hash of the key (``lmeye.spill``). One key's rows all land in one file.
2. ``Resolver.add``: while the source is read, every record that needs a uid is spilled with its
   key (to the same P files, by the same hash), its position in the source and its JSON text.
3. ``Resolver.resolved``: per key partition, the keys' values are reduced (two different values:
   ``ambiguous_image``) and the records joined to them (Arrow's hash join); the results go to
   range files by record position, which are then read back in order, so the rows are built in
   input order exactly as a per-record lookup would build them (``cap`` and dedup see the same
   order).

P comes from the larger of the two sides (``partition_mb`` each), so both halves of a partition
stay bounded; range files hold ``chunk_rows`` records each.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmeye.spill import Spill
from lmeye.tables import TableReader
from pipelines.instruct.images import key_of
from schemas.pairs import STATUS, SUCCESS, UID as PAIRS_UID, URL

FAILED = "?failed"  # the value of a key whose image failed to download
INDEX_ROW_BYTES = 160  # rough spilled bytes of one (key, value) row, to size the partitions
INDEX_SCHEMA = pa.schema([("key", pa.string()), ("value", pa.string())])
PENDING_SCHEMA = pa.schema([("seq", pa.int64()), ("key", pa.string()), ("file", pa.int32()), ("where", pa.string()),
                            ("rec", pa.string())])
RESOLVED_SCHEMA = pa.schema([("seq", pa.int64()), ("uid", pa.string()), ("reason", pa.string()), ("file", pa.int32()),
                             ("where", pa.string()), ("rec", pa.string())])


def key_partitions(keys: list[str], partitions: int) -> np.ndarray:
    """The partition of each join key: crc32 of the key, stable across runs and machines."""
    return np.fromiter((zlib.crc32(k.encode()) for k in keys), dtype=np.uint32, count=len(keys)) % partitions


def partition_count(pairs_rows: int, source_bytes: int, partition_mb: float) -> int:
    return max(1, math.ceil(max(pairs_rows * INDEX_ROW_BYTES, source_bytes) / (partition_mb * 1024 * 1024)))


class PairsIndex:
    """The join keys of a pairs table under one rule, spilled by key hash (step 1)."""

    def __init__(self, pairs: TableReader, rule: str, components: int, folder: str, partitions: int,
                 chunk_rows: int):
        self.rule, self.components, self.partitions = rule, components, partitions
        self.spill = Spill(folder, f"index-{rule}-{components}-{partitions}", partitions, INDEX_SCHEMA)
        try:
            for batch in pairs.iter_batches(columns=[PAIRS_UID, URL, STATUS], batch_size=chunk_rows):
                d = batch.to_pydict()
                keys, values = [], []
                for uid, url, status in zip(d[PAIRS_UID], d[URL], d[STATUS]):
                    key = key_of(url, rule, components)
                    if key is not None:
                        keys.append(key)
                        values.append(uid if status == SUCCESS else FAILED)
                self.spill.write(pa.table({"key": keys, "value": values}, schema=INDEX_SCHEMA),
                                 key_partitions(keys, partitions))
        finally:
            self.spill.close()

    def values(self, p: int) -> pa.Table:
        """(key, value) of partition p, one row per key: a key of two different values (two
        images share a name) is ambiguous, ``ambiguous`` True."""
        t = self.spill.read(p)
        if t.num_rows == 0:
            return pa.table({"key": pa.array([], pa.string()), "value": pa.array([], pa.string()),
                             "ambiguous": pa.array([], pa.bool_())})
        # Sorted by (key, value), a key's rows are one run: its first and last value differ iff
        # the key is ambiguous. (A sort costs a few bytes a row; a hash aggregation of string
        # minima and maxima cost about 1 KB a row here, the partition's largest allocation.)
        order = pc.sort_indices(t, sort_keys=[("key", "ascending"), ("value", "ascending")])
        keys = t["key"].take(order).combine_chunks()
        values = t["value"].take(order).combine_chunks()
        del t, order
        n = len(keys)
        new = np.ones(n, dtype=bool)  # the first row of each key's run
        if n > 1:
            new[1:] = pc.not_equal(keys.slice(1), keys.slice(0, n - 1)).to_numpy(zero_copy_only=False)
        first = np.flatnonzero(new)
        last = np.append(first[1:] - 1, n - 1)
        lo, hi = values.take(pa.array(first)), values.take(pa.array(last))
        return pa.table({"key": keys.take(pa.array(first)), "value": lo, "ambiguous": pc.not_equal(lo, hi)})


@dataclass
class Resolved:
    """One record after the join: its uid (None: text-only), or the reason it has none."""

    uid: Optional[str]
    reason: Optional[str]
    file: str
    where: str
    rec: Any


class Resolver:
    """One source's records waiting for their uid (steps 2 and 3)."""

    def __init__(self, index: PairsIndex, folder: str, name: str, chunk_rows: int):
        self.index, self.chunk_rows = index, chunk_rows
        self.pending = Spill(folder, f"pending-{name}", index.partitions, PENDING_SCHEMA)
        self.direct: Optional[Spill] = None  # text-only records: no key, straight to the range files
        self.folder, self.name = folder, name
        self.files: list[str] = []
        self.file_ids: dict[str, int] = {}
        self.count = 0
        self._reset()

    def _reset(self) -> None:
        self.buf: dict[str, list] = {c: [] for c in PENDING_SCHEMA.names}

    def add(self, seq: int, key: Optional[str], file: str, where: str, rec: Any) -> None:
        """A record at position ``seq`` of the source whose image has join key ``key`` (None:
        text-only, no image)."""
        fid = self.file_ids.get(file)
        if fid is None:
            fid = self.file_ids[file] = len(self.files)
            self.files.append(file)
        for c, v in zip(PENDING_SCHEMA.names, (seq, key, fid, where, json.dumps(rec))):
            self.buf[c].append(v)
        self.count = max(self.count, seq + 1)
        if len(self.buf["seq"]) >= self.chunk_rows:
            self._flush()

    def _flush(self) -> None:
        keys = self.buf["key"]
        if keys:
            t = pa.table(self.buf, schema=PENDING_SCHEMA)
            has_key = pc.is_valid(t["key"])
            keyed = t.filter(has_key)
            self.pending.write(keyed, key_partitions(keyed["key"].to_pylist(), self.index.partitions))
            text_only = t.filter(pc.invert(has_key))
            if text_only.num_rows:
                self._ranges().write(_as_resolved(text_only, None, None), self._range_of(text_only))
        self._reset()

    def _ranges(self) -> Spill:
        if self.direct is None:  # one range file per chunk_rows positions; P is only a name here
            self.direct = Spill(self.folder, f"ranges-{self.name}", 0, RESOLVED_SCHEMA)
        return self.direct

    def _range_of(self, t: pa.Table) -> np.ndarray:
        return t["seq"].to_numpy() // self.chunk_rows

    def resolved(self) -> Iterator[tuple[int, Resolved]]:
        """Every record added, in position order, with its uid or the reason it has none."""
        self._flush()
        self.pending.close()
        ranges = self._ranges()
        for p in range(self.index.partitions):
            recs = self.pending.read(p)
            if recs.num_rows:
                joined = recs.join(self.index.values(p), "key", join_type="left outer")
                missing = pc.is_null(joined["value"])
                ambiguous = pc.fill_null(joined["ambiguous"], False)
                failed = pc.equal(pc.fill_null(joined["value"], ""), FAILED)
                reason = pc.if_else(missing, "image_not_in_pairs",
                                    pc.if_else(ambiguous, "ambiguous_image",
                                               pc.if_else(failed, "image_failed", pa.scalar(None, pa.string()))))
                uid = pc.if_else(pc.is_null(reason), joined["value"], pa.scalar(None, pa.string()))
                ranges.write(_as_resolved(joined, uid, reason), self._range_of(joined))
            self.pending.remove(p)
        ranges.close()
        for r in range(math.ceil(self.count / self.chunk_rows)):
            t = ranges.read(r)
            ranges.remove(r)
            t = t.take(pc.sort_indices(t["seq"]))
            for row in t.to_pylist():
                yield row["seq"], Resolved(row["uid"], row["reason"], self.files[row["file"]], row["where"],
                                           json.loads(row["rec"]))


def _as_resolved(t: pa.Table, uid: Optional[pa.Array], reason: Optional[pa.Array]) -> pa.Table:
    n = t.num_rows
    none = pa.nulls(n, pa.string())
    return pa.table({"seq": t["seq"], "uid": none if uid is None else uid, "reason": none if reason is None else reason,
                     "file": t["file"], "where": t["where"], "rec": t["rec"]}, schema=RESOLVED_SCHEMA)
