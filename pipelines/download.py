"""Download stage: URL lists -> the `pairs` table, with img2dataset distributed on Ray.

One entry function, ``run(cfg)``. What it adds around ``img2dataset.download``:

1. **Input contract.** Every URL list (csv, tsv, json, jsonl, parquet, txt; gzipped too; a file
   or a folder; the format from the extension unless configured) is streamed here first: a
   missing url column is an error naming the file and the columns it has, rows get their
   ``uid``, duplicate URLs and empty ones are counted and dropped (dedupe by spilling to uid-hash
   partitions, so memory does not grow with the list), and an empty list ends in an empty
   table. img2dataset then reads our normalised copy (``_staging/urls``), so its sharding is
   deterministic: shard *k* always holds the same rows, which is what makes resume exact.
2. **Only http and https.** Any other scheme (``file:``, ``data:``, ``ftp:``...) never reaches
   img2dataset: such rows are failed rows (``unsupported_url_scheme``) written by this stage.
   img2dataset's own fetches go through an opener with http/https handlers only (redirects
   included) and a cap on the body (``download.max_response_bytes``), checked by Content-Length
   and while reading, so a huge body is a failed row, never read whole.
3. **Each task commits its own shard.** The Ray task that downloads a shard also checks it
   against the rows it should hold, rewrites it into the `pairs` schema under a temporary name
   and renames it (on object stores: uploads it under its final key, see ``lmeye.tables``), on
   the node where the bytes are; it returns only the ``ShardInfo``, which the driver records in
   the table's journal. No image byte passes through the driver. A SIGKILL at any point loses
   at most the shards in flight; a shard downloaded but not committed by a killed run is
   committed by a task of the next run, not fetched again.
4. **Retries.** img2dataset's Ray distributor ignores ``max_shard_retry``; we rerun the pass
   for the shards still missing, up to ``download.max_shard_retry`` times. A pass ends only
   when none of its tasks runs any more: a failed task lets the others finish; anything else
   cancels them and waits (``run_tasks``), so two tasks never write one shard. A pass that
   raises keeps its traceback in the log and the manifest (``stats.pass_errors``).
5. **Resume.** Finished shards (manifest + file) get a ``_stats.json`` marker in the staging
   folder before img2dataset starts, so its own incremental mode skips them: a finished shard
   is never downloaded again.
"""

from __future__ import annotations

import gzip
import importlib
import io
import itertools
import json
import math
import signal
import sys
import tempfile
import time
import traceback
import urllib.request
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from lmeye.config import Config, DownloadConfig, dump_config
from lmeye.report import StageSummary, node_note, sum_counts
from lmeye.runtime import init_ray, storage_runtime_env
from lmeye.spill import Spill
from lmeye.tables import (
    STAGING, ShardInfo, TableWriter, ensure_writable, fingerprint, remove_temporaries, write_shard,
)
from lmeye.uid import uid_for
from schemas import SchemaError
from schemas.pairs import FAILED_TO_DOWNLOAD, PAIRS, SUCCESS, additional_type, with_additional

UNSUPPORTED_SCHEME = "unsupported_url_scheme"
TOO_LARGE = "response_too_large"
# Keys that shape the table's content. Throughput knobs (threads, time-outs, retries) are left
# out so that resuming with, say, a longer time-out keeps the shards already finished.
CONTENT_KEYS = (
    "input_format", "url_col", "caption_col", "image_size", "resize_mode", "resize_only_if_bigger",
    "upscale_interpolation", "downscale_interpolation", "encode_format", "encode_quality",
    "skip_reencode", "disable_all_reencoding", "min_image_size", "max_image_area", "max_aspect_ratio",
    "samples_per_shard", "dedupe_urls",
)


class InputError(SchemaError):
    """A URL list cannot be used; the message names the file."""


# ----------------------------------------------------------------------------- input lists

FORMATS = ("csv", "tsv", "jsonl", "json", "parquet", "txt")  # each also gzipped (".gz")
BATCH_ROWS = 65_536  # rows per batch while streaming a URL list
READ_BLOCK = 16 << 20  # bytes per block of the streaming csv/jsonl readers


