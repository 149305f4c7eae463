"""The feature store: random reads of a `features` table by uid.

Parquet stays the table of record. Random reads come from a *serving copy* that the store builds
from it on first open and keeps in step with the manifest. It has two parts:

* **segments**, one per shard, in ``_serving/.segments/<id>/`` where the id is a digest of the
  shard's sha256: the shard's successful rows in shard order, as ``uid_hi.npy`` / ``uid_lo.npy``
  (the 128-bit uid, ``lmeye.uid``, as two ``uint64`` words) and ``<column>.npy`` for the
  fixed-width columns (``embedding``; ``patch_tokens`` and, for int8 encodings, ``patch_scales``
  in the table's own encoding: int8 stays int8 on disk and is dequantised per ``get``). A
  segment never changes, so every version whose manifest lists that shard shares it: a table
  that gained shards builds only theirs.
* an **index** per version, ``_serving/<version>/``: ``uid_index.npy``, every successful row as
  a record (uid hi, uid lo, its row in the segments laid end to end; 24 bytes) sorted by
  (hi, lo), read into the process at open when it is at most ``index_memory`` bytes (default
  ``INDEX_MEMORY``, 1 GiB: ~44M rows), so that a cold lookup reads its row and nothing else, as a
  take by position does; memory-mapped otherwise; ``uid_fence.npy``, every ``FENCE_ROWS``-th record's hi, read into
  memory at open (10M rows: 1.25 MB), which narrows a uid to one block of ``FENCE_ROWS`` records
  (1.5 KB, 1.4 pages on average): a cold lookup in a mapped index reads that block and the row's vector, where a
  binary search over the whole index would fault in ~log2(N) pages one after another.
  Ties on hi (~3 in 10^10 rows) are resolved on lo. ``meta.json`` has the segments in order,
  column shapes and encodings, the model metadata. No Python object per row: 100M rows are a
  2.4 GB index of which a lookup touches a page or two. Rebuilding it reads the segments' uids only.

Building streams one shard at a time (memory grows with the shard, not the table) and sorts
only the uid keys, ``INDEX_SORT_ROWS`` rows at a time: a larger table's sorted runs are spilled
and merged, so the build's memory is bounded whatever the row count.

**Versions.** A table's version is a digest of its schema version and every shard's sha256 in
the manifest, so any rewrite of any shard gives a new version. The serving copy lives in
``<table>/_serving/<version>/`` (or under ``cache_dir`` for tables on object stores); segments
and indexes are built into temporary directories and renamed, so concurrent openers never see
half a copy; a per-root file lock makes the processes of one node (train workers, predict actors)
build it once, not each. Opening a table
whose version has no serving copy builds one; the newest ``keep_versions`` copies are kept.
``FeatureStore.open(path, version=V)`` pins a version: it opens V's serving copy when the table
has moved on but the copy is still kept, and fails with a message naming both versions otherwise.
V must be a version id (``VERSION_LEN`` lowercase hex digits), never a path fragment.

Only ``status == success`` rows are served; failed rows stay in the Parquet table as data.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import mmap
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal, Optional, Sequence

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmeye.patch_codec import PatchCodec, codec
from lmeye.report import sum_counts
from lmeye.tables import Manifest, TableReader, is_local
from lmeye.uid import UID_KEY, UID_LEN, key_order, key_to_uid, uid_keys
from schemas import SchemaError
from schemas.features import FEATURES, SUCCESS, VALUE_TYPES, patch_encoding_of, patch_pool_of, patch_shape_of

SERVING = "_serving"
SEGMENTS = ".segments"  # a dot: not a version, and skipped by whoever lists versions
VECTOR_COLUMNS = ("embedding", "patch_tokens")  # what get() serves
STORED_COLUMNS = ("embedding", "patch_tokens", "patch_scales")  # what a segment holds
FORMAT = 3  # serving-copy layout version (2: 128-bit uids as uid_hi/uid_lo; 3: per-shard segments, compact patch tokens)
# the per-version index's layout (1: uid_hi/uid_lo/row.npy, binary-searched whole; 2: records and a
# fence): a copy with another one gets a new index on open, from its segments (no Parquet row read)
INDEX_FORMAT = 2
INDEX_RECORD = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("row", "<i8")])
# records per fence entry (recorded in meta.json): a smaller block is fewer pages read per cold
# lookup (64: 1.4 on average, 170: 2), a larger one a smaller fence in each process's memory
FENCE_ROWS = 64
# an index build sorts this many rows' uids in memory at a time (~50 bytes a row at peak: 0.2 GB);
# a larger table's sorted runs are spilled beside the index and merged MERGE_ROWS records a run at a time
INDEX_SORT_ROWS = 1 << 22
MERGE_ROWS = 1 << 16
# the most bytes of uid index a store holds in its own memory (``FeatureStore.open(index_memory=)``):
# 1 GiB is ~44M rows at 24 bytes. Held, a cold lookup reads nothing but its row (as a take by position
# does); a larger index is read through the page cache, a block of FENCE_ROWS records per lookup
INDEX_MEMORY = 1 << 30
SEGMENT_GRACE_S = 3600  # an unreferenced segment younger than this may be another builder's: not pruned yet
VERSION_LEN = 16
_VERSION_RE = re.compile(rf"[0-9a-f]{{{VERSION_LEN}}}")


class MissingUidError(LookupError):
    """Requested uids that the table does not serve (absent, failed, or not a uid at all)."""

    def __init__(self, missing: Sequence[str], where: str):
        self.missing = list(missing)
        shown = ", ".join(self.missing[:20]) + (f", ... ({len(self.missing) - 20} more)" if len(self.missing) > 20 else "")
        super().__init__(f"{len(self.missing)} uid(s) not in {where}: {shown}")

    def __str__(self) -> str:  # not KeyError's quoted repr
        return self.args[0]


class VersionError(SchemaError):
    """The pinned version is not the table's, and no serving copy of it is kept."""


