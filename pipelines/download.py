"""Download stage: URL lists -> the `pairs` table, with img2dataset distributed on Ray.

One entry function, ``run(cfg)``. What it adds around ``img2dataset.download``:

1. **Input contract.** Every URL list (csv, tsv, json, jsonl, parquet, txt; gzipped too; a file
   or a folder) is read here first: a missing url column is an error naming the file and the
   columns it has, rows get their ``uid``, duplicate URLs and empty ones are counted and
   dropped, and an empty list ends in an empty table. img2dataset then reads our normalised
   copy (``_staging/urls``), so its sharding is deterministic: shard *k* always holds the same
   rows, which is what makes resume exact.
2. **Commit as shards finish.** A committer thread watches img2dataset's output; each shard
   that has its ``_stats.json`` (img2dataset writes it last) is checked against the rows it
   should hold, rewritten into the `pairs` schema under a temporary name, renamed, and
   recorded in the manifest. A SIGKILL at any point loses at most the shards in flight.
3. **Retries.** img2dataset's Ray distributor ignores ``max_shard_retry``; we rerun the pass
   for the shards still missing, up to ``download.max_shard_retry`` times.
4. **Resume.** Finished shards (manifest + file) get a ``_stats.json`` marker in the staging
   folder before img2dataset starts, so its own incremental mode skips them: a finished shard
   is never downloaded again.
"""

from __future__ import annotations

import gzip
import io
import json
import math
import threading
import time
from collections import Counter
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from lmeye.config import Config, DownloadConfig, dump_config
from lmeye.report import StageSummary
from lmeye.runtime import init_ray
from lmeye.tables import TableWriter, ensure_writable, fingerprint
from lmeye.uid import UID_KEY, uid_for, uid_keys
from schemas import SchemaError
from schemas.pairs import PAIRS, SUCCESS

STAGING = "_staging"
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


def _read_any(fs: fsspec.AbstractFileSystem, path: str, fmt: str, cfg: DownloadConfig) -> pa.Table:
    """Read one URL list the way img2dataset would, but keep every column as a string."""
    raw = fs.cat_file(path)
    if fmt.endswith(".gz"):
        raw = gzip.decompress(raw)
    base = fmt.removesuffix(".gz")
    if base == "parquet":
        return pq.read_table(io.BytesIO(raw))
    if base == "txt":
        lines = raw.decode("utf-8").splitlines()
        return pa.table({cfg.url_col: [line for line in lines if line.strip()]})
    if base == "json":
        return pa.Table.from_pylist(json.loads(raw))
    if base == "jsonl":
        return pajson.read_json(io.BytesIO(raw)) if raw.strip() else pa.table({})
    delimiter = "\t" if base == "tsv" else ","
    if not raw.strip():
        return pa.table({})
    strings = {c: pa.string() for c in (cfg.url_col, cfg.caption_col) if c}
    return pacsv.read_csv(
        io.BytesIO(raw),
        parse_options=pacsv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(column_types=strings),
    )


def list_inputs(path: str, fmt: str) -> list[str]:
    """A file, or the files of a folder with the format's extension (img2dataset's rule)."""
    fs, root = fsspec.core.url_to_fs(path)
    if not fs.exists(root):
        raise FileNotFoundError(f"{path}: URL list not found")
    if fs.isdir(root):
        files = sorted(fs.glob(root.rstrip("/") + "/*." + fmt))
        if not files:
            raise InputError(f"{path}: folder holds no *.{fmt} files (download.input_format is {fmt})")
        return [fs.unstrip_protocol(f) for f in files]
    return [path]