def infer_format(path: str) -> str | None:
    """``urls.tsv.gz`` -> ``tsv.gz``; None when the extension names no known format."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    gz = name.endswith(".gz")
    base = name.removesuffix(".gz").rsplit(".", 1)
    if len(base) == 2 and base[1] in FORMATS:
        return base[1] + (".gz" if gz else "")
    return None


def resolve_inputs(path: str, fmt: str | None) -> tuple[list[str], str, bool]:
    """The input files, their format, and whether the format was inferred from extensions.

    A file, or the files of a folder with the format's extension (img2dataset's rule). With no
    format configured, it is the extension's; a folder must hold lists of one format only.
    """
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"{path}: URL list not found")
    known = ", ".join(f".{f}" for f in FORMATS) + " (each also .gz)"
    if not fs.isdir(root):
        if fmt is None:
            fmt = infer_format(path)
            if fmt is None:
                raise InputError(f"{path}: cannot tell the URL list's format from its extension "
                                 f"(known: {known}); set download.input_format")
            return [path], fmt, True
        return [path], fmt, False
    if fmt is not None:
        files = sorted(fs.glob(root.rstrip("/") + "/*." + fmt))
        if not files:
            raise InputError(f"{path}: folder holds no *.{fmt} files (download.input_format is {fmt})")
        return [fs.unstrip_protocol(f) for f in files], fmt, False
    by_format: dict[str, list[str]] = {}
    for f in sorted(fs.find(root, maxdepth=1)):
        found = infer_format(f)
        if found is not None:
            by_format.setdefault(found, []).append(fs.unstrip_protocol(f))
    if len(by_format) != 1:
        what = f"mixes {', '.join(sorted(by_format))}" if by_format else f"holds no URL lists ({known})"
        raise InputError(f"{path}: folder {what}; set download.input_format")
    (fmt, files), = by_format.items()
    return files, fmt, True


def _column_names(cfg: DownloadConfig, fmt: str) -> tuple[str, str | None]:
    caption_col = None if fmt.startswith("txt") else cfg.caption_col  # txt: URLs only
    return cfg.url_col, caption_col


def _columns_read(cfg: DownloadConfig, fmt: str) -> list[str]:
    """Every column of the list the stage uses: url, caption, then ``additional_columns``."""
    return [c for c in _column_names(cfg, fmt) if c] + list(cfg.additional_columns)


def _raw_batches(f, fmt: str, cfg: DownloadConfig) -> Iterator[pa.Table]:
    """Stream one opened URL list as tables of at most a few MB, every column kept as read."""
    base = fmt.removesuffix(".gz")
    if base == "parquet":
        if fmt.endswith(".gz"):  # parquet needs seeking: a gzipped one is read whole
            f = io.BytesIO(f.read())
        pf = pq.ParquetFile(f)
        # only the columns used: LAION's metadata parquet has a dozen more (and some have embeddings)
        wanted = _columns_read(cfg, fmt)
        columns = [c for c in pf.schema_arrow.names if c in wanted]
        if len(columns) < len(wanted):  # let the caller name the missing column
            yield pf.schema_arrow.empty_table()
            return
        for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield pa.Table.from_batches([batch])
        return
    if base == "txt":
        lines = io.TextIOWrapper(f, encoding="utf-8")
        while chunk := list(itertools.islice(lines, BATCH_ROWS)):
            yield pa.table({cfg.url_col: pa.array([s for s in (c.strip() for c in chunk) if s], pa.string())})
        return
    if base == "json":  # one JSON array (or COCO's object with one): not streamable, read whole
        raw = f.read()
        yield pa.Table.from_pylist(_json_rows(json.loads(raw))) if raw.strip() else pa.table({})
        return
    head = f.peek(1) if hasattr(f, "peek") else b"?"
    if not head:  # an empty file: an empty list, not an error
        yield pa.table({})
        return
    if base == "jsonl":
        reader = pajson.open_json(f, read_options=pajson.ReadOptions(block_size=READ_BLOCK))
    else:
        strings = {c: pa.string() for c in _column_names(cfg, fmt) if c}
        # TSV has no quoting (CC3M's captions hold lone '"'s: quoted parsing would swallow the
        # lines after one); CSV quotes fields with commas and newlines in them.
        parse = (pacsv.ParseOptions(delimiter="\t", quote_char=False) if base == "tsv"
                 else pacsv.ParseOptions(delimiter=",", newlines_in_values=True))
        reader = pacsv.open_csv(
            f, read_options=pacsv.ReadOptions(block_size=READ_BLOCK, column_names=cfg.column_names),
            parse_options=parse, convert_options=pacsv.ConvertOptions(column_types=strings),
        )
    yield reader.schema.empty_table()  # the columns, checked even when there is no row
    for batch in reader:
        yield pa.Table.from_batches([batch])


def _json_rows(value: Any) -> list:
    """The rows of a .json list: the list itself, or COCO's ``images`` list of an annotation
    file as released (``captions_train2017.json``: ``{"images": [{"coco_url", "file_name", ...}]``)."""
    if isinstance(value, dict) and isinstance(value.get("images"), list):
        return value["images"]
    if not isinstance(value, list):
        found = f"an object with {', '.join(map(repr, value))}" if isinstance(value, dict) else type(value).__name__
        raise ValueError(f"expected a JSON list of rows, or COCO's object with an 'images' list; found {found}")
    return value


def iter_url_batches(path: str, fmt: str, cfg: DownloadConfig) -> Iterator[pa.Table]:
    """One input file as a stream of (uid, url, caption) tables, in input order, before dedupe.

    The url is trimmed; an empty one gets a null uid (counted and dropped by the planner).
    """
    url_col, caption_col = _column_names(cfg, fmt)
    fs, p = fsspec.core.url_to_fs(path)
    try:
        with fs.open(p, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if fmt.endswith(".gz") else raw
            for table in _raw_batches(f, fmt, cfg):
                if table.num_columns == 0:
                    continue
                roles = [("url", url_col, "url_col"), ("caption", caption_col, "caption_col")]
                roles += [("additional", c, "additional_columns") for c in cfg.additional_columns]
                for role, col, key in roles:
                    if col is not None and col not in table.column_names:
                        raise InputError(
                            f"{path}: no {role} column '{col}' (columns: {', '.join(table.column_names)}); "
                            f"set download.{key}"
                        )
                if table.num_rows:
                    yield _normalise(table, url_col, caption_col, cfg.additional_columns)
    except (pa.ArrowInvalid, ValueError, UnicodeDecodeError, OSError, EOFError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path}: cannot read as {fmt} ({str(err).splitlines()[0]})") from None


def _normalise(table: pa.Table, url_col: str, caption_col: str | None, additional: list[str]) -> pa.Table:
    urls = pc.utf8_trim_whitespace(pc.cast(table[url_col], pa.string()))
    captions = (
        pc.cast(table[caption_col], pa.string()) if caption_col else pa.nulls(table.num_rows, pa.string())
    )
    columns = {
        "uid": pa.array([uid_for(u) if u else None for u in urls.to_pylist()], pa.string()),
        "url": urls,
        "caption": captions,
    }
    for c in additional:
        columns[c] = pc.cast(table[c], additional_type(table[c].type))
    return pa.table(columns)


def _conform(t: pa.Table, extra: pa.Schema, path: str) -> pa.Table:
    """A batch's additional columns as the run's first batch typed them (one spill schema)."""
    if t.schema.equals(pa.schema(list(URL_SCHEMA) + list(extra))):
        return t
    for f in extra:
        try:
            t = t.set_column(t.column_names.index(f.name), f, pc.cast(t[f.name], f.type))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise InputError(f"{path}: additional column '{f.name}' holds {t[f.name].type} values where earlier "
                             f"rows held {f.type} (download.additional_columns)") from None
    return t


def read_url_list(path: str, cfg: DownloadConfig) -> pa.Table:
    """One whole input file as a (uid, url, caption, additional...) table (small lists and tests)."""
    fmt = cfg.input_format or resolve_inputs(path, None)[1]
    parts = list(iter_url_batches(path, fmt, cfg))
    return pa.concat_tables(parts) if parts else URL_SCHEMA.empty_table()


URL_SCHEMA = pa.schema([("uid", pa.string()), ("url", pa.string()), ("caption", pa.string())])
NO_EXTRA = pa.schema([])  # no additional columns
# Spilled bytes per planning partition: the planner holds one partition at a time, so this (not
# the length of the URL list) bounds its memory. Input is first spread over up to SPILL_FANOUT
# partitions (one per SPILL_BYTES of input); larger ones are split again when read.
PARTITION_BYTES = 64 << 20
SPILL_BYTES = 4 << 20
SPILL_FANOUT = 64
GZIP_RATIO = 4  # guessed expansion of a gzipped list, to size the partitions
FETCHED = r"^[hH][tT][tT][pP][sS]?://"  # only http and https are ever fetched


@dataclass
class PlannedShard:
    shard_id: int
    name: str  # pairs shard file name, the same id img2dataset gives it
    rows: int
    fingerprint: str  # of the uids it must hold, in order
    sources: list[str]  # the input lists its rows come from
    rows_file: str = ""  # rejected rows (not fetched): the staging file holding them
    offset: int = 0  # and where they start in it


@dataclass
class Plan:
    files: list[str]  # normalised url files img2dataset will read
    shards: list[PlannedShard]  # what img2dataset fetches
    rejected: list[PlannedShard]  # URLs never fetched (scheme not http/https): failed rows, written here
    counts: Counter  # input accounting: input_rows, empty_url, duplicate_url, rows, unsupported_url_scheme
    oom_shard_count: int
    input_format: str
    format_inferred: bool
    extra: pa.Schema = NO_EXTRA  # the additional columns kept, with their stored types

    @property
    def all_shards(self) -> list[PlannedShard]:
        return self.shards + self.rejected


class _Partitions:
    """Rows spilled to local files (``lmeye.spill``) by a hash of their uid, so every copy of a
    URL lands in one partition. A partition that came out larger than ``PARTITION_BYTES`` (the
    input size was only an estimate) is split again with another hash when it is read: memory
    stays bounded whatever the estimate was."""

    def __init__(self, folder: str, count: int, schema: pa.Schema, level: int = 0):
        self.count, self.level = count, level
        self.spill = Spill(folder, str(level), count, schema)

    def add(self, table: pa.Table) -> None:
        if self.count == 1:
            parts = np.zeros(table.num_rows, dtype=np.int64)
        else:  # crc32 of the opaque uid string (salted by level): stable across runs and machines
            salt = zlib.crc32(str(self.level).encode())
            parts = np.fromiter((zlib.crc32(u.encode(), salt) for u in table["uid"].to_pylist()),
                                dtype=np.uint32, count=table.num_rows) % self.count
        self.spill.write(table, parts)

    def close(self) -> None:
        self.spill.close()

    def tables(self) -> Iterator[pa.Table]:
        """Each partition in turn (in a fixed order), none over ``PARTITION_BYTES`` if splittable."""
        for p in range(self.count):
            size = self.spill.size(p)
            if not size:
                continue
            if size > PARTITION_BYTES and self.level < 4:
                sub = _Partitions(self.spill.folder, math.ceil(size / PARTITION_BYTES) + 1, self.spill.schema,
                                  self.level + 1)
                try:
                    for batch in self.spill.batches(p):
                        sub.add(pa.Table.from_batches([batch]))
                finally:
                    sub.close()
                self.spill.remove(p)
                yield from sub.tables()
                continue
            table = self.spill.read(p)
            yield table
            del table
            self.spill.remove(p)
            pa.default_memory_pool().release_unused()  # hand the partition's memory back before the next


def _first_of_each_uid(t: pa.Table) -> pa.Table:
    """Keep the first row of each uid. A partition's rows are in input order (spilling keeps
    it), and the sort is stable, so the first of each run of equal uids is the earliest copy."""
    order = pc.sort_indices(t["uid"])
    uids = t["uid"].take(order).combine_chunks()
    first = np.ones(t.num_rows, dtype=bool)
    if t.num_rows > 1:
        first[1:] = pc.not_equal(uids.slice(1), uids.slice(0, t.num_rows - 1)).to_numpy(zero_copy_only=False)
    return t.take(np.sort(order.to_numpy()[first]))


class _ShardCutter:
    """Writes planned rows as files of whole shards. img2dataset shards each input file on its
    own: carrying the remainder over to the next file keeps every shard but the last full."""

    def __init__(self, fs: fsspec.AbstractFileSystem, folder: str, samples_per_shard: int, inputs: list[str],
                 keep_rows_file: bool):
        self.fs, self.folder, self.n, self.inputs = fs, folder, samples_per_shard, inputs
        self.keep_rows_file = keep_rows_file
        self.rest: pa.Table | None = None
        self.files: list[str] = []
        self.shards: list[PlannedShard] = []

    def add(self, t: pa.Table) -> None:
        if self.rest is not None:
            t = pa.concat_tables([self.rest, t])
        cut = t.num_rows // self.n * self.n
        if cut:
            self._write(t.slice(0, cut))
        # a compact copy: a slice would keep the whole partition's buffers alive
        self.rest = t.take(np.arange(cut, t.num_rows)) if cut < t.num_rows else None

    def finish(self) -> None:
        if self.rest is not None:
            self._write(self.rest)
            self.rest = None

    def _write(self, t: pa.Table) -> None:
        f = self.fs.unstrip_protocol(f"{self.folder}/{len(self.files):05d}.parquet")
        with self.fs.open(f, "wb") as sink:
            pq.write_table(t.drop_columns(["seq"]), sink)
        self.files.append(f)
        src = pc.shift_right(t["seq"], 40)
        for start in range(0, t.num_rows, self.n):
            rows = t.slice(start, self.n)
            inputs = [self.inputs[i] for i in sorted(pc.unique(src.slice(start, rows.num_rows)).to_pylist())]
            self.shards.append(PlannedShard(
                -1, "", rows.num_rows, fingerprint(rows["uid"].to_pylist()), inputs,
                rows_file=f if self.keep_rows_file else "", offset=start))


def plan_inputs(input_path: str, staging: str, cfg: DownloadConfig) -> Plan:
    """Normalise every input list into ``staging/urls`` and lay out the shards img2dataset makes.

    Streaming, with memory bounded by ``PARTITION_BYTES`` whatever the list's length:

    1. each list is read in batches; every row gets its input position and goes to a local
       spill partition chosen by a hash of its uid (all copies of a URL meet in one);
    2. each partition in turn is deduplicated (first copy wins) and cut into files of whole
       shards for img2dataset; URLs whose scheme is not http/https are set aside as rejected
       rows (``staging/rejected``), never shown to img2dataset.

    The layout depends on the input alone (contents and sizes), so shards and uids are the
    same on every run: that is what makes resume exact.
    """
    files, fmt, inferred = resolve_inputs(input_path, cfg.input_format)
    fs, sroot = fsspec.core.url_to_fs(staging)
    for sub in ("urls", "rejected"):
        if fs.exists(f"{sroot}/{sub}"):
            fs.rm(f"{sroot}/{sub}", recursive=True)
        fs.makedirs(f"{sroot}/{sub}", exist_ok=True)
    in_fs = fsspec.core.url_to_fs(files[0])[0]
    est = sum(in_fs.size(fsspec.core.url_to_fs(f)[1]) for f in files) * (GZIP_RATIO if fmt.endswith(".gz") else 1)
    n_parts = max(1, min(SPILL_FANOUT, math.ceil(est / SPILL_BYTES)))
    counts: Counter = Counter()
    cutters = {kind: _ShardCutter(fs, f"{sroot}/{kind}", cfg.samples_per_shard, files, kind == "rejected")
               for kind in ("urls", "rejected")}
    with tempfile.TemporaryDirectory(prefix="lmeye-download-plan-") as tmp:
        spill, extra = _spill_lists(files, fmt, cfg, tmp, n_parts, counts)
        for t in spill.tables() if spill is not None else ():
            if cfg.dedupe_urls and t.num_rows:
                before = t.num_rows
                t = _first_of_each_uid(t)
                counts["duplicate_url"] += before - t.num_rows
            ok = pc.match_substring_regex(t["url"], FETCHED)
            cutters["urls"].add(t.filter(ok))
            cutters["rejected"].add(t.filter(pc.invert(ok)))
            del t, ok
    for c in cutters.values():
        c.finish()

    # img2dataset numbers its shards across its input files in name order: fetched shards take
    # the first ids, rejected ones (written by this stage, not img2dataset) the ids after them.
    fetch, rejected = cutters["urls"].shards, cutters["rejected"].shards
    urls_files = cutters["urls"].files
    oom = max(5, len(str(max(len(fetch) + len(rejected) - 1, 0))))
    for i, s in enumerate(fetch + rejected):
        s.shard_id, s.name = i, f"{i:0{oom}d}.parquet"
    counts["rows"] = sum(s.rows for s in fetch + rejected)
    counts[UNSUPPORTED_SCHEME] = sum(s.rows for s in rejected)
    return Plan(urls_files, fetch, rejected, counts, oom, fmt, inferred, extra)


def _spill_lists(files: list[str], fmt: str, cfg: DownloadConfig, tmp: str, n_parts: int,
                 counts: Counter) -> tuple[_Partitions | None, pa.Schema]:
    """Step 1 of the plan: every row with a url, numbered by its input position, spilled by uid
    hash. Returns the spill (None: no row) and the additional columns' schema, fixed by the
    first batch (a later batch is cast to it, or is an error naming its file and column)."""
    spill: _Partitions | None = None
    extra = pa.schema([(c, pa.string()) for c in cfg.additional_columns])
    seq = 0
    try:
        for src_index, src in enumerate(files):
            for t in iter_url_batches(src, fmt, cfg):
                counts["input_rows"] += t.num_rows
                valid = pc.is_valid(t["uid"])
                t = t.filter(valid)
                counts["empty_url"] += len(valid) - t.num_rows
                if spill is None:
                    extra = pa.schema([t.schema.field(c) for c in cfg.additional_columns])
                    spill = _Partitions(tmp, n_parts, pa.schema([("seq", pa.int64())] + list(URL_SCHEMA) + list(extra)))
                t = _conform(t, extra, src)
                # position = (file, row): the file index rides in the high bits
                spill.add(t.add_column(0, "seq", pa.array(np.arange(seq, seq + t.num_rows, dtype=np.int64)
                                                          + (src_index << 40))))
                seq += t.num_rows
                pa.default_memory_pool().release_unused()  # keep the footprint at one batch
    finally:
        if spill is not None:
            spill.close()
    return spill, extra


# ----------------------------------------------------------------------------- raw -> pairs


def to_pairs(raw: pa.Table, encode_format: str, additional: tuple[str, ...] = ()) -> pa.Table:
    """img2dataset's parquet columns -> the `pairs` schema (with the ``additional`` columns of
    the URL list after its own), rows in input order."""
    order = pc.sort_indices(pc.cast(raw["key"], pa.int64()))
    raw = raw.take(order)
    cols = {
        "uid": raw["uid"], "url": raw["url"],
        "caption": raw["caption"] if "caption" in raw.column_names else pa.nulls(raw.num_rows, pa.string()),
        "status": raw["status"], "error_message": raw["error_message"],
        "width": raw["width"], "height": raw["height"],
        "original_width": raw["original_width"], "original_height": raw["original_height"],
        "sha256": raw["sha256"], "image": raw[encode_format],
    }
    return _as_pairs(cols, raw, additional)


def _as_pairs(cols: dict[str, Any], source: pa.Table, additional: tuple[str, ...]) -> pa.Table:
    """The pairs columns ``cols`` and the additional columns of ``source``, as one pairs table."""
    schema = with_additional(pa.schema([source.schema.field(c) for c in additional]))
    cols = cols | {c: source[c] for c in additional}
    return pa.table({f.name: pc.cast(cols[f.name], f.type) for f in schema}, schema=schema)


# Images are already compressed: spend no CPU recompressing them.
PAIRS_COMPRESSION = {f.name: "zstd" for f in PAIRS.schema if f.name != "image"} | {"image": "none"}


@dataclass(frozen=True)
class ShardTarget:
    """Where a download task turns img2dataset's raw shard into a `pairs` shard (small, picklable)."""

    output: str  # the pairs table
    raw_dir: str  # img2dataset's output folder (in the table's staging folder)
    encode_format: str
    additional: tuple[str, ...] = ()  # download.additional_columns, carried into pairs