def table_version(manifest: Manifest) -> str:
    """``VERSION_LEN`` hex digits naming a table's content: schema version + every shard's checksum."""
    blob = json.dumps(
        {"schema": manifest.schema_version, "shards": {n: s.sha256 for n, s in sorted(manifest.shards.items())}},
        sort_keys=True,
    ).encode()
    return hashlib.sha256(blob).hexdigest()[:VERSION_LEN]


@dataclass
class FeatureBatch(Mapping):
    """The result of ``get``: arrays in request order, plus which uids were found."""

    uids: list[str]
    found: np.ndarray  # bool, one per requested uid
    columns: dict[str, np.ndarray] = field(default_factory=dict)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.columns[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.columns)

    def __len__(self) -> int:
        return len(self.columns)

    @property
    def missing(self) -> list[str]:
        return [u for u, ok in zip(self.uids, self.found) if not ok]


READ_GAP_PAGES = 2  # pages between two rows' that a read-ahead request reads through


@dataclass
class _Mapped:
    """A read-only memory map of an ``.npy`` array (``array``), advised for random access: a gather
    touches a few rows a page apart, and the kernel's default read-around would fetch ~100 KB per
    fault. ``prefetch`` asks the kernel to start reading rows' pages all at once (MADV_WILLNEED
    queues the reads without waiting), so a cold gather waits for its reads together, not in turn."""

    array: np.ndarray
    mm: Optional[mmap.mmap] = None
    offset: int = 0  # of the array's first byte in the file

    def prefetch(self, first: np.ndarray, count: int = 1) -> None:
        """Start reading the pages of rows ``first[i] .. first[i] + count - 1``, for each i."""
        if self.mm is None or not hasattr(mmap, "MADV_WILLNEED") or first.size == 0:
            return
        width = self.array.strides[0]
        first = np.sort(np.asarray(first, np.int64))
        lo = (self.offset + first * width) // mmap.PAGESIZE
        hi = np.maximum.accumulate((self.offset + (first + count) * width - 1) // mmap.PAGESIZE)
        # one request per run of pages at most READ_GAP_PAGES apart: a few pages more, far fewer calls
        new = np.concatenate([[True], lo[1:] > hi[:-1] + 1 + READ_GAP_PAGES])
        lo, hi = lo[new], hi[np.concatenate([np.flatnonzero(new)[1:] - 1, [hi.size - 1]])]
        for a, b in zip(lo.tolist(), hi.tolist()):
            start = a * mmap.PAGESIZE  # the file's last page may be partial
            self.mm.madvise(mmap.MADV_WILLNEED, start, min((b + 1) * mmap.PAGESIZE, len(self.mm)) - start)


def _npy_header(f, path: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, offset of the data) of the ``.npy`` file open as ``f``."""
    major, _ = np.lib.format.read_magic(f)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(f)
    if fortran or dtype.hasobject:
        raise SchemaError(f"{path}: not a serving-copy array")
    return shape, dtype, f.tell()


def _load(path: str) -> _Mapped:
    with open(path, "rb") as f:
        shape, dtype, offset = _npy_header(f, path)
        if int(np.prod(shape)) == 0:  # an empty array cannot be memory-mapped
            return _Mapped(np.zeros(shape, dtype))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if hasattr(mm, "madvise") and hasattr(mmap, "MADV_RANDOM"):
        mm.madvise(mmap.MADV_RANDOM)
    return _Mapped(np.ndarray(shape, dtype, buffer=mm, offset=offset), mm, offset)


def _load_resident(path: str) -> _Mapped:
    """The array read into this process's memory (plain sequential reads, no mapping): lookups
    in it read nothing from disk, and a ``prefetch`` on it does nothing."""
    with open(path, "rb") as f:
        shape, dtype, _ = _npy_header(f, path)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        array = np.empty(shape, dtype)
        view = memoryview(array.reshape(-1).view(np.uint8))
        got = 0
        while got < view.nbytes:  # readinto: no second copy of the array at any point
            n = f.readinto(view[got:got + (64 << 20)])
            if not n:
                raise SchemaError(f"{path}: ends {view.nbytes - got} bytes short of its header's shape {shape}")
            got += n
    return _Mapped(array)


def _default_serving_root(path: str, cache_dir: Optional[str]) -> str:
    if cache_dir:
        key = hashlib.sha256(path.encode()).hexdigest()[:12]
        return os.path.join(cache_dir, key)
    if is_local(path):
        _, root = fsspec.core.url_to_fs(path)
        return os.path.join(root, SERVING)
    return os.path.join(os.path.expanduser("~/.cache/lingcloud/serving"), hashlib.sha256(path.encode()).hexdigest()[:12])


class FeatureStore:
    """Random reads of a finished `features` table by uid. Open with ``FeatureStore.open``."""

    def __init__(self, path: str, serving_dir: str, meta: dict[str, Any], current: bool, index_memory: int = INDEX_MEMORY):
        self.path = path
        self.serving_dir = serving_dir
        self._meta = meta
        self.version: str = meta["version"]
        self.current = current  # False: a pinned older version served from its kept copy
        index_file = os.path.join(serving_dir, "uid_index.npy")
        self.index_resident = os.path.getsize(index_file) <= index_memory  # see INDEX_MEMORY
        self._index_map = (_load_resident if self.index_resident else _load)(index_file)
        self._index = self._index_map.array
        self._fence = np.load(os.path.join(serving_dir, "uid_fence.npy"))
        self._fence_rows = int(meta["fence_rows"])
        seg_root = os.path.join(os.path.dirname(serving_dir), SEGMENTS)
        segs = meta["segments"]
        stored = [c for c in STORED_COLUMNS if c in meta["stored"]]
        # per column, the segments' memory maps in order; a row's segment is found by its offset
        self._segs = [{c: _load(os.path.join(seg_root, sid, f"{c}.npy")) for c in stored} for sid, _ in segs]
        self._offsets = np.cumsum([0] + [n for _, n in segs], dtype=np.int64)
        pc_ = meta["columns"].get("patch_tokens")
        self._codec: Optional[PatchCodec] = codec(pc_["encoding"]) if pc_ else None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        version: Optional[str] = None,
        *,
        cache_dir: Optional[str] = None,
        keep_versions: int = 2,
        index_memory: int = INDEX_MEMORY,
    ) -> "FeatureStore":
        """Open the table at ``path``, building its serving copy if it has none for this version.

        ``version`` pins a version (see ``FeatureStore.version``); ``cache_dir`` puts serving
        copies elsewhere (default: ``<table>/_serving`` for local tables, ~/.cache otherwise).
        ``index_memory``: the uid index is read into this process's memory when its file is at
        most this many bytes (24 a row; default ``INDEX_MEMORY``, 1 GiB), else memory-mapped; 0: always mapped.
        """
        path = str(path)
        if isinstance(index_memory, bool) or not isinstance(index_memory, int) or index_memory < 0:
            raise ValueError(f"index_memory must be a number of bytes >= 0, not {index_memory!r}")
        if version is not None and not (isinstance(version, str) and _VERSION_RE.fullmatch(version)):
            raise VersionError(
                f"{path}: {version!r} is not a features table version (expected {VERSION_LEN} lowercase hex "
                "digits, as `lmeye store info` prints)"
            )
        root = _default_serving_root(path, cache_dir)
        manifest = Manifest.load(path)
        current = table_version(manifest) if manifest is not None else None
        if version is not None and version != current:
            meta = _read_meta(os.path.join(root, version))
            if meta is not None:
                return cls(path, os.path.join(root, version), meta, current=False, index_memory=index_memory)
            kept = sorted(_kept_versions(root))
            raise VersionError(
                f"{path}: features table is at version {current or '(none)'}, not the pinned {version}"
                + (f"; serving copies kept: {', '.join(kept)}" if kept else "; no copy of it is kept")
            )
        reader = TableReader(path, FEATURES)  # checks table name, schema version, completeness
        version = table_version(reader.manifest)
        target = os.path.join(root, version)
        meta = _read_meta(target)
        if meta is None:
            with _one_builder(root):  # every train worker / predict actor of a node opens at once
                meta = _read_meta(target)  # built by the one that held the lock before us
                if meta is None:
                    _build(reader, version, root)
                    _prune(root, keep=max(1, keep_versions), protect=version)
                    meta = _read_meta(target)
            if meta is None:
                raise RuntimeError(f"{target}: serving copy vanished after it was built")
        return cls(path, target, meta, current=True, index_memory=index_memory)

    def is_current(self) -> bool:
        """Whether the table on disk still has this version (a rerun of extraction changes it)."""
        m = Manifest.load(self.path)
        return m is not None and table_version(m) == self.version

    # ------------------------------------------------------------------ facts
    @property
    def metadata(self) -> dict[str, str]:
        """Model name, pretrained tag/path, checkpoint sha256, image size, dtype, embed dim, ..."""
        return dict(self._meta["metadata"])

    @property
    def model(self) -> str:
        return self._meta["metadata"].get("model", "")

    @property
    def columns(self) -> list[str]:
        return list(self._meta["columns"])

    @property
    def dim(self) -> int:
        return int(self._meta["columns"]["embedding"]["shape"][-1])

    @property
    def patch_shape(self) -> Optional[tuple[int, int]]:
        col = self._meta["columns"].get("patch_tokens")
        return tuple(col["shape"]) if col else None

    @property
    def num_rows(self) -> int:
        """Rows served (successful rows)."""
        return int(self._index.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    def segment_files(self, column: str) -> list[tuple[str, int]]:
        """(``.npy`` file, rows) of ``column`` per segment, in the order rows are numbered (exports, benchmarks)."""
        seg_root = os.path.join(os.path.dirname(self.serving_dir), SEGMENTS)
        return [(os.path.join(seg_root, sid, f"{column}.npy"), int(n)) for sid, n in self._meta["segments"]]

    def info(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "version": self.version,
            "current": self.current,
            "rows_served": self.num_rows,
            "table_rows": self._meta["table_rows"],
            "by_status": self._meta.get("by_status", {}),
            "columns": {c: dict(v) for c, v in self._meta["columns"].items()},
            "metadata": self.metadata,
            "serving_copy": self.serving_dir,
            "segments": len(self._meta["segments"]),
            "segments_built": self._meta["segments_built"],  # by the open that built this version's index
            "index_resident": self.index_resident,
            "memory_bytes": self.memory_bytes,
        }

    @property
    def memory_bytes(self) -> int:
        """Bytes this store holds in its own memory: the fence, and the uid index when resident."""
        return int(self._fence.nbytes + (self._index.nbytes if self.index_resident else 0))

    # ------------------------------------------------------------------ reads
    def _locate(self, uids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(row in the segments, found) per uid: each uid's block of the index is read ahead, all
        at once (cold: about one disk read's wait for all of them; nothing when the index is resident),
        then searched."""
        keys, valid = uid_keys(uids)
        base = _blocks(self._fence, self._fence_rows, keys)
        self._index_map.prefetch(base, self._fence_rows)
        rows, found = _find(self._index, base, self._fence_rows, keys)
        return rows, found & valid

    def contains(self, uids: Sequence[str]) -> np.ndarray:
        """Boolean mask: which uids are served."""
        return self._locate(list(uids))[1]

    def __contains__(self, uid: str) -> bool:
        return bool(self.contains([uid])[0])

    def get(
        self,
        uids: Sequence[str],
        columns: Sequence[str] | str = ("embedding",),
        *,
        on_missing: Literal["raise", "mask"] = "raise",
    ) -> FeatureBatch:
        """Arrays for ``uids`` in request order: ``result["embedding"]`` is (N, D); patch_tokens (N, T, D).

        A uid that is not served raises ``MissingUidError`` listing every such uid, or, with
        ``on_missing="mask"``, comes back as a zero row with ``result.found[i] == False``.
        """
        uids = [uids] if isinstance(uids, str) else list(uids)
        columns = [columns] if isinstance(columns, str) else list(columns)
        for c in columns:
            if c not in self._meta["columns"]:
                raise KeyError(f"column {c!r} is not in {self.path} (has: {', '.join(self._meta['columns'])})")
        if on_missing not in ("raise", "mask"):
            raise ValueError(f"on_missing must be 'raise' or 'mask', not {on_missing!r}")
        rows, found = self._locate(uids)
        if on_missing == "raise" and not found.all():
            raise MissingUidError([u for u, ok in zip(uids, found) if not ok], f"{self.path} (version {self.version})")
        rows = rows[found]
        stored = set(columns) | ({"patch_scales"} if "patch_tokens" in columns and self._codec and self._codec.scaled else set())
        taken = self._gather(rows, [c for c in STORED_COLUMNS if c in stored])
        out: dict[str, np.ndarray] = {}
        for c in columns:
            shape = tuple(self._meta["columns"][c]["shape"])
            vals = taken[c].reshape((rows.size, *shape))
            if c == "patch_tokens":  # floats back whatever the encoding
                vals = self._codec.decode(taken[c], taken.get("patch_scales"), shape)
            full = vals if found.all() else np.zeros((len(uids), *shape), dtype=vals.dtype)
            if not found.all():
                full[found] = vals
            out[c] = full
        return FeatureBatch(uids=uids, found=found, columns=out)

    def _gather(self, rows: np.ndarray, columns: list[str]) -> dict[str, np.ndarray]:
        """Stored arrays of global ``rows`` (in that order): one gather per segment touched."""
        order = np.argsort(rows, kind="stable")  # read each memory map front to back
        srt = rows[order]
        seg = np.searchsorted(self._offsets, srt, side="right") - 1
        cuts = np.flatnonzero(np.diff(seg)) + 1
        spec = self._meta["stored"]
        out = {c: np.empty((rows.size, spec[c]["width"]), dtype=spec[c]["dtype"]) for c in columns}
        local = srt - self._offsets[seg]
        starts, ends = np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [srt.size]]).tolist()
        by_seg = list(zip(starts, ends)) if srt.size else []
        for a, b in by_seg:  # every read queued first, then gathered: the reads overlap
            for c in columns:
                self._segs[int(seg[a])][c].prefetch(local[a:b])
        for a, b in by_seg:
            for c in columns:
                out[c][order[a:b]] = self._segs[int(seg[a])][c].array[local[a:b]]
        return out


