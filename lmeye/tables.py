"""Table I/O shared by every stage.

A table is a directory of Parquet shards plus ``_manifest.json``. The rules that make
stages killable and rerunnable:

* a shard is written under a temporary name and renamed when complete, so a reader never
  sees half a shard and a rerun can trust every ``*.parquet`` it finds;
* only the driver writes the manifest (``TableWriter``); workers may write shards with
  ``write_shard`` and hand the returned ``ShardInfo`` back to it;
* a shard counts as finished when the manifest lists it with the current config
  fingerprint and the same input fingerprint, and its file is there with the recorded
  size. Anything else is stale and gets redone.

All paths go through fsspec, so ``s3://``, ``gs://`` and local paths behave alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

import lmeye
from lmeye import provenance
from schemas import SchemaError, TableSchema

MANIFEST = "_manifest.json"
SHARD_SUFFIX = ".parquet"


class OutputNotWritable(OSError):
    """The output location cannot be written; raised before any work starts."""


def fingerprint(obj: Any) -> str:
    """A short, stable digest of any JSON-serialisable value (configs, input listings)."""
    blob = json.dumps(obj, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    """Package version plus the git commit when running from a checkout."""
    here = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{lmeye.__version__}+{sha}" if sha else lmeye.__version__


def _join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


@dataclass
class ShardInfo:
    name: str  # file name inside the table directory, e.g. "00003.parquet"
    rows: int
    bytes: int
    sha256: str
    inputs: list[str] = field(default_factory=list)  # input shards this one was derived from
    input_fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)


class _HashingFile:
    """A write-only file wrapper that counts and hashes what passes through (for ShardInfo)."""

    def __init__(self, f):
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0
        self.closed = False

    def write(self, data) -> int:
        data = bytes(data)
        self.sha.update(data)
        self.size += len(data)
        self.f.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.f.flush()

    def writable(self) -> bool:
        return True

    def close(self) -> None:
        if not self.closed:
            self.f.close()
            self.closed = True


class ShardWriter:
    """One shard written as its rows arrive: a temporary name, row groups, a rename on close.

    Safe on any worker: it touches only its own file. ``close`` describes the shard for the
    manifest; ``abort`` removes the temporary file (``TableWriter.finalize`` sweeps any left).
    """

    def __init__(self, path: str, name: str, schema: pa.Schema, *, compression: str | dict[str, str] = "zstd"):
        self.fs, root = fsspec.core.url_to_fs(path)
        self.name = name
        self.final = _join(root, name)
        self.tmp = _join(root, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
        self.file = _HashingFile(self.fs.open(self.tmp, "wb"))
        self.writer = pq.ParquetWriter(self.file, schema, compression=compression)
        self.rows = 0

    def write(self, table: pa.Table, row_group_size: int | None = None) -> None:
        self.writer.write_table(table, row_group_size=row_group_size)
        self.rows += table.num_rows

    def close(
        self, *, inputs: Iterable[str] = (), input_fingerprint: str = "", stats: dict[str, Any] | None = None
    ) -> ShardInfo:
        self.writer.close()
        self.file.close()
        self.fs.mv(self.tmp, self.final)
        return ShardInfo(
            name=self.name, rows=self.rows, bytes=self.file.size, sha256=self.file.sha.hexdigest(),
            inputs=list(inputs), input_fingerprint=input_fingerprint, stats=dict(stats or {}),
        )

    def abort(self) -> None:
        try:
            self.writer.close()
            self.file.close()
            self.fs.rm_file(self.tmp)
        except Exception:  # noqa: BLE001 - best effort; finalize() of a later run removes leftovers
            pass


def write_shard(
    path: str,
    name: str,
    table: pa.Table,
    *,
    inputs: Iterable[str] = (),
    input_fingerprint: str = "",
    stats: dict[str, Any] | None = None,
    row_group_size: int | None = None,
    compression: str | dict[str, str] = "zstd",
) -> ShardInfo:
    """Write one whole shard atomically (temporary name, then rename) and describe it."""
    writer = ShardWriter(path, name, table.schema, compression=compression)
    writer.write(table, row_group_size=row_group_size)
    return writer.close(inputs=inputs, input_fingerprint=input_fingerprint, stats=stats)


@dataclass
class Manifest:
    table: str
    schema_version: int
    config_fingerprint: str = ""
    input_fingerprint: str = ""
    code_version: str = ""
    complete: bool = False
    shards: dict[str, ShardInfo] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)  # table-level facts (model name, dims...)
    config: dict[str, Any] = field(default_factory=dict)
    updated: float = 0.0
    provenance: dict[str, Any] = field(default_factory=dict)  # stage, inputs, run config: lmeye/provenance.py

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards.values())

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True, default=str)

    @classmethod
    def from_json(cls, text: str, where: str) -> "Manifest":
        try:
            raw = json.loads(text)
            raw["shards"] = {k: ShardInfo(**v) for k, v in raw.get("shards", {}).items()}
            return cls(**raw)
        except (ValueError, TypeError) as err:
            raise SchemaError(f"{where}: unreadable manifest ({err})") from None

    @classmethod
    def load(cls, path: str) -> "Manifest | None":
        fs, root = fsspec.core.url_to_fs(path)
        where = _join(path, MANIFEST)
        try:
            text = fs.cat_file(_join(root, MANIFEST)).decode()
        except FileNotFoundError:
            return None
        return cls.from_json(text, where)

    def save(self, path: str) -> None:
        fs, root = fsspec.core.url_to_fs(path)
        self.updated = time.time()
        tmp = _join(root, f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}")
        fs.pipe_file(tmp, self.to_json().encode())
        fs.mv(tmp, _join(root, MANIFEST))


def ensure_writable(path: str) -> None:
    """Create ``path`` and prove a file can be written there, or raise OutputNotWritable."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        fs.makedirs(root, exist_ok=True)
        probe = _join(root, f".write-probe-{uuid.uuid4().hex[:8]}")
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except (OSError, PermissionError, ValueError) as err:
        raise OutputNotWritable(f"{path}: output is not writable ({err.__class__.__name__}: {err})") from None