def raw_paths(target: ShardTarget, s: PlannedShard) -> tuple[str, str, str]:
    """img2dataset's files of a shard, as fsspec paths: its data, its stats file (written last),
    and ours naming the node that downloaded it."""
    _, raw_root = fsspec.core.url_to_fs(target.raw_dir)
    stem = f"{raw_root}/{s.name.removesuffix('.parquet')}"
    return stem + ".parquet", stem + "_stats.json", stem + NODE_SUFFIX


def commit_raw_shard(target: ShardTarget, s: PlannedShard) -> ShardInfo | None:
    """Where the raw shard is (a download task, or a leftover-commit task): check it holds the
    planned rows, write the final `pairs` shard (``write_shard``) and return only its ShardInfo
    for the driver to record. None when the shard is not finished or is not this plan's."""
    fs, _ = fsspec.core.url_to_fs(target.raw_dir)
    data, stats_file, node_file = raw_paths(target, s)
    try:
        # img2dataset writes the stats file last but not atomically: until it parses, the
        # shard is still being finished (or its download failed).
        stats = json.loads(fs.cat_file(stats_file))
        with fs.open(data, "rb") as f:
            table = to_pairs(pq.read_table(f), target.encode_format, target.additional)
    except (ValueError, FileNotFoundError):
        return None
    if fingerprint(table["uid"].to_pylist()) != s.fingerprint:
        # Left over from another input list: it is not this shard. Download it again.
        fs.rm_file(data)
        fs.rm_file(stats_file)
        return None
    try:
        node = fs.cat_file(node_file).decode().strip() or None
    except FileNotFoundError:
        node = None
    info = write_shard(
        target.output, s.name, table, inputs=s.sources, input_fingerprint=s.fingerprint,
        stats={"duration": stats.get("duration"), "node": node} | _row_counts(table),
        compression=PAIRS_COMPRESSION,
    )
    fs.rm_file(data)  # the stats file stays: it tells img2dataset the shard is done
    return info