def _blocks(fence: np.ndarray, every: int, keys: np.ndarray) -> np.ndarray:
    """Per ``UID_KEY``, the first record of its block: ``fence`` is ``index["hi"][::every]`` (in
    memory); with ``j`` the first fence entry >= the key's hi, the first record whose hi is >= it
    lies in ``((j - 1) * every, j * every]``, and the last of those is ``fence[j]`` itself: only
    the ``every`` records from the returned one need reading ahead."""
    return np.maximum(np.searchsorted(fence, keys["hi"], side="left") - 1, 0) * every


def _find(index: np.ndarray, base: np.ndarray, every: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(row, found) of each ``UID_KEY`` in ``index`` (``INDEX_RECORD``s sorted by (hi, lo)), each
    searched for in its block from ``_blocks``: a vectorised bisection, ~8 steps, within a page or two."""
    n = index.shape[0]
    if n == 0 or keys.size == 0:
        return np.zeros(keys.size, np.int64), np.zeros(keys.size, bool)
    hi, lo = keys["hi"], keys["lo"]
    his = index["hi"]
    a, b = base.copy(), np.minimum(base + every, n)  # the first hi >= the key's is at a position in [a, b]
    while True:
        open_ = a < b
        if not open_.any():
            break
        mid = (a + b) // 2
        less = open_ & (his[np.minimum(mid, n - 1)] < hi)
        a = np.where(less, mid + 1, a)
        b = np.where(open_ & ~less, mid, b)
    pos = a
    tie = (pos + 1 < n) & (his[np.minimum(pos + 1, n - 1)] == hi)
    for i in np.flatnonzero(tie):  # records sharing the top 64 bits: rare, resolve on lo
        end = int(pos[i]) + 1
        while end < n and his[end] == hi[i]:
            end += 1
        pos[i] += np.searchsorted(np.asarray(index["lo"][pos[i]:end]), lo[i])
    rec = index[np.minimum(pos, n - 1)]
    return rec["row"], (pos < n) & (rec["hi"] == hi) & (rec["lo"] == lo)


# ---------------------------------------------------------------------- serving copies


def _read_meta(directory: str) -> Optional[dict[str, Any]]:
    """A version's index metadata, or None when it is absent, of another format, or lost a segment."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    if meta.get("format") != FORMAT or meta.get("index_format") != INDEX_FORMAT:
        return None
    seg_root = os.path.join(os.path.dirname(directory), SEGMENTS)
    if not all(os.path.isdir(os.path.join(seg_root, sid)) for sid, _ in meta["segments"]):
        return None  # pruned under it (kept too long unopened): rebuilt on open
    return meta


@contextlib.contextmanager
def _one_builder(root: str) -> Iterator[None]:
    """Hold the serving root's build lock: one build per node (a serving root is on local disk),
    however many processes open the table; the others wait, then open the copy it built. The
    lock is the kernel's (flock): a builder that dies releases it."""
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, ".build.lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _kept_versions(root: str) -> list[str]:
    try:
        return [d for d in os.listdir(root) if not d.startswith(".") and _read_meta(os.path.join(root, d))]
    except FileNotFoundError:
        return []


def _prune(root: str, keep: int, protect: str) -> None:
    """Keep the newest ``keep`` versions' indexes, and the segments some kept version uses."""
    kept = [d for d in _kept_versions(root) if d != protect]
    kept.sort(key=lambda d: os.path.getmtime(os.path.join(root, d)), reverse=True)
    for d in kept[keep - 1 :]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    used = set()
    for d in _kept_versions(root):
        used.update(sid for sid, _ in (_read_meta(os.path.join(root, d)) or {}).get("segments", []))
    seg_root = os.path.join(root, SEGMENTS)
    try:
        names = os.listdir(seg_root)
    except FileNotFoundError:
        return
    now = time.time()
    for sid in names:
        full = os.path.join(seg_root, sid)
        if sid not in used and not sid.startswith(".") and now - os.path.getmtime(full) > SEGMENT_GRACE_S:
            shutil.rmtree(full, ignore_errors=True)


def segment_id(shard_sha256: str) -> str:
    """A shard's segment: named by its content (and the layout), so any version listing it shares it."""
    return hashlib.sha256(f"{FORMAT}:{shard_sha256}".encode()).hexdigest()[:24]


def _column_specs(schema: pa.Schema, where: str) -> dict[str, dict[str, Any]]:
    """The stored columns of a shard's schema: dtype and width each, plus the served shape/encoding."""
    specs: dict[str, dict[str, Any]] = {}
    encoding = patch_encoding_of(schema)
    for c in STORED_COLUMNS:
        if c not in schema.names:
            continue
        t = schema.field(c).type
        value_ok = pa.types.is_fixed_size_list(t) and t.list_size > 0 and t.value_type in VALUE_TYPES.values()
        if not value_ok:
            raise SchemaError(f"{where}: column '{c}' has type {t}, expected a fixed_size_list of float16, float32 or int8")
        specs[c] = {"dtype": str(t.value_type.to_pandas_dtype().__name__), "width": t.list_size}
    if "patch_tokens" in specs:
        ps = patch_shape_of(schema)
        if ps is None or ps[0] * ps[1] != specs["patch_tokens"]["width"]:
            raise SchemaError(f"{where}: patch_tokens without a matching lingcloud.patch_tokens_shape")
        try:
            enc = codec(encoding)
        except ValueError as err:
            raise SchemaError(f"{where}: {err}") from None
        if enc.dtype != specs["patch_tokens"]["dtype"] or (enc.scaled != ("patch_scales" in specs)) or (
            enc.scaled and specs["patch_scales"]["width"] != enc.scale_width(ps)
        ):
            raise SchemaError(f"{where}: patch_tokens/patch_scales do not match lingcloud.patch_encoding {encoding!r}")
    return specs


def _vector_values(batch: pa.RecordBatch, column: str, width: int) -> np.ndarray:
    values = batch.column(column).flatten().to_numpy(zero_copy_only=False)
    return values.reshape(batch.num_rows, width)


def _build_segment(reader: TableReader, name: str, sid: str, seg_root: str, specs: dict[str, dict[str, Any]]) -> None:
    """One shard's segment: its successful rows' uids and stored columns, in shard order.

    The columns stream a row group at a time into their ``.npy`` files (the row count is known
    from the uid pass), so memory follows the row group, not the shard."""
    where = f"{reader.path}/{name}"
    with fsspec.open(reader.file(name), "rb") as f:
        pf = pq.ParquetFile(f)
        reader.table.check(pf.schema_arrow, where)
        got = _column_specs(pf.schema_arrow, where)
        if got != specs:  # every shard of a run has one schema; another one is a table mixing two runs
            raise SchemaError(f"{where}: stored columns {got} differ from the table's first shard's {specs}")
        t = pf.read(columns=["uid", "status"])
        by_status = {vc["values"]: vc["counts"] for vc in pc.value_counts(t.column("status")).to_pylist()}
        ok = pc.equal(t.column("status"), SUCCESS).to_numpy(zero_copy_only=False)
        uids = t.column("uid").filter(pa.array(ok))
        keys, valid = uid_keys(uids)
        if not valid.all():
            bad = uids.combine_chunks().filter(pa.array(~valid))[0].as_py()
            raise SchemaError(f"{where}: column 'uid' holds {bad!r}, not a {UID_LEN}-hex-digit uid")
        rows = int(ok.sum())
        tmp = os.path.join(seg_root, f".tmp-{sid}-{uuid.uuid4().hex[:8]}")
        os.makedirs(tmp)
        try:
            np.save(os.path.join(tmp, "uid_hi.npy"), np.ascontiguousarray(keys["hi"]))
            np.save(os.path.join(tmp, "uid_lo.npy"), np.ascontiguousarray(keys["lo"]))
            outs = {}
            for c, spec in specs.items():
                outs[c] = open(os.path.join(tmp, f"{c}.npy"), "wb")
                np.lib.format.write_array_header_1_0(outs[c], {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(spec["dtype"])), "fortran_order": False,
                    "shape": (rows, spec["width"])})
            try:
                start = 0
                for batch in pf.iter_batches(columns=list(specs), batch_size=4096):
                    keep = ok[start:start + batch.num_rows]
                    start += batch.num_rows
                    batch = batch if keep.all() else batch.filter(pa.array(keep))
                    for c, spec in specs.items():
                        outs[c].write(_vector_values(batch, c, spec["width"]).astype(spec["dtype"], copy=False).tobytes())
            finally:
                for out in outs.values():
                    out.close()
            with open(os.path.join(tmp, "segment.json"), "w") as fj:
                json.dump({"format": FORMAT, "shard": name, "rows": rows, "by_status": by_status}, fj)
            try:
                os.rename(tmp, os.path.join(seg_root, sid))
            except OSError:  # another process built the same segment first: keep theirs
                if not os.path.isdir(os.path.join(seg_root, sid)):
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _segment_info(seg_root: str, sid: str) -> dict[str, Any]:
    with open(os.path.join(seg_root, sid, "segment.json")) as f:
        return json.load(f)


