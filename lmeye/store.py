"""The feature store: random reads of a `features` table by uid.

Parquet stays the table of record. Random reads come from a *serving copy* that the store builds
from it on first open and keeps in step with the manifest:

* ``uid_hi.npy`` / ``uid_lo.npy``: every successful row's 128-bit uid (``lmeye.uid``) as two
  ``uint64`` words, sorted by (hi, lo): 16 bytes a row, memory-mapped, searched with
  ``np.searchsorted`` on ``hi`` (ties, ~3 in 10^10 rows, resolved on ``lo``); no Python object
  per row, so 100M rows are a 1.6 GB pair of files of which a lookup touches a few pages;
* ``<column>.npy``: the fixed-width columns (``embedding``, ``patch_tokens`` when the table has
  them) in the same uid order, memory-mapped, read with one gather per request;
* ``meta.json``: the version it was built from, row count, column shapes and the model metadata.

**Versions.** A table's version is a digest of its schema version and every shard's sha256 in
the manifest, so any rewrite of any shard gives a new version. The serving copy lives in
``<table>/_serving/<version>/`` (or under ``cache_dir`` for tables on object stores), built into
a temporary directory and renamed, so concurrent openers never see half a copy; a per-root file
lock makes the processes of one node (train workers, predict actors) build it once, not each. Opening a table
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

from lmeye.tables import Manifest, TableReader
from lmeye.uid import UID_KEY, UID_LEN, key_order, key_to_uid, locate, uid_keys
from schemas import SchemaError
from schemas.features import FEATURES, SUCCESS, _is_vector, patch_shape_of

SERVING = "_serving"
VECTOR_COLUMNS = ("embedding", "patch_tokens")
FORMAT = 2  # serving-copy layout version (2: 128-bit uids as uid_hi/uid_lo)
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


def _load(path: str) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r")
    except ValueError:  # an empty array cannot be memory-mapped
        return np.load(path)


def _is_local(path: str) -> bool:
    fs, _ = fsspec.core.url_to_fs(path)
    return "file" in (fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,))


def _default_serving_root(path: str, cache_dir: Optional[str]) -> str:
    if cache_dir:
        key = hashlib.sha256(path.encode()).hexdigest()[:12]
        return os.path.join(cache_dir, key)
    if _is_local(path):
        _, root = fsspec.core.url_to_fs(path)
        return os.path.join(root, SERVING)
    return os.path.join(os.path.expanduser("~/.cache/lingcloud/serving"), hashlib.sha256(path.encode()).hexdigest()[:12])


class FeatureStore:
    """Random reads of a finished `features` table by uid. Open with ``FeatureStore.open``."""

    def __init__(self, path: str, serving_dir: str, meta: dict[str, Any], current: bool):
        self.path = path
        self.serving_dir = serving_dir
        self._meta = meta
        self.version: str = meta["version"]
        self.current = current  # False: a pinned older version served from its kept copy
        self._hi = _load(os.path.join(serving_dir, "uid_hi.npy"))
        self._lo = _load(os.path.join(serving_dir, "uid_lo.npy"))
        self._cols = {c: _load(os.path.join(serving_dir, f"{c}.npy")) for c in meta["columns"]}

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        version: Optional[str] = None,
        *,
        cache_dir: Optional[str] = None,
        keep_versions: int = 2,
    ) -> "FeatureStore":
        """Open the table at ``path``, building its serving copy if it has none for this version.

        ``version`` pins a version (see ``FeatureStore.version``); ``cache_dir`` puts serving
        copies elsewhere (default: ``<table>/_serving`` for local tables, ~/.cache otherwise).
        """
        path = str(path)
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
                return cls(path, os.path.join(root, version), meta, current=False)
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
        return cls(path, target, meta, current=True)

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
        return int(self._hi.shape[0])

    def __len__(self) -> int:
        return self.num_rows

    def info(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "version": self.version,
            "current": self.current,
            "rows_served": self.num_rows,
            "table_rows": self._meta["table_rows"],
            "by_status": self._meta.get("by_status", {}),
            "columns": {c: {"dtype": v["dtype"], "shape": v["shape"]} for c, v in self._meta["columns"].items()},
            "metadata": self.metadata,
            "serving_copy": self.serving_dir,
        }

    # ------------------------------------------------------------------ reads
    def _locate(self, uids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        keys, valid = uid_keys(uids)
        pos, found = locate(self._hi, self._lo, keys)
        return pos, found & valid

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
            if c not in self._cols:
                raise KeyError(f"column {c!r} is not in {self.path} (has: {', '.join(self._cols)})")
        if on_missing not in ("raise", "mask"):
            raise ValueError(f"on_missing must be 'raise' or 'mask', not {on_missing!r}")
        pos, found = self._locate(uids)
        if on_missing == "raise" and not found.all():
            raise MissingUidError([u for u, ok in zip(uids, found) if not ok], f"{self.path} (version {self.version})")
        rows = pos[found]
        order = np.argsort(rows, kind="stable")  # read the memory map front to back
        out: dict[str, np.ndarray] = {}
        for c in columns:
            src = self._cols[c]
            taken = np.empty((rows.size,) + src.shape[1:], dtype=src.dtype)
            taken[order] = src[rows[order]]
            full = taken if found.all() else np.zeros((len(uids),) + src.shape[1:], dtype=src.dtype)
            if not found.all():
                full[found] = taken
            shape = self._meta["columns"][c]["shape"]
            out[c] = full.reshape((len(uids), *shape))
        return FeatureBatch(uids=uids, found=found, columns=out)


# ---------------------------------------------------------------------- serving copies


def _read_meta(directory: str) -> Optional[dict[str, Any]]:
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta = json.load(f)
    except (FileNotFoundError, NotADirectoryError, ValueError):
        return None
    return meta if meta.get("format") == FORMAT else None


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
    kept = [d for d in _kept_versions(root) if d != protect]
    kept.sort(key=lambda d: os.path.getmtime(os.path.join(root, d)), reverse=True)
    for d in kept[keep - 1 :]:
        shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def _vector_values(table: pa.Table, column: str, width: int) -> np.ndarray:
    arr = table.column(column).combine_chunks()
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return values.reshape(len(arr), width)


def _build(reader: TableReader, version: str, root: str) -> None:
    """Write the serving copy of ``reader``'s table for ``version`` (two passes over the shards)."""
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp-{version}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        names = reader.shard_names
        # schema facts from the first shard (every shard was written with the same run schema)
        columns: dict[str, dict[str, Any]] = {}
        schema = reader.check_file(names[0]) if names else None
        if schema is not None:
            for c in VECTOR_COLUMNS:
                if c in schema.names:
                    t = schema.field(c).type
                    if not _is_vector(t):
                        raise SchemaError(f"{reader.path}/{names[0]}: column '{c}' has type {t}, expected fixed_size_list<float16 or float32>")
                    shape = [t.list_size]
                    if c == "patch_tokens":
                        ps = patch_shape_of(schema)
                        if ps is None or ps[0] * ps[1] != t.list_size:
                            raise SchemaError(f"{reader.path}/{names[0]}: patch_tokens without a matching lingcloud.patch_tokens_shape")
                        shape = list(ps)
                    columns[c] = {"dtype": str(t.value_type.to_pandas_dtype().__name__), "shape": shape, "width": t.list_size}
        # pass 1: uids of successful rows, per shard
        keys, counts, table_rows, by_status = [], [], 0, {}
        for name in names:
            t = reader.read_shard(name, columns=["uid", "status"])
            table_rows += t.num_rows
            for vc in pc.value_counts(t.column("status")).to_pylist():
                by_status[vc["values"]] = by_status.get(vc["values"], 0) + vc["counts"]
            ok = pc.equal(t.column("status"), SUCCESS)
            k, valid = uid_keys(t.column("uid").filter(ok))
            if not valid.all():
                bad = t.column("uid").filter(ok).combine_chunks().filter(pa.array(~valid))[0].as_py()
                raise SchemaError(f"{reader.path}/{name}: column 'uid' holds {bad!r}, not a {UID_LEN}-hex-digit uid")
            keys.append(k)
            counts.append(k.size)
        all_keys = np.concatenate(keys) if keys else np.zeros(0, UID_KEY)
        order = key_order(all_keys)
        hi = all_keys["hi"][order]
        lo = all_keys["lo"][order]
        if hi.size > 1:
            dup = np.flatnonzero((hi[1:] == hi[:-1]) & (lo[1:] == lo[:-1]))
            if dup.size:
                raise SchemaError(f"{reader.path}: uid {key_to_uid(hi[dup[0]], lo[dup[0]])} appears in more than one successful row")
        dest = np.empty_like(order)
        dest[order] = np.arange(order.size)
        del all_keys, order
        np.save(os.path.join(tmp, "uid_hi.npy"), hi)
        np.save(os.path.join(tmp, "uid_lo.npy"), lo)
        total = int(hi.size)
        del hi, lo
        # pass 2: vector columns scattered into uid order
        outs = {}
        for c, spec in columns.items():
            dtype = np.dtype(spec["dtype"])
            outs[c] = np.lib.format.open_memmap(os.path.join(tmp, f"{c}.npy"), mode="w+", dtype=dtype, shape=(total, spec["width"])) if total else None
            if not total:
                np.save(os.path.join(tmp, f"{c}.npy"), np.zeros((0, spec["width"]), dtype=dtype))
        start = 0
        for name, n in zip(names, counts):
            if n and outs:
                t = reader.read_shard(name, columns=["status", *columns])
                t = t.filter(pc.equal(t.column("status"), SUCCESS))
                where = dest[start : start + n]
                for c, spec in columns.items():
                    outs[c][where] = _vector_values(t, c, spec["width"])
            start += n
        for arr in outs.values():
            if arr is not None:
                arr.flush()
        del outs
        meta = {
            "format": FORMAT,
            "version": version,
            "table": reader.path,
            "rows": total,
            "table_rows": table_rows,
            "by_status": by_status,
            "columns": {c: {"dtype": v["dtype"], "shape": v["shape"]} for c, v in columns.items()},
            "metadata": dict(reader.manifest.metadata),
            "shards": {n: s.sha256 for n, s in reader.manifest.shards.items()},
            "built": time.time(),
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1, sort_keys=True)
        try:
            os.rename(tmp, os.path.join(root, version))
        except OSError:  # another process finished the same copy first: keep theirs
            if _read_meta(os.path.join(root, version)) is None:
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