class Committer:
    """The driver's side of the download: which shards are pending, and recording the
    ``ShardInfo`` each download task returns (metadata only: the tasks write the shards)."""

    def __init__(self, writer: TableWriter, target: ShardTarget, plan: Plan):
        self.writer, self.target = writer, target
        self.fs, self.raw_root = fsspec.core.url_to_fs(target.raw_dir)
        self.pending = {s.shard_id: s for s in plan.shards if not writer.is_done(s.name, s.fingerprint)}
        self.ids = {s.name: s.shard_id for s in plan.shards}
        self.total = len(plan.shards)
        self.written: list[str] = []
        self.rows_done = 0
        self.ok_done = 0
        self.started = time.time()

    def _present(self) -> set[str]:
        """The raw folder's file paths, from one listing (not an existence call per shard)."""
        self.fs.invalidate_cache(self.raw_root)
        try:
            return {f.rstrip("/") for f in self.fs.ls(self.raw_root, detail=False)}
        except FileNotFoundError:
            return set()

    def leftovers(self) -> list[PlannedShard]:
        """Pending shards img2dataset finished (data and stats there) that no task committed:
        a run killed between the two. ``prepare`` commits them (in tasks) instead of refetching."""
        present = self._present()
        return [s for s in self.pending.values() if set(raw_paths(self.target, s)[:2]) <= present]

    def prepare(self, plan: Plan) -> None:
        """Before a pass: markers for finished shards, and no leftovers for unfinished ones."""
        present = self._present()
        for s in plan.shards:
            data, stats, node = raw_paths(self.target, s)
            if s.shard_id not in self.pending:
                if stats not in present:
                    self.fs.pipe_file(stats, json.dumps({"count": s.rows, "committed": True}).encode())
            else:  # img2dataset skips any shard with a stats file: leave none for this one
                for f in (data, stats, node):
                    if f in present:
                        self.fs.rm_file(f)

    def record(self, info: ShardInfo | None) -> None:
        """A download task's result: its shard's record (None: the shard did not finish)."""
        if info is None:
            return
        s = self.pending.get(self.ids.get(info.name, -1))
        if s is None or info.input_fingerprint != s.fingerprint:
            return  # not pending (a task of an earlier pass that outlived it): already recorded
        self.writer.record(info)
        self.pending.pop(s.shard_id)
        self.written.append(info.name)
        self.rows_done += info.rows
        self.ok_done += int(info.stats.get("by_status", {}).get(SUCCESS, 0))
        done = self.total - len(self.pending)
        rate = self.ok_done / max(time.time() - self.started, 1e-9)
        print(f"[download] shard {info.name}: {info.rows} rows, {info.stats['by_status'].get(SUCCESS, 0)} ok "
              f"({done}/{self.total} shards, {rate:.0f} img/s)", flush=True)