def _write_index(reader: TableReader, seg_root: str, sids: list[str], folder: str) -> int:
    """The serving copy's index in ``folder``: every segment's uids, sorted, and for each its row
    (its position in the segments laid end to end). Returns the row count; a uid in two
    successful rows is an error naming it.

    Memory is bounded whatever the row count: ``INDEX_SORT_ROWS`` rows are sorted at a time
    (about 50 bytes a row at peak); a larger table's sorted runs go to files in ``folder`` and
    are merged ``MERGE_ROWS`` records a run at a time into the index. Everything is read and
    written with plain reads and writes: mapped file pages would count in the build's resident
    memory as they are touched."""
    words = [[os.path.join(seg_root, sid, f"uid_{w}.npy") for w in ("hi", "lo")] for sid in sids]
    sizes = []
    for hi_file, _ in words:
        with open(hi_file, "rb") as f:
            sizes.append(_npy_header(f, hi_file)[0][0])
    offsets = np.cumsum([0] + sizes, dtype=np.int64)
    total = int(offsets[-1])
    runs: list[_Run] = []
    for k, start in enumerate(range(0, total, INDEX_SORT_ROWS)):
        records = _sorted_run(words, offsets, start, min(total, start + INDEX_SORT_ROWS))
        if total > INDEX_SORT_ROWS:  # one of several: spilled, read back a block at a time by the merge
            spilled = os.path.join(folder, f".run-{k:05d}.npy")
            np.save(spilled, records)
            with open(spilled, "rb") as f:
                offset = _npy_header(f, spilled)[2]
            runs.append(_Run(records.size, path=spilled, offset=offset))
        else:
            runs.append(_Run(records.size, records=records))
        del records
    fence, written, last = [], 0, None
    with open(os.path.join(folder, "uid_index.npy"), "wb") as f:
        np.lib.format.write_array_header_1_0(f, {
            "descr": np.lib.format.dtype_to_descr(INDEX_RECORD), "fortran_order": False, "shape": (total,)})
        for block in _merge(runs):
            both = block if last is None else np.concatenate([last, block])
            hi, lo = both["hi"], both["lo"]
            dup = np.flatnonzero((hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1]))
            if dup.size:
                raise SchemaError(f"{reader.path}: uid {key_to_uid(hi[dup[0]], lo[dup[0]])} appears in more than one successful row")
            fence.append(block["hi"][(-written) % FENCE_ROWS::FENCE_ROWS])  # every FENCE_ROWS-th record of the index
            f.write(block.tobytes())
            written += block.size
            last = block[-1:].copy()
    for run in runs:
        if run.path:
            os.remove(run.path)
    np.save(os.path.join(folder, "uid_fence.npy"), np.concatenate(fence) if fence else np.zeros(0, np.uint64))
    return total  # FENCE_ROWS goes in meta.json