def read_url_list(path: str, cfg: DownloadConfig) -> pa.Table:
    """One input file as a (uid, url, caption) table, in input order, before deduplication."""
    fs, p = fsspec.core.url_to_fs(path)
    try:
        table = _read_any(fs, p, cfg.input_format, cfg)
    except (pa.ArrowInvalid, ValueError, UnicodeDecodeError, OSError) as err:
        raise InputError(f"{path}: cannot read as {cfg.input_format} ({str(err).splitlines()[0]})") from None
    if table.num_columns == 0:  # an empty file: an empty list, not an error
        return pa.table({"uid": pa.array([], pa.string()), "url": pa.array([], pa.string()),
                         "caption": pa.array([], pa.string())})
    caption_col = None if cfg.input_format.startswith("txt") else cfg.caption_col  # txt: URLs only
    for role, col in (("url", cfg.url_col), ("caption", caption_col)):
        if col is not None and col not in table.column_names:
            raise InputError(
                f"{path}: no {role} column '{col}' (columns: {', '.join(table.column_names)}); "
                f"set download.{role}_col"
            )
    urls = pc.utf8_trim_whitespace(pc.cast(table[cfg.url_col], pa.string()))
    captions = (
        pc.cast(table[caption_col], pa.string()) if caption_col else pa.nulls(table.num_rows, pa.string())
    )
    return pa.table({
        "uid": pa.array([uid_for(u) if u else None for u in urls.to_pylist()], pa.string()),
        "url": urls,
        "caption": captions,
    })


@dataclass
class PlannedShard:
    shard_id: int
    name: str  # pairs shard file name, the same id img2dataset gives it
    rows: int
    fingerprint: str  # of the uids it must hold, in order
    source: str  # the input file it comes from


@dataclass
class Plan:
    files: list[str]  # normalised url files img2dataset will read
    shards: list[PlannedShard]
    counts: Counter  # input accounting: rows, empty_url, duplicate_url
    oom_shard_count: int


def plan_inputs(input_path: str, staging: str, cfg: DownloadConfig) -> Plan:
    """Normalise every input file into ``staging/urls`` and lay out the shards img2dataset makes."""
    fs, sroot = fsspec.core.url_to_fs(staging + "/urls")
    if fs.exists(sroot):
        fs.rm(sroot, recursive=True)
    fs.makedirs(sroot, exist_ok=True)
    counts: Counter = Counter()
    seen = np.empty(0, dtype=UID_KEY)  # every uid kept so far, sorted; 16 bytes a URL
    tables: list[tuple[str, pa.Table]] = []
    for src in list_inputs(input_path, cfg.input_format):
        t = read_url_list(src, cfg)
        counts["input_rows"] += t.num_rows
        valid = pc.is_valid(t["uid"])
        counts["empty_url"] += t.num_rows - pc.sum(valid).as_py() if t.num_rows else 0
        t = t.filter(valid)
        if cfg.dedupe_urls and t.num_rows:
            ids, _ = uid_keys(t["uid"])
            _, first = np.unique(ids, return_index=True)
            keep = np.zeros(len(ids), dtype=bool)
            keep[first] = True
            keep &= ~np.isin(ids, seen)
            seen = np.union1d(seen, ids[keep])
            counts["duplicate_url"] += int(len(ids) - keep.sum())
            t = t.filter(pa.array(keep))
        if t.num_rows:
            tables.append((src, t))
    n_shards = sum(math.ceil(t.num_rows / cfg.samples_per_shard) for _, t in tables)
    oom = max(5, len(str(max(n_shards - 1, 0))))
    files, shards, next_id = [], [], 0
    for i, (src, t) in enumerate(tables):
        f = f"{sroot}/{i:05d}.parquet"
        with fs.open(f, "wb") as out:
            pq.write_table(t, out)
        files.append(fs.unstrip_protocol(f))
        for start in range(0, t.num_rows, cfg.samples_per_shard):
            part = t["uid"].slice(start, cfg.samples_per_shard).to_pylist()
            shards.append(PlannedShard(next_id, f"{next_id:0{oom}d}.parquet", len(part), fingerprint(part), src))
            next_id += 1
    counts["rows"] = sum(s.rows for s in shards)
    return Plan(files, shards, counts, oom)


