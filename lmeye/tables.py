"""Table I/O shared by every stage.

A table is a directory of Parquet shards plus ``_manifest.json``. A stage names its shards
(``00003.parquet``, ``validation-00003-of-00016.parquet``); the file of a shard is its name
with the split prefix Hugging Face ``datasets`` reads (``shard_file``): ``train-00003.parquet``
for a table without splits. So ``datasets.load_dataset("parquet", data_dir=TABLE)`` takes the
shards and nothing else (not the manifest, not a feature store's ``_serving/`` copy), and
``TABLE/*.parquet`` is every shard for DuckDB, polars and pandas. The rules that make stages
killable and rerunnable:

* a shard is written under a temporary name and renamed when complete, so a reader never
  sees half a shard and a rerun can trust every ``*.parquet`` it finds. Object stores (S3)
  have no rename (a "move" copies, then deletes): there a shard is uploaded once under its
  final key, which S3 makes visible only when the upload completes (``commits_by_rename``);
* only the driver writes the manifest (``TableWriter``); workers may write shards with
  ``write_shard`` and hand the returned ``ShardInfo`` back to it;
* committing a shard adds one record to the table's journal (``lmeye/journal.py``: a line
  appended locally, one small object on object stores), so the 100,000th commit costs what
  the first does. ``_manifest.json`` is rewritten whole only
  when the writer opens a table and at ``finalize`` (compaction), each time under a new
  ``epoch``: ``Manifest.load`` merges the journal entries of the manifest's own epoch, so
  every reader sees the committed shards whether or not they were compacted yet, and a
  crash between a commit and the compaction loses nothing (entries of an older epoch were
  compacted already, and are ignored);
* a shard counts as finished when the manifest lists it with the current config
  fingerprint and the same input fingerprint, and its file is there with the recorded
  size and the store's version mark of the file as written (local mtime, S3 ETag, GCS
  generation), read from one folder listing: a rerun reads metadata, never the shards.
  Anything else is stale and gets redone. ``lmeye verify`` checks every sha256;
* a stage writes only into an empty folder or a table of its own kind, and removes only
  files its manifest lists or its own temporaries: never a file it did not write;
* a table built from other inputs or another content config is replaced only when the
  user says so (``overwrite``, the CLI's ``--overwrite``).

All paths go through fsspec, so ``s3://``, ``gs://`` and local paths behave alike.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import io
import json
import os
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

import lmeye
from lmeye.errors import OutputNotWritable, UserError
from lmeye import journal, provenance
from lmeye.journal import JOURNAL
from schemas import SchemaError, TableSchema

MANIFEST = "_manifest.json"
SHARD_SUFFIX = ".parquet"
# File-name prefixes Hugging Face `datasets` maps to splits; a shard name without one is "train".
SPLIT_PREFIXES = ("train-", "validation-", "test-")


def shard_file(name: str) -> str:
    """The file (inside the table directory) that holds shard ``name``: HF-split-prefixed."""
    return name if name.startswith(SPLIT_PREFIXES) else "train-" + name
STAGING = "_staging"  # a stage's scratch folder inside its output table


class NotATableFolder(UserError):
    """A path that should be a table folder is something else (a shard file, a user's folder)."""


class TableMismatch(UserError):
    """The output table was built from other inputs or another content config."""


# Set by the entry points for one stage run (`--overwrite`); a TableWriter created without an
# explicit ``overwrite`` argument follows it, so every stage honours the flag unchanged.
_OVERWRITE: contextvars.ContextVar[bool] = contextvars.ContextVar("lmeye_overwrite", default=False)


@contextlib.contextmanager
def overwriting(enabled: bool = True) -> Iterator[None]:
    """Within this block, TableWriter replaces a table built from other inputs or config."""
    token = _OVERWRITE.set(enabled)
    try:
        yield
    finally:
        _OVERWRITE.reset(token)


def _is_temporary(name: str) -> bool:
    """Files and folders a stage makes for itself and may always remove."""
    return name == STAGING or name.startswith(".write-probe-") or ".tmp-" in name


# The keys fsspec's file systems give a file's version in `info`/`ls(detail=True)`, in order of
# preference: GCS's generation and S3's ETag change with every write of the object; a local
# file's mtime (kept by the rename that commits it) changes when anything rewrites it.
VERSION_KEYS = ("generation", "ETag", "etag", "mtime", "LastModified", "last_modified", "updated")


def version_mark(info: dict[str, Any]) -> str:
    """The store's version mark of a file from its fsspec ``info`` (or a listing entry), or ""."""
    for key in VERSION_KEYS:
        value = info.get(key)
        if value not in (None, ""):
            return f"{key}:{value}"
    return ""


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


def is_local(where: str | fsspec.AbstractFileSystem) -> bool:
    """Whether a path (or a filesystem) is the local disk: the one test of it in the project."""
    fs = fsspec.core.url_to_fs(where)[0] if isinstance(where, str) else where
    return isinstance(fs, LocalFileSystem)


def commits_by_rename(fs: fsspec.AbstractFileSystem) -> bool:
    """Whether files are committed by an atomic rename (local disks) or by writing the final
    name once (object stores, whose objects appear whole when their upload completes)."""
    return is_local(fs)


@dataclass
class ShardInfo:
    name: str  # shard name, e.g. "00003.parquet"; its file is shard_file(name)
    rows: int
    bytes: int
    sha256: str
    inputs: list[str] = field(default_factory=list)  # input shards this one was derived from
    input_fingerprint: str = ""
    stats: dict[str, Any] = field(default_factory=dict)
    version: str = ""  # the store's version mark of the file as written (version_mark); "" if unknown


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

    def discard(self) -> None:
        """Abandon an object-store upload: nothing becomes visible. s3fs aborts a multipart
        upload; a buffered file marked closed never sends its last (or only) part."""
        if not self.closed:
            getattr(self.f, "discard", lambda: None)()
            with contextlib.suppress(AttributeError):
                self.f.closed = True
            self.f = io.BytesIO()  # the Parquet writer's last bytes go nowhere


class ShardWriter:
    """One shard written as its rows arrive: a temporary name, row groups, a rename on close
    (on object stores: the final key, committed by the upload's completion on close).

    Safe on any worker: it touches only its own file. ``close`` describes the shard for the
    manifest; ``abort`` removes the temporary file or abandons the upload (``TableWriter.finalize``
    sweeps any temporaries left).
    """

    def __init__(self, path: str, name: str, schema: pa.Schema, *, compression: str | dict[str, str] = "zstd"):
        self.fs, root = fsspec.core.url_to_fs(path)
        self.name = name
        self.final = _join(root, shard_file(name))
        self.by_rename = commits_by_rename(self.fs)
        self.tmp = _join(root, f".{name}.tmp-{uuid.uuid4().hex[:8]}") if self.by_rename else self.final
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
        if self.by_rename:
            self.fs.mv(self.tmp, self.final)
        self.fs.invalidate_cache(self.final)  # one HEAD (stat) for the version the store gave it
        return ShardInfo(
            name=self.name, rows=self.rows, bytes=self.file.size, sha256=self.file.sha.hexdigest(),
            inputs=list(inputs), input_fingerprint=input_fingerprint, stats=dict(stats or {}),
            version=version_mark(self.fs.info(self.final)),
        )

    def abort(self) -> None:
        try:
            if not self.by_rename:
                self.file.discard()
            self.writer.close()
            self.file.close()
            if self.by_rename:
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
    """Write one whole shard atomically (see ``ShardWriter``) and describe it."""
    writer = ShardWriter(path, name, table.schema, compression=compression)
    writer.write(table, row_group_size=row_group_size)
    return writer.close(inputs=inputs, input_fingerprint=input_fingerprint, stats=stats)


def file_sha256(fs: fsspec.AbstractFileSystem, path: str) -> str | None:
    """The sha256 of a file, read in 4 MiB blocks; None when it is not there."""
    sha = hashlib.sha256()
    try:
        with fs.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                sha.update(block)
    except FileNotFoundError:
        return None
    return sha.hexdigest()


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
    replaced_rows: int | None = None  # set when --overwrite replaced a table from other inputs/config
    provenance: dict[str, Any] = field(default_factory=dict)  # stage, inputs, run config: lmeye/provenance.py
    epoch: str = ""  # the journal records that belong to this manifest (lmeye/journal.py)

    @property
    def num_rows(self) -> int:
        return sum(s.rows for s in self.shards.values())

    def to_json(self) -> str:
        # No indent: json's C encoder only runs without one (a 100,000-shard manifest is ~100 MB),
        # and no deep-copying asdict of every shard.
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "shards"}
        raw["shards"] = {n: vars(s) for n, s in self.shards.items()}
        return json.dumps(raw, sort_keys=True, default=str, separators=(",", ":"))

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
        """The manifest with the shards committed since its last compaction merged in."""
        fs, root = fsspec.core.url_to_fs(path)
        where = _join(path, MANIFEST)
        try:
            text = fs.cat_file(_join(root, MANIFEST)).decode()
        except (FileNotFoundError, NotADirectoryError):
            check_not_a_file(path)
            return None
        manifest = cls.from_json(text, where)
        committed = journal.read(fs, root, manifest.epoch, path.rstrip("/"))
        if committed:
            for record in committed:
                info = ShardInfo(**record)
                manifest.shards[info.name] = info
            manifest.complete = False  # a commit after the last compaction: the stage is still running
        return manifest

    def save(self, path: str) -> None:
        """Write the whole manifest (a compaction); shard commits go to the journal instead."""
        fs, root = fsspec.core.url_to_fs(path)
        self.updated = time.time()
        _put_atomically(fs, _join(root, MANIFEST), self.to_json().encode())