def rejected_pairs(rows: pa.Table) -> pa.Table:
    """Rows whose URL is never fetched, as failed `pairs` rows. The message names the scheme rule
    only: it must not depend on anything a fetch would have found (a local file existing or not)."""
    n = rows.num_rows
    null_int = pa.nulls(n, pa.int32())
    cols = {
        "uid": rows["uid"], "url": rows["url"], "caption": rows["caption"],
        "status": pa.array([FAILED_TO_DOWNLOAD] * n, pa.string()),
        "error_message": pa.array([f"{UNSUPPORTED_SCHEME}: only http and https URLs are fetched"] * n, pa.string()),
        "width": null_int, "height": null_int, "original_width": null_int, "original_height": null_int,
        "sha256": pa.nulls(n, pa.string()), "image": pa.nulls(n, pa.binary()),
    }
    return _as_pairs(cols, rows, tuple(c for c in rows.column_names if c not in URL_SCHEMA.names and c != "seq"))


# ----------------------------------------------------------------------------- fetching guard


class ResponseTooLarge(OSError):
    """A response body over ``download.max_response_bytes``; the row fails with this message."""


class _BoundedResponses(urllib.request.BaseHandler):
    """Refuse bodies over ``limit`` bytes: by Content-Length before reading, else while reading,
    so at most ``limit + 1`` bytes of a response are ever held."""

    handler_order = 400  # before HTTPErrorProcessor: error bodies are bounded too

    def __init__(self, limit: int):
        self.limit = limit

    def _too_large(self, response) -> ResponseTooLarge:
        response.close()
        return ResponseTooLarge(f"{TOO_LARGE}: body over download.max_response_bytes ({self.limit} bytes)")

    def http_response(self, request, response):
        length = (response.headers.get("Content-Length") or "").strip()
        if length.isdigit() and int(length) > self.limit:
            raise self._too_large(response)
        read, seen = response.read, [0]

        def bounded_read(amt=None):
            want = self.limit + 1 - seen[0] if amt is None or amt < 0 else min(amt, self.limit + 1 - seen[0])
            parts = []
            while want > 0:
                block = read(min(want, 1 << 20))
                if not block:
                    break
                parts.append(block)
                seen[0] += len(block)
                want -= len(block)
                if amt is not None and amt >= 0:
                    break
            if seen[0] > self.limit:
                raise self._too_large(response)
            return b"".join(parts)

        response.read = bounded_read
        return response

    https_response = http_response