@dataclass
class _Run:
    """A sorted run of index records: in memory (a table's only run), or spilled to an ``.npy`` file."""

    size: int
    records: Optional[np.ndarray] = None
    path: str = ""
    offset: int = 0  # of the first record in ``path``

    def read(self, pos: int, count: int) -> np.ndarray:
        if self.records is not None:
            return self.records[pos:pos + count]
        return np.fromfile(self.path, INDEX_RECORD, count=min(count, self.size - pos), offset=self.offset + pos * INDEX_RECORD.itemsize)


def _sorted_run(words: list[list[str]], offsets: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``INDEX_RECORD``s of the global rows ``start .. stop - 1``, sorted by (hi, lo); ``words``
    has each segment's ``uid_hi.npy`` and ``uid_lo.npy`` (read whole: a segment is one shard's)."""
    first = int(np.searchsorted(offsets, start, side="right")) - 1
    last = int(np.searchsorted(offsets, stop, side="left"))
    keys = np.empty(stop - start, dtype=UID_KEY)
    for j, w in enumerate(("hi", "lo")):
        keys[w] = np.concatenate([np.load(words[i][j])[max(0, start - offsets[i]):stop - offsets[i]] for i in range(first, last)])
    order = key_order(keys)
    run = np.empty(order.size, INDEX_RECORD)
    run["hi"], run["lo"], run["row"] = keys["hi"][order], keys["lo"][order], order + start
    return run


def _merge(runs: list[_Run]) -> Iterator[np.ndarray]:
    """The records of sorted ``runs``, in order, in blocks: each step reads up to ``MERGE_ROWS``
    records from each run and passes on those up to the smallest of the blocks' last keys (no
    record still unread can sort before them), so memory is ``MERGE_ROWS`` records a run."""
    pos = [0] * len(runs)
    while True:
        blocks = {i: r.read(pos[i], MERGE_ROWS) for i, r in enumerate(runs) if pos[i] < r.size}
        if not blocks:
            return
        top = min((int(b["hi"][-1]), int(b["lo"][-1])) for b in blocks.values())
        parts = []
        for i, b in blocks.items():
            his = b["hi"]
            n = int(np.searchsorted(his, np.uint64(top[0]), side="left"))
            tie = int(np.searchsorted(his, np.uint64(top[0]), side="right"))
            n += int(np.searchsorted(b["lo"][n:tie], np.uint64(top[1]), side="right"))
            parts.append(b[:n])
            pos[i] += n
        out = np.concatenate(parts)
        yield out if len(parts) == 1 else out[key_order(out)]


def _build(reader: TableReader, version: str, root: str) -> None:
    """The serving copy of ``reader``'s table for ``version``: the segments it lacks, then its index."""
    seg_root = os.path.join(root, SEGMENTS)
    os.makedirs(seg_root, exist_ok=True)
    names = reader.shard_names
    schema = reader.check_file(names[0]) if names else None
    specs = _column_specs(schema, f"{reader.path}/{names[0]}") if schema is not None else {}
    segs, built = [], 0
    for name in names:
        sid = segment_id(reader.manifest.shards[name].sha256)
        if not os.path.isfile(os.path.join(seg_root, sid, "segment.json")):
            _build_segment(reader, name, sid, seg_root, specs)
            built += 1
        else:
            os.utime(os.path.join(seg_root, sid))  # in use again: not pruned as stale
        segs.append((sid, _segment_info(seg_root, sid)))
    tmp = os.path.join(root, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        total = _write_index(reader, seg_root, [sid for sid, _ in segs], tmp)
        by_status = dict(sum_counts(info["by_status"] for _, info in segs))
        columns: dict[str, dict[str, Any]] = {}
        if "embedding" in specs:
            columns["embedding"] = {"dtype": specs["embedding"]["dtype"], "shape": [specs["embedding"]["width"]]}
        if "patch_tokens" in specs:
            enc = codec(patch_encoding_of(schema))
            columns["patch_tokens"] = {
                "dtype": "float32" if enc.scaled else enc.dtype, "shape": list(patch_shape_of(schema)),
                "encoding": enc.name, "pool": patch_pool_of(schema),
            }
        meta = {
            "format": FORMAT,
            "index_format": INDEX_FORMAT,
            "fence_rows": FENCE_ROWS,
            "version": version,
            "table": reader.path,
            "rows": total,
            "table_rows": sum(by_status.values()),
            "by_status": by_status,
            "columns": columns,
            "stored": specs,
            "segments": [[sid, int(info["rows"])] for sid, info in segs],
            "segments_built": built,
            "metadata": dict(reader.manifest.metadata),
            "shards": {n: s.sha256 for n, s in reader.manifest.shards.items()},
            "built": time.time(),
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        final = os.path.join(root, version)
        if os.path.isdir(final) and _read_meta(final) is None:  # an older index layout, or it lost a segment
            stale = os.path.join(root, f".tmp-stale-{version}-{uuid.uuid4().hex[:8]}")
            os.rename(final, stale)  # a reader still mapping its files keeps them until it closes
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished the same copy first: keep theirs
            if _read_meta(os.path.join(root, version)) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