def _put_atomically(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Readers see the old content or the new, never part: a rename locally, one PUT on object stores."""
    if not commits_by_rename(fs):  # one PUT replaces the object whole
        fs.pipe_file(path, data)
        return
    parent, name = path.rsplit("/", 1)
    tmp = _join(parent, f".{name}.tmp-{uuid.uuid4().hex[:8]}")
    fs.pipe_file(tmp, data)
    fs.mv(tmp, path)


def check_not_a_file(path: str) -> None:
    """One clear line when a file (say a shard) is given where a table folder is expected."""
    fs, root = fsspec.core.url_to_fs(path)
    if fs.isfile(root):
        parent = path.rstrip("/").rsplit("/", 1)[0] if "/" in path.rstrip("/") else "."
        raise NotATableFolder(
            f"{path}: is a file, not a table folder (a table is the folder holding {MANIFEST}; "
            f"did you mean {parent}?)"
        )


def ensure_writable(path: str, table: TableSchema | None = None) -> bool:
    """Create ``path`` and prove a file can be written there, or raise OutputNotWritable.

    With ``table``: refuse a folder that holds anything but a ``table`` table (its manifest)
    or a stage's own temporaries, before any work starts, so a stage never writes over or
    removes a user's files. Returns True when this call created the folder.
    """
    fs, root = fsspec.core.url_to_fs(path)
    try:
        existed = fs.exists(root)
    except (OSError, ValueError):
        existed = False
    if existed and table is not None:
        check_not_a_file(path)
        manifest = Manifest.load(path)
        if manifest is None:
            foreign = sorted(n for n in (os.path.basename(f.rstrip("/")) for f in fs.ls(root, detail=False))
                             if not _is_temporary(n) and n != JOURNAL)
            if foreign:
                raise OutputNotWritable(
                    f"{path}: not empty and not a {table.name} table (no {MANIFEST}; it holds "
                    f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                    "refusing to write there: choose a new or empty folder"
                )
        elif manifest.table != table.name:
            raise OutputNotWritable(
                f"{path}: holds a {manifest.table} table, not a {table.name} table; refusing to write there"
            )
    try:
        fs.makedirs(root, exist_ok=True)
        probe = _join(root, f".write-probe-{uuid.uuid4().hex[:8]}")
        fs.pipe_file(probe, b"ok")
        fs.rm_file(probe)
    except (OSError, PermissionError, ValueError) as err:
        raise OutputNotWritable(f"{path}: output is not writable ({err.__class__.__name__}: {err})") from None
    return not existed


def remove_temporaries(path: str, created: bool = False) -> None:
    """After a run that stopped: remove the stage's scratch folder, and the output folder itself
    when this run created it and nothing else was written there (no empty folders left behind)."""
    fs, root = fsspec.core.url_to_fs(path)
    staging = _join(root, STAGING)
    try:
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        if created and fs.exists(root) and not fs.ls(root, detail=False):
            fs.rmdir(root)
    except OSError:
        pass  # best effort: a later run cleans up the same way


class TableWriter:
    """The driver's view of one output table: which shards are done, and the manifest.

    An existing table built from other inputs or another content config is refused with one
    line naming both fingerprints, unless ``overwrite`` (default: the ``overwriting()``
    context, i.e. the CLI's ``--overwrite``); ``replaced_rows`` then counts the old rows
    that the new table does not keep.
    """

    def __init__(
        self,
        path: str,
        table: TableSchema,
        *,
        config: dict[str, Any],
        input_fingerprint: str = "",
        overwrite: bool | None = None,
    ):
        ensure_writable(path, table)
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
        overwrite = _OVERWRITE.get() if overwrite is None else overwrite
        self.overwrote = False
        if old is not None and old.shards and (old.config_fingerprint, old.input_fingerprint) != (cfg_fp, input_fingerprint):
            if not overwrite:
                what = "content config" if old.config_fingerprint != cfg_fp else "inputs"
                raise TableMismatch(
                    f"{path}: holds a {table.name} table built from other {what} "
                    f"(table: config {old.config_fingerprint}, inputs {old.input_fingerprint}; "
                    f"this run: config {cfg_fp}, inputs {input_fingerprint}); "
                    "pass --overwrite to replace it, or write to another folder"
                )
            self.overwrote = True
        self._old_shards = dict(old.shards) if old is not None else {}
        keep = old.shards if old is not None and old.config_fingerprint == cfg_fp else {}
        self.stale = set(old.shards) - set(keep) if old is not None else set()
        self._listing: dict[str, dict[str, Any]] | None = None  # file name -> fsspec info, one ls
        self._verified: set[tuple[str, str]] = set()  # (shard, sha256) committed or checked by this writer
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
        self.compact()

    def compact(self) -> None:
        """Write the whole manifest under a new epoch, then drop the journal it absorbed.

        O(shards), so only at the start and end of a run (and when a run stops early). A
        crash after the write leaves entries of the old epoch, which every reader ignores.
        """
        self.manifest.epoch = uuid.uuid4().hex[:12]
        self.manifest.save(self.path)
        journal.clear(self.fs, self.root)

    def listing(self, refresh: bool = False) -> dict[str, dict[str, Any]]:
        """The table folder's files (name -> fsspec info), from one listing kept until ``refresh``."""
        if self._listing is None or refresh:
            self.fs.invalidate_cache(self.root)
            self._listing = {os.path.basename(i["name"].rstrip("/")): i
                             for i in self.fs.ls(self.root, detail=True)}
        return self._listing

    def is_done(self, name: str, input_fingerprint: str = "") -> bool:
        """Listed for these inputs, and the file is there with the recorded size and version mark.

        Metadata only: the folder listing (``listing``), never the shard's bytes. A shard
        recorded before version marks were kept is hashed once, as before.
        """
        info = self.manifest.shards.get(name)
        if info is None or info.input_fingerprint != input_fingerprint:
            return False
        if (name, info.sha256) in self._verified:
            return True
        found = self.listing().get(shard_file(name))
        if found is None or found.get("size") != info.bytes:
            return False
        if info.version:
            ok = version_mark(found) == info.version
        else:
            ok = file_sha256(self.fs, _join(self.root, shard_file(name))) == info.sha256
        if ok:
            self._verified.add((name, info.sha256))
        return ok

    def done_shards(self) -> dict[str, ShardInfo]:
        return {n: s for n, s in self.manifest.shards.items() if self.is_done(n, s.input_fingerprint)}

    def record(self, info: ShardInfo) -> None:
        """Commit a shard written by ``write_shard`` (here or on a worker): one journal record,
        whatever the number of shards before it (``finalize`` compacts)."""
        journal.append(self.fs, self.root, self.manifest.epoch, asdict(info), appendable=commits_by_rename(self.fs))
        self.manifest.shards[info.name] = info
        self._verified.add((info.name, info.sha256))
        self.manifest.complete = False

    def write(self, name: str, table: pa.Table, **kwargs: Any) -> ShardInfo:
        info = write_shard(self.path, name, table, **kwargs)
        self.record(info)
        return info

    @property
    def replaced_rows(self) -> int:
        """Rows of the table found at the start that the table as it stands no longer holds."""
        now = self.manifest.shards
        return sum(s.rows for n, s in self._old_shards.items() if n not in now or now[n].sha256 != s.sha256)

    def finalize(self, expected: Iterable[str], stats: dict[str, Any], metadata: dict[str, str] | None = None) -> Manifest:
        """Drop shards that are not part of this run's result, then mark the table complete.

        Only files a manifest listed (this one or the one found at the start) and the stage's
        own temporary files are removed: anything else in the folder is not ours.
        """
        expected = set(expected)
        listed = set(self.manifest.shards) | set(self._old_shards)
        for name in list(self.manifest.shards):
            if name not in expected:
                del self.manifest.shards[name]
        for name in sorted(listed - expected):
            if self.fs.exists(_join(self.root, shard_file(name))):
                self.fs.rm_file(_join(self.root, shard_file(name)))
        for f in self.fs.glob(_join(self.root, ".*.tmp-*")):
            self.fs.rm_file(f)
        missing = expected - set(self.manifest.shards)
        if missing:
            raise RuntimeError(f"{self.path}: shards never written: {sorted(missing)[:5]}")
        self.manifest.stats = stats
        if metadata:
            self.manifest.metadata.update(metadata)
        self.manifest.complete = True
        if self.overwrote:
            self.manifest.replaced_rows = self.replaced_rows
        self.compact()
        return self.manifest


class TableReader:
    """The one reader of a stage's input table: it checks the contract before handing out data.

    It refuses a table whose manifest is missing, names another table, has another schema
    version, or is incomplete (its stage did not finish), each with one line naming the
    manifest. ``allow_incomplete=True`` reads an unfinished table's finished shards (listed in
    its manifest, file present with the recorded size); ``incomplete`` then says so, for the
    caller's summary and manifest. Every shard's schema is checked when it is read.
    """

    def __init__(self, path: str, table: TableSchema, *, allow_incomplete: bool = False):
        self.path = path
        self.table = table
        self.fs, self.root = fsspec.core.url_to_fs(path)
        where = _join(path, MANIFEST)
        manifest = Manifest.load(path)
        if manifest is None:
            raise SchemaError(f"{where}: not found; is {path} a {table.name} table written by LingCloud?")
        if manifest.table != table.name:
            raise SchemaError(f"{where}: this is a '{manifest.table}' table, expected '{table.name}'")
        if not table.reads(manifest.schema_version):
            raise SchemaError(table.version_mismatch(manifest.schema_version, where))
        self.listed = len(manifest.shards)
        self.incomplete = not manifest.complete
        if self.incomplete:
            if not allow_incomplete:
                raise SchemaError(
                    f"{where}: the {table.name} table is incomplete (its stage has not finished); rerun that stage, "
                    "or read its finished shards explicitly (--allow-incomplete)"
                )
            manifest.shards = {n: s for n, s in manifest.shards.items() if self._finished(s)}
        self.manifest = manifest

    def _finished(self, info: ShardInfo) -> bool:
        try:
            return self.fs.size(_join(self.root, shard_file(info.name))) == info.bytes
        except FileNotFoundError:
            return False

    def describe_incomplete(self) -> str:
        """One line for a summary: what of an incomplete table was read."""
        return (f"{self.path}: INCOMPLETE {self.table.name} table read (allow_incomplete): "
                f"{len(self.manifest.shards)} finished shard(s) of {self.listed} listed, {self.num_rows} rows")

    @property
    def shard_names(self) -> list[str]:
        return sorted(self.manifest.shards)

    def file(self, name: str) -> str:
        """Full path (with protocol) of shard ``name``'s file."""
        return _join(self.path, shard_file(name))

    @property
    def files(self) -> list[str]:
        """Full paths (with protocol) of every shard, in a stable order."""
        return [self.file(n) for n in self.shard_names]

    @property
    def num_rows(self) -> int:
        return self.manifest.num_rows

    def signature(self) -> dict[str, Any]:
        """What the table's content depends on, for a reader's input fingerprint."""
        return {"table": self.manifest.table, "complete": not self.incomplete,
                "shards": {n: s.sha256 for n, s in sorted(self.manifest.shards.items())}}

    def _open(self, name: str):
        return self.fs.open(_join(self.root, shard_file(name)))

    def check_file(self, name: str) -> pa.Schema:
        with self._open(name) as f:
            schema = pq.read_schema(f)
        self.table.check(schema, _join(self.path, shard_file(name)))
        return schema

    def read_shard(self, name: str, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        with self._open(name) as f:
            pf = pq.ParquetFile(f)
            self.table.check(pf.schema_arrow, _join(self.path, shard_file(name)))
            return pf.read(columns=columns) if filters is None else pq.read_table(f, columns=columns, filters=filters)

    def iter_batches(self, columns: list[str] | None = None, batch_size: int = 65536) -> Iterator[pa.RecordBatch]:
        """Every row in shard order, a batch at a time (memory does not grow with the table)."""
        for name in self.shard_names:
            with self._open(name) as f:
                pf = pq.ParquetFile(f)
                self.table.check(pf.schema_arrow, _join(self.path, shard_file(name)))
                yield from pf.iter_batches(columns=columns, batch_size=batch_size)

    def read(self, columns: list[str] | None = None, filters: Any = None) -> pa.Table:
        parts = [self.read_shard(n, columns, filters) for n in self.shard_names]
        if not parts:
            schema = self.table.schema
            return schema.empty_table() if columns is None else pa.schema([schema.field(c) for c in columns]).empty_table()
        return pa.concat_tables(parts, promote_options="default")


def open_table(path: str, table: TableSchema, *, allow_incomplete: bool = False) -> TableReader:
    """Open a finished input table (see ``TableReader``); the one way a stage reads its inputs."""
    return TableReader(path, table, allow_incomplete=allow_incomplete)