def guarded_opener(limit: int) -> urllib.request.OpenerDirector:
    """urllib's opener with http and https only (no file:, data:, ftp: handlers, also after a
    redirect) and response bodies capped at ``limit`` bytes."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(), urllib.request.UnknownHandler(), urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(), urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPRedirectHandler(), urllib.request.HTTPErrorProcessor(), _BoundedResponses(limit),
    ):
        opener.add_handler(handler)
    return opener


NODE_SUFFIX = "_node.txt"  # beside a raw shard: the Ray node that downloaded it (kept in the manifest)


def _fetch_shard(downloader, shard, limit: int, target: ShardTarget, planned: PlannedShard | None):
    """A Ray task: img2dataset's shard download, behind the guarded opener, then the final
    `pairs` shard written here, where the bytes are; only its ShardInfo goes back to the driver.
    img2dataset fetches with ``urllib.request.urlopen``, which uses the process's installed
    opener. The node it runs on is written first, next to img2dataset's files, so the shard's
    manifest entry names it (also when a later run commits a leftover)."""
    import ray

    urllib.request.install_opener(guarded_opener(limit))
    name = "{:0{}d}".format(shard[0], downloader.oom_shard_count)  # img2dataset's shard file stem
    with fsspec.open(f"{downloader.output_folder}/{name}{NODE_SUFFIX}", "w") as f:
        f.write(ray.get_runtime_context().get_node_id())
    ok, _ = downloader(shard)
    return commit_raw_shard(target, planned) if ok and planned is not None else None


def run_tasks(refs: list, on_result) -> None:
    """Wait for every task of a pass, handing each result to ``on_result`` as it arrives.

    A task that fails does not end the pass: the others still finish and their shards are
    recorded; the first failure is raised once all have ended. Anything else (Ctrl-C,
    ``on_result`` raising) cancels every task and waits until they have stopped before it
    propagates, so a retry pass never runs beside a task of this one (two writers of a shard).
    """
    import ray

    failure = None
    pending = list(refs)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            for ref in done:
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayError as err:
                    failure = failure or err
                    continue
                on_result(result)
    except BaseException:
        cancel_tasks(pending)
        raise
    if failure is not None:
        raise failure


def cancel_tasks(refs: list, wait_s: float = 60.0) -> None:
    """Cancel tasks (force: their worker processes are killed) and wait until they have ended."""
    import ray

    for ref in refs:
        try:
            ray.cancel(ref, force=True)
        except Exception:  # noqa: BLE001 - already finished or gone
            pass
    if refs:
        ray.wait(refs, num_returns=len(refs), timeout=wait_s)


class _GuardedRayDistributor:
    """img2dataset's Ray distributor, with each shard task behind the guarded opener and
    writing its own `pairs` shard; the driver records the returned ShardInfos (``run_tasks``)."""

    def __init__(self, limit: int, committer: Committer):
        self.limit, self.committer = limit, committer

    def __call__(self, processes_count, downloader, reader, subjob_size, max_shard_retry) -> None:
        import ray

        # img2dataset's SIGINT handler exits with code 0 as if all was well: Ctrl-C must stop
        # the stage as an interruption instead (the entry point reports it, exit code 130).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # SPREAD: downloads are network-bound, so every node's bandwidth is used, not the driver's first
        task = ray.remote(_fetch_shard).options(runtime_env=storage_runtime_env(), scheduling_strategy="SPREAD")
        target, refs = self.committer.target, []
        try:
            for shard in reader:
                refs.append(task.remote(downloader, shard, self.limit, target, self.committer.pending.get(shard[0])))
        except BaseException:
            cancel_tasks(refs)
            raise
        run_tasks(refs, self.committer.record)


def _img2dataset_pass(cfg: DownloadConfig, urls_dir: str, raw_dir: str, oom: int, committer: Committer) -> None:
    # (the package exports a function named `main`, so the module is fetched by name)
    img2dataset_main = importlib.import_module("img2dataset.main")
    from pipelines.download_logger import QuietLoggerProcess
    # img2dataset picks its Ray distributor and logger class by name from this module: ours
    # add the fetching guard and Ctrl-C handling; the rest of img2dataset is used unchanged.
    swapped = {"ray_distributor": _GuardedRayDistributor(cfg.max_response_bytes, committer),
               "LoggerProcess": QuietLoggerProcess}
    original = {k: getattr(img2dataset_main, k) for k in swapped}
    previous_sigint = signal.getsignal(signal.SIGINT)
    for k, v in swapped.items():
        setattr(img2dataset_main, k, v)
    try:
        _call_img2dataset(img2dataset_main.download, cfg, urls_dir, raw_dir, oom)
    except SystemExit:  # img2dataset's own SIGINT handler, before our distributor replaced it
        raise KeyboardInterrupt from None
    finally:
        for k, v in original.items():
            setattr(img2dataset_main, k, v)
        signal.signal(signal.SIGINT, previous_sigint)


def _call_img2dataset(img2dataset_download, cfg: DownloadConfig, urls_dir: str, raw_dir: str, oom: int) -> None:
    img2dataset_download(
        url_list=urls_dir,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid", *cfg.additional_columns],
        output_folder=raw_dir,
        output_format="parquet",
        distributor="ray",
        incremental_mode="incremental",
        number_sample_per_shard=cfg.samples_per_shard,
        oom_shard_count=oom,
        image_size=cfg.image_size,
        resize_mode=cfg.resize_mode,
        resize_only_if_bigger=cfg.resize_only_if_bigger,
        upscale_interpolation=cfg.upscale_interpolation,
        downscale_interpolation=cfg.downscale_interpolation,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
        skip_reencode=cfg.skip_reencode,
        disable_all_reencoding=cfg.disable_all_reencoding,
        min_image_size=cfg.min_image_size,
        max_image_area=cfg.max_image_area,
        max_aspect_ratio=cfg.max_aspect_ratio,
        thread_count=cfg.thread_count,
        timeout=cfg.timeout,
        retries=cfg.retries,
        user_agent_token=cfg.user_agent_token,
        disallowed_header_directives=cfg.disallowed_header_directives,
        extract_exif=False,
        compute_hash="sha256",
        enable_wandb=False,
    )


def _row_counts(table: pa.Table) -> dict[str, dict[str, int]]:
    """A shard's rows by status and its failures by reason, kept in the manifest with the shard."""
    failed = table.filter(pc.not_equal(table["status"], SUCCESS))
    return {
        "by_status": dict(Counter(table["status"].to_pylist())),
        "errors": dict(Counter(m or "unknown" for m in failed["error_message"].to_pylist())),
    }