# ----------------------------------------------------------------------------- raw -> pairs


def to_pairs(raw: pa.Table, encode_format: str) -> pa.Table:
    """img2dataset's parquet columns -> the `pairs` schema, rows in input order."""
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
    schema = PAIRS.with_metadata(PAIRS.schema)
    return pa.table({f.name: pc.cast(cols[f.name], f.type) for f in schema}, schema=schema)


# Images are already compressed: spend no CPU recompressing them.
PAIRS_COMPRESSION = {f.name: "zstd" for f in PAIRS.schema if f.name != "image"} | {"image": "none"}


class Committer:
    """Turns finished img2dataset shards into `pairs` shards while the download runs."""

    def __init__(self, writer: TableWriter, raw_dir: str, plan: Plan, cfg: DownloadConfig):
        self.writer, self.raw_dir, self.cfg = writer, raw_dir, cfg
        self.fs, self.raw_root = fsspec.core.url_to_fs(raw_dir)
        self.pending = {s.shard_id: s for s in plan.shards if not writer.is_done(s.name, s.fingerprint)}
        self.total = len(plan.shards)
        self.written: list[str] = []
        self.rows_done = 0
        self.ok_done = 0
        self.started = time.time()
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def _paths(self, s: PlannedShard) -> tuple[str, str]:
        """img2dataset's names for a shard: its data and its stats file (written last)."""
        stem = f"{self.raw_root}/{s.name.removesuffix('.parquet')}"
        return stem + ".parquet", stem + "_stats.json"

    def prepare(self, plan: Plan) -> None:
        """Before a pass: markers for finished shards, and no leftovers for unfinished ones."""
        for s in plan.shards:
            data, stats = self._paths(s)
            if s.shard_id not in self.pending:
                if not self.fs.exists(stats):
                    self.fs.pipe_file(stats, json.dumps({"count": s.rows, "committed": True}).encode())
            elif self.fs.exists(stats) and self.fs.exists(data) and self.commit(s):
                pass  # finished by a run that was killed before committing it
            else:  # img2dataset skips any shard with a stats file: leave none for this one
                for f in (data, stats):
                    if self.fs.exists(f):
                        self.fs.rm_file(f)

    def commit(self, s: PlannedShard) -> bool:
        data, stats_file = self._paths(s)
        try:
            # img2dataset writes the stats file last but not atomically: until it parses, the
            # shard is still being finished. Try again on the next sweep.
            stats = json.loads(self.fs.cat_file(stats_file))
        except (ValueError, FileNotFoundError):
            return False
        with self.fs.open(data, "rb") as f:
            table = to_pairs(pq.read_table(f), self.cfg.encode_format)
        if fingerprint(table["uid"].to_pylist()) != s.fingerprint:
            # Left over from another input list: it is not this shard. Download it again.
            self.fs.rm_file(data)
            self.fs.rm_file(stats_file)
            return False
        info = self.writer.write(
            s.name, table, inputs=[s.source], input_fingerprint=s.fingerprint,
            stats={"duration": stats.get("duration")} | _row_counts(table),
            compression=PAIRS_COMPRESSION,
        )
        self.fs.rm_file(data)  # the stats file stays: it tells img2dataset the shard is done
        with self._lock:
            self.pending.pop(s.shard_id, None)
            self.written.append(info.name)
            self.rows_done += info.rows
            self.ok_done += int(stats.get("successes", 0))
            done = self.total - len(self.pending)
            rate = self.ok_done / max(time.time() - self.started, 1e-9)
        print(f"[download] shard {s.name}: {info.rows} rows, {stats.get('successes', 0)} ok "
              f"({done}/{self.total} shards, {rate:.0f} img/s)", flush=True)
        return True

    def sweep(self) -> None:
        for s in list(self.pending.values()):
            data, stats = self._paths(s)
            if self.fs.exists(stats) and self.fs.exists(data):
                self.commit(s)

    def watch(self, interval: float = 0.5) -> threading.Thread:
        def loop() -> None:
            while not self._stop.wait(interval):
                try:
                    self.sweep()
                except Exception as err:  # keep watching; the final sweep after the pass retries
                    print(f"[download] committer: {err.__class__.__name__}: {err}", flush=True)

        t = threading.Thread(target=loop, name="pairs-committer", daemon=True)
        t.start()
        return t

    def stop(self, thread: threading.Thread) -> None:
        self._stop.set()
        thread.join()
        self.sweep()