class TableWriter:
    """The driver's view of one output table: which shards are done, and the manifest."""

    def __init__(
        self,
        path: str,
        table: TableSchema,
        *,
        config: dict[str, Any],
        input_fingerprint: str = "",
    ):
        ensure_writable(path)
        self.path = path
        self.fs, self.root = fsspec.core.url_to_fs(path)
        cfg_fp = fingerprint(config)
        old = Manifest.load(path)
        if old is not None and (old.table != table.name or old.schema_version != table.version):
            raise SchemaError(
                f"{_join(path, MANIFEST)}: holds a {old.table} v{old.schema_version} table, "
                f"refusing to overwrite it with {table.name} v{table.version}"
            )
        run = provenance.for_output(path)
        if run is not None and run.keep_versions and old is not None and old.shards and old.config_fingerprint != cfg_fp:
            raise provenance.ConfigChanged(path, old.config_fingerprint, cfg_fp)
        keep = old.shards if old is not None and old.config_fingerprint == cfg_fp else {}
        self.stale = set(old.shards) - set(keep) if old is not None else set()
        self.manifest = Manifest(
            table=table.name,
            schema_version=table.version,
            config_fingerprint=cfg_fp,
            input_fingerprint=input_fingerprint,
            code_version=code_version(),
            shards=dict(keep),
            config=config,
            metadata=dict(old.metadata) if old is not None and keep else {},
            provenance=dict(run.record) if run is not None else {},
        )
        self.manifest.save(path)

    def is_done(self, name: str, input_fingerprint: str = "") -> bool:
        info = self.manifest.shards.get(name)
        if info is None or info.input_fingerprint != input_fingerprint:
            return False
        try:
            return self.fs.size(_join(self.root, name)) == info.bytes
        except FileNotFoundError:
            return False

    def done_shards(self) -> dict[str, ShardInfo]:
        return {n: s for n, s in self.manifest.shards.items() if self.is_done(n, s.input_fingerprint)}

    def record(self, info: ShardInfo) -> None:
        """Add a shard written by ``write_shard`` (here or on a worker) and persist the manifest."""
        self.manifest.shards[info.name] = info
        self.manifest.complete = False
        self.manifest.save(self.path)

    def write(self, name: str, table: pa.Table, **kwargs: Any) -> ShardInfo:
        info = write_shard(self.path, name, table, **kwargs)
        self.record(info)
        return info

    def finalize(self, expected: Iterable[str], stats: dict[str, Any], metadata: dict[str, str] | None = None) -> Manifest:
        """Drop shards that are not part of this run's result, then mark the table complete."""
        expected = set(expected)
        for name in list(self.manifest.shards):
            if name not in expected:
                del self.manifest.shards[name]
        for f in self.fs.glob(_join(self.root, "*" + SHARD_SUFFIX)) + self.fs.glob(_join(self.root, ".*.tmp-*")):
            if os.path.basename(f) not in expected:
                self.fs.rm_file(f)
        missing = expected - set(self.manifest.shards)
        if missing:
            raise RuntimeError(f"{self.path}: shards never written: {sorted(missing)[:5]}")
        self.manifest.stats = stats
        if metadata:
            self.manifest.metadata.update(metadata)
        self.manifest.complete = True
        self.manifest.save(self.path)
        return self.manifest


class TableReader:
    """Read a finished table, checking the contract before handing out data."""

    def __init__(self, path: str, table: TableSchema, *, require_complete: bool = True):
        self.path = path
        self.table = table
        self.fs, self.root = fsspec.core.url_to_fs(path)
        manifest = Manifest.load(path)
        where = _join(path, MANIFEST)
        if manifest is None:
            raise SchemaError(f"{where}: not found; is {path} a {table.name} table written by LingCloud?")
        if manifest.table != table.name:
            raise SchemaError(f"{where}: this is a '{manifest.table}' table, expected '{table.name}'")
        if manifest.schema_version != table.version:
            raise SchemaError(
                f"{where}: {table.name} schema version {manifest.schema_version}, "
                f"this code reads version {table.version}"
            )
        if require_complete and not manifest.complete:
            raise SchemaError(f"{where}: the table is incomplete (its stage has not finished); rerun the stage")
        self.manifest = manifest

    @property
    def shard_names(self) -> list[str]:
        return sorted(self.manifest.shards)

    @property
    def files(self) -> list[str]:
        """Full paths (with protocol) of every shard, in a stable order."""
        return [_join(self.path, n) for n in self.shard_names]

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    def check_file(self, name: str) -> pa.Schema:
        schema = pq.read_schema(self.fs.open(_join(self.root, name)))
        self.table.check(schema, _join(self.path, name))
        return schema

    def read_shard(self, name: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        with self.fs.open(_join(self.root, name)) as f:
            pf = pq.ParquetFile(f)
            self.table.check(pf.schema_arrow, _join(self.path, name))
            return pf.read(columns=columns) if filters is None else pq.read_table(f, columns=columns, filters=filters)

    def read(self, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        parts = [self.read_shard(n, columns, filters) for n in self.shard_names]
        if not parts:
            schema = self.table.schema
            return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables(parts, promote_options="default")


def open_table(path: str, table: TableSchema, **kwargs: Any) -> TableReader:
    return TableReader(path, table, **kwargs)