def run(cfg: Config) -> StageSummary:
    """Download ``cfg.download.input`` into the pairs table at ``cfg.download.output``."""
    d = cfg.download
    if not d.input:
        raise InputError("download.input: no URL list given (set it in the config or pass INPUT)")
    output = d.output
    created = ensure_writable(output, PAIRS)  # before anything is read or downloaded
    staging = output.rstrip("/") + "/" + STAGING
    try:
        return _run(cfg, staging)
    finally:  # finished, failed or interrupted: no scratch (and no empty folder of ours) is left
        remove_temporaries(output, created)


def _commit_leftovers(committer: Committer, notes: list[str]) -> None:
    """Shards a killed run downloaded but did not commit: committed by tasks, not fetched again."""
    import ray

    left = committer.leftovers()
    if not left:
        return
    task = ray.remote(commit_raw_shard).options(runtime_env=storage_runtime_env(), scheduling_strategy="SPREAD")
    try:
        run_tasks([task.remote(committer.target, s) for s in left], committer.record)
    except ray.exceptions.RayError as err:  # those not committed are downloaded again by the pass
        notes.append(f"committing {len(left)} downloaded shard(s) left by an earlier run: {str(err).splitlines()[0][:200]}")


def _run(cfg: Config, staging: str) -> StageSummary:
    d = cfg.download
    started = time.time()
    raw_dir = staging + "/raw"
    plan = plan_inputs(d.input, staging, d)
    writer = TableWriter(d.output, PAIRS, config=_content_config(cfg, plan),
                         input_fingerprint=fingerprint([s.fingerprint for s in plan.all_shards]))
    fs, raw_root = fsspec.core.url_to_fs(raw_dir)
    fs.makedirs(raw_root, exist_ok=True)
    committer = Committer(writer, ShardTarget(d.output, raw_dir, d.encode_format, tuple(d.additional_columns)), plan)
    skipped = len(plan.shards) - len(committer.pending) + _write_rejected(plan, writer, committer)
    notes = [f"input format {plan.input_format}"
             + (" (inferred from the file extension)" if plan.format_inferred else " (download.input_format)")]
    pass_errors, download_seconds = _download_passes(cfg, staging, plan, committer, notes)
    summary = _summary(d.output, plan, writer, committer, skipped, notes, started, download_seconds)
    stats = summary.to_dict() | {"input": dict(plan.counts), "pass_errors": pass_errors}
    if committer.pending:
        missing = sorted(s.name for s in committer.pending.values())
        summary.ok = False
        summary.notes.append(f"{len(missing)} shard(s) still failing after {d.max_shard_retry} retries: "
                             f"{', '.join(missing[:10])}; rerun the same command to resume")
        writer.manifest.stats = stats  # the tracebacks stay with the table for the rerun to see
        writer.compact()
        return summary
    writer.finalize([s.name for s in plan.all_shards], stats=stats)
    return summary