# ----------------------------------------------------------------------------- the stage


def _img2dataset_pass(cfg: DownloadConfig, urls_dir: str, raw_dir: str, oom: int) -> None:
    from img2dataset import download as img2dataset_download

    img2dataset_download(
        url_list=urls_dir,
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        save_additional_columns=["uid"],
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
    ensure_writable(output)  # before anything is downloaded
    started = time.time()
    staging = output.rstrip("/") + "/" + STAGING
    raw_dir = staging + "/raw"
    plan = plan_inputs(d.input, staging, d)
    content = {k: v for k, v in dump_config(cfg)["download"].items() if k in CONTENT_KEYS}
    writer = TableWriter(output, PAIRS, config=content,
                         input_fingerprint=fingerprint([s.fingerprint for s in plan.shards]))
    fs, raw_root = fsspec.core.url_to_fs(raw_dir)
    fs.makedirs(raw_root, exist_ok=True)
    committer = Committer(writer, raw_dir, plan, d)
    skipped = len(plan.shards) - len(committer.pending)
    committer.prepare(plan)

    notes: list[str] = []
    download_seconds = 0.0
    if committer.pending:
        init_ray(cfg.ray)
    for attempt in range(1 + d.max_shard_retry):
        if not committer.pending:
            break
        if attempt:
            print(f"[download] retrying {len(committer.pending)} unfinished shard(s), retry {attempt}/{d.max_shard_retry}")
            committer.prepare(plan)
        t0 = time.time()
        thread = committer.watch()
        try:
            _img2dataset_pass(d, staging + "/urls", raw_dir, plan.oom_shard_count)
        except Exception as err:  # a Ray task or worker died: retry what is missing
            notes.append(f"pass {attempt + 1} raised {err.__class__.__name__}: {str(err).splitlines()[0][:200]}")
        finally:
            committer.stop(thread)
            download_seconds += time.time() - t0

    expected = [s.name for s in plan.shards]
    by_status: Counter = Counter()
    reasons: Counter = Counter()
    for shard in plan.shards:  # this run's shards only: the manifest may still list stale ones
        if writer.is_done(shard.name, shard.fingerprint):
            info = writer.manifest.shards[shard.name]
            by_status.update(info.stats.get("by_status", {}))
            reasons.update(info.stats.get("errors", {}))
    summary = StageSummary(
        stage="download", output=output, rows=sum(by_status.values()),
        counts=dict(by_status) | {k: v for k, v in plan.counts.items() if k in ("empty_url", "duplicate_url") and v},
        failures=dict(reasons), shards_done=len(committer.written), shards_skipped=skipped,
        seconds=time.time() - started,
        rate=(committer.ok_done / download_seconds) if download_seconds > 0 else None, rate_unit="img/s",
        notes=notes,
    )
    if committer.pending:
        missing = sorted(s.name for s in committer.pending.values())
        summary.ok = False
        summary.notes.append(f"{len(missing)} shard(s) still failing after {d.max_shard_retry} retries: "
                             f"{', '.join(missing[:10])}; rerun the same command to resume")
        return summary
    writer.finalize(expected, stats=summary.to_dict() | {"input": dict(plan.counts)})
    fs_out, out_root = fsspec.core.url_to_fs(staging)
    fs_out.rm(out_root, recursive=True)
    return summary