def _content_config(cfg: Config, plan: Plan) -> dict:
    """What decides the pairs' content: the table's config fingerprint."""
    d = cfg.download
    content = {k: v for k, v in dump_config(cfg)["download"].items() if k in CONTENT_KEYS}
    content["input_format"] = plan.input_format  # as used, whether configured or inferred
    if d.column_names is not None:  # (only when set: tables from before the key keep their fingerprint)
        content["column_names"] = d.column_names
    if d.additional_columns:  # (likewise)
        content["additional_columns"] = d.additional_columns
    return content


def _write_rejected(plan: Plan, writer: TableWriter, committer: Committer) -> int:
    """The shards of URLs never fetched, written here as failed rows; returns those already done."""
    skipped = 0
    for s in plan.rejected:
        if writer.is_done(s.name, s.fingerprint):
            skipped += 1
            continue
        with fsspec.open(s.rows_file, "rb") as f:
            rows = pq.read_table(f).slice(s.offset, s.rows)
        table = rejected_pairs(rows)
        writer.write(s.name, table, inputs=s.sources, input_fingerprint=s.fingerprint,
                     stats=_row_counts(table), compression=PAIRS_COMPRESSION)
        committer.written.append(s.name)
    return skipped


def _download_passes(cfg: Config, staging: str, plan: Plan, committer: Committer,
                     notes: list[str]) -> tuple[list[str], float]:
    """img2dataset passes until nothing is pending or the retries are spent; returns the passes'
    tracebacks and the seconds spent downloading."""
    d = cfg.download
    raw_dir = staging + "/raw"
    pass_errors: list[str] = []
    download_seconds = 0.0
    if committer.pending:
        init_ray(cfg.ray)
        _commit_leftovers(committer, notes)
    for attempt in range(1 + d.max_shard_retry):
        if not committer.pending:
            break
        if attempt:
            print(f"[download] retrying {len(committer.pending)} unfinished shard(s), retry {attempt}/{d.max_shard_retry}")
        committer.prepare(plan)
        t0 = time.time()
        try:
            _img2dataset_pass(d, staging + "/urls", raw_dir, plan.oom_shard_count, committer)
        except Exception as err:  # a Ray task or worker died: retry what is missing
            # ...but a bug (a wrong keyword after an upgrade) must stay visible: the whole
            # traceback goes to the log and the manifest, the summary gets one line.
            trace = traceback.format_exc()
            print(f"[download] pass {attempt + 1} failed:\n{trace}", file=sys.stderr, flush=True)
            pass_errors.append(trace)
            notes.append(f"pass {attempt + 1} raised {err.__class__.__name__}: {str(err).splitlines()[0][:200]} "
                         "(traceback in the log and the manifest)")
        finally:
            download_seconds += time.time() - t0
    return pass_errors, download_seconds


def _summary(output: str, plan: Plan, writer: TableWriter, committer: Committer, skipped: int, notes: list[str],
             started: float, download_seconds: float) -> StageSummary:
    """Rows by status and failures by reason over this run's shards (the manifest may still list
    stale ones), and the nodes that fetched them."""
    done = [writer.manifest.shards[s.name] for s in plan.all_shards if writer.is_done(s.name, s.fingerprint)]
    by_status = sum_counts(info.stats.get("by_status", {}) for info in done)
    nodes = Counter(info.stats["node"] for info in done if info.stats.get("node"))
    if nodes:
        notes.append(node_note(nodes, "shards"))
    return StageSummary(
        stage="download", output=output, rows=sum(by_status.values()),
        counts=dict(by_status) | {k: v for k, v in plan.counts.items()
                                  if k in ("empty_url", "duplicate_url", UNSUPPORTED_SCHEME) and v},
        failures=dict(sum_counts(info.stats.get("errors", {}) for info in done)),
        shards_done=len(committer.written), shards_skipped=skipped,
        seconds=time.time() - started,
        rate=(committer.ok_done / download_seconds) if download_seconds > 0 else None, rate_unit="img/s",
        notes=notes,
    )
