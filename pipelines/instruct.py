"""The instruct stage: LMEyeMID-style instruction data -> the `instructions` table.

``run(cfg)`` reads the configured sources (caption rows of a pairs table turned into tasks by
templates, VQA question/answer sets, LLaVA conversations, LMEyeMID records), maps every image
reference to a uid, and writes the `instructions` table (``schemas.instructions``).

How it streams (memory does not grow with the input):

1. *Spill.* Sources are read one record at a time (JSON is decoded element by element) and
   turned into rows in chunks of ``chunk_rows``. Each chunk is hash-partitioned by uid into P
   local Arrow IPC files. P grows with the input (``partition_mb`` per partition), so one
   partition's rows are bounded. The uids of the features table are spilled to the same P
   partitions.
2. *Per partition* (everything about one image is in one partition): drop rows whose image has
   no features, drop exact duplicates (same uid and same conversation; the earlier source in the
   config, then the earlier record, wins), shuffle with the seed, and write a ``train-`` and a
   ``validation-`` shard with ``TableWriter`` (atomic shards, manifest).

The split is by uid: validation iff ``mix(uid, split_seed) mod 10000 < val_fraction * 10000``,
so no image is on both sides. Shuffling: the partition of a row is a hash of its uid (a random
assignment) and rows are permuted inside each partition with a seeded generator; both are
deterministic, so a rerun writes the same bytes.

Accounting: for every source, ``input = kept + duplicate + no_features + sampled_out + over_cap
+ malformed + sum(rejected by reason)``; it is checked at the end and stored in the manifest.

Resume: a rerun whose config and inputs match a complete table does nothing; after a killed
run, partitions whose shards are finished are not rewritten.

Runs on the driver alone (no Ray needed): the work is parsing and hashing, and the
per-partition step is bounded, so one process meets the benchmark on two cores.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmeye.errors import UserError
from lmeye.config import Config
from lmeye.config.instruct import DEFAULT_TASK, InstructConfig
from lmeye.report import StageSummary
from lmeye.tables import Manifest, TableReader, TableWriter, fingerprint
from lmeye.templates import CAPTIONS as DEFAULT_TEMPLATES
from pipelines.instruct_sources import (
    HEX16_RE,
    ImageIndex,
    Malformed,
    Parsed,
    Reject,
    file_signature,
    fill,
    list_files,
    load_templates,
    parse_caption_record,
    parse_llava,
    parse_qa,
    read_json_source,
    resolve,
)
from schemas.instructions import (
    CONVERSATION,
    INSTRUCTIONS,
    ROLE_ASSISTANT,
    ROLE_USER,
    TRAIN,
    TURN,
    VALIDATION,
    shard_name,
)
from schemas.pairs import SUCCESS

STAGE = "instruct"
MASK64 = (1 << 64) - 1
# Rough in-memory bytes of one spilled row, to size partitions before reading: a caption row
# (uid, ids, a short prompt and a caption); file sources are sized by their file size.
CAPTION_ROW_BYTES = 256
SPILL_SCHEMA = pa.schema(
    [
        ("uid", pa.string()),
        ("src", pa.int16()),
        ("task", pa.string()),
        ("sample_id", pa.string()),
        ("key", pa.int64()),
        ("val", pa.bool_()),
        ("conversation", CONVERSATION),
    ]
)
FEAT_SCHEMA = pa.schema([("uid", pa.string())])
OUTCOMES = ("kept", "duplicate", "no_features", "sampled_out", "over_cap", "malformed")


# ---------------------------------------------------------------------------------------------
# Hashing helpers (vectorised where it matters)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _seed64(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def _uid_ints(uids: list[str] | pa.Array) -> np.ndarray:
    """16-hex uids -> uint64, vectorised (the caller guarantees the format)."""
    if isinstance(uids, (pa.Array, pa.ChunkedArray)):
        uids = uids.to_pylist()
    if not uids:
        return np.zeros(0, dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(uids)), dtype=">u8").astype(np.uint64)


@dataclass
class Placement:
    """Where a uid goes: its partition and its split. Both from one salted mix of the uid."""

    partitions: int
    split_seed: int
    val_fraction: float

    def __post_init__(self) -> None:
        self.salt = np.uint64(_seed64("split", self.split_seed))
        self.threshold = int(round(self.val_fraction * 10000))

    def place(self, uid_ints: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h = _splitmix64(uid_ints ^ self.salt)
        part = ((h >> np.uint64(32)) % np.uint64(self.partitions)).astype(np.int64)
        val = ((h & np.uint64(0xFFFFFFFF)) % np.uint64(10000)).astype(np.int64) < self.threshold
        return part, val

    def is_validation(self, uid: str) -> bool:
        return bool(self.place(_uid_ints([uid]))[1][0])


# ---------------------------------------------------------------------------------------------
# Spill files: P Arrow IPC streams, appended chunk by chunk


class Spill:
    def __init__(self, folder: str, prefix: str, partitions: int, schema: pa.Schema):
        self.folder, self.prefix, self.partitions, self.schema = folder, prefix, partitions, schema
        self.writers: dict[int, pa.ipc.RecordBatchStreamWriter] = {}
        self.rows = 0

    def path(self, p: int) -> str:
        return os.path.join(self.folder, f"{self.prefix}-{p:05d}.arrow")

    def write(self, table: pa.Table, parts: np.ndarray) -> None:
        if table.num_rows == 0:
            return
        order = np.argsort(parts, kind="stable")
        table = table.take(pa.array(order))
        sorted_parts = parts[order]
        bounds = np.flatnonzero(np.diff(sorted_parts)) + 1
        starts = np.concatenate([[0], bounds])
        ends = np.concatenate([bounds, [len(sorted_parts)]])
        for s, e in zip(starts.tolist(), ends.tolist()):
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
        if not os.path.exists(self.path(p)):
            return self.schema.empty_table()
        with pa.memory_map(self.path(p)) as src:
            return pa.ipc.open_stream(src).read_all()


def _raise_open_files_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need + 64:
        target = need + 64 if hard == resource.RLIM_INFINITY else min(hard, need + 64)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass


# ---------------------------------------------------------------------------------------------
# Per-source accounting


@dataclass
class SourceStats:
    kind: str
    input: int = 0
    outcomes: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # first malformed records, for the summary

    def accounted(self) -> int:
        return sum(self.outcomes.values()) + sum(self.rejected.values())

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "input": self.input}
        d.update({k: int(self.outcomes.get(k, 0)) for k in OUTCOMES})
        d["rejected"] = dict(sorted(self.rejected.items()))
        if self.examples:
            d["malformed_examples"] = list(self.examples)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SourceStats":
        s = cls(kind=d["kind"], input=d["input"])
        s.outcomes.update({k: d.get(k, 0) for k in OUTCOMES})
        s.rejected.update(d.get("rejected", {}))
        s.examples = list(d.get("malformed_examples", []))
        return s


class _Progress:
    def __init__(self, every: float = 10.0):
        self.every, self.last, self.start = every, time.time(), time.time()

    def tick(self, what: Callable[[], str]) -> None:
        now = time.time()
        if now - self.last >= self.every:
            self.last = now
            print(f"[instruct] {now - self.start:7.0f}s  {what()}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Building rows


class RowBuilder:
    """Turns (uid, task, turns) of one source into spilled rows, applying weight and cap."""

    def __init__(self, spill: Spill, placement: Placement, src: int, name: str, weight: float,
                 cap: Optional[int], seed: int, stats: SourceStats, chunk_rows: int):
        self.spill, self.placement, self.src, self.stats = spill, placement, src, stats
        self.name_bytes = name.encode() + b"\x00"
        self.weight, self.cap, self.chunk_rows = weight, cap, chunk_rows
        self.sample_mix = _seed64("weight", seed, name)
        self.accepted = 0
        self._reset()

    def _reset(self) -> None:
        self.uids: list[str] = []
        self.tasks: list[str] = []
        self.sids: list[str] = []
        self.keys: list[int] = []
        self.roles: list[str] = []
        self.contents: list[str] = []
        self.offsets: list[int] = [0]

    def add(self, uid: str, task: str, turns: list[tuple[str, str]]) -> None:
        if len(turns) == 2:  # the common case, without the generator
            text = turns[0][0] + "\x1f" + turns[0][1] + "\x1e" + turns[1][0] + "\x1f" + turns[1][1]
        else:
            text = "\x1e".join(r + "\x1f" + c for r, c in turns)
        kd = hashlib.blake2b((uid + "\x00" + text).encode(), digest_size=8).digest()
        sd = hashlib.blake2b(self.name_bytes + kd, digest_size=8).digest()
        if self.weight < 1.0:
            x = (int.from_bytes(sd, "big") ^ self.sample_mix) * 0x9E3779B97F4A7C15 & MASK64
            if (x >> 11) / 9007199254740992.0 >= self.weight:
                self.stats.outcomes["sampled_out"] += 1
                return
        if self.cap is not None and self.accepted >= self.cap:
            self.stats.outcomes["over_cap"] += 1
            return
        self.accepted += 1
        self.uids.append(uid)
        self.tasks.append(task)
        self.sids.append(sd.hex())
        self.keys.append(int.from_bytes(kd, "big", signed=True))
        for r, c in turns:
            self.roles.append(r)
            self.contents.append(c)
        self.offsets.append(len(self.roles))
        if len(self.uids) >= self.chunk_rows:
            self.flush()

    def flush(self) -> None:
        n = len(self.uids)
        if n == 0:
            return
        part, val = self.placement.place(_uid_ints(self.uids))
        turns = pa.StructArray.from_arrays(
            [pa.array(self.roles, pa.string()), pa.array(self.contents, pa.string())], fields=list(TURN)
        )
        conv = pa.ListArray.from_arrays(pa.array(self.offsets, pa.int32()), turns, type=CONVERSATION)
        table = pa.Table.from_arrays(
            [
                pa.array(self.uids, pa.string()),
                pa.array(np.full(n, self.src, dtype=np.int16)),
                pa.array(self.tasks, pa.string()),
                pa.array(self.sids, pa.string()),
                pa.array(self.keys, pa.int64()),
                pa.array(val),
                conv,
            ],
            schema=SPILL_SCHEMA,
        )
        self.spill.write(table, part)
        self._reset()


# ---------------------------------------------------------------------------------------------
# Sources


@dataclass
class _Ctx:
    cfg: InstructConfig
    pairs: str
    templates: Any  # dict task -> TaskTemplates, loaded on first use
    indexes: dict[tuple[str, int], ImageIndex] = field(default_factory=dict)

    def index(self, rule: str, components: int) -> Optional[ImageIndex]:
        if rule in ("url", "uid"):
            return None
        key = (rule, components if rule == "path" else 0)
        if key not in self.indexes:
            self.indexes[key] = ImageIndex(self.pairs, rule, components)
        return self.indexes[key]


class _CaptionTasks:
    """Chooses a task (by weight), a prompt and a response per caption, by a seeded hash."""

    def __init__(self, templates: dict, weights: dict[str, float], seed: int, task_label: Optional[str]):
        names = [t for t, w in weights.items() if w > 0]
        total = sum(weights[t] for t in names)
        self.cum = np.cumsum([weights[t] / total for t in names]).tolist()
        self.names = names
        self.tpl = [templates[t] for t in names]
        self.seed = str(seed).encode() + b"\x00"
        self.label = task_label

    def make(self, uid: str, caption: str) -> tuple[str, list[tuple[str, str]]]:
        h = int.from_bytes(hashlib.blake2b(self.seed + (uid + caption).encode(), digest_size=8).digest(), "big")
        i = min(bisect.bisect_right(self.cum, (h >> 40) / 16777216.0), len(self.cum) - 1)
        t = self.tpl[i]
        prompt = t.prompts[(h & 0xFFFFF) % len(t.prompts)]
        response = fill(t.responses[((h >> 20) & 0xFFFFF) % len(t.responses)], caption)
        return self.label or self.names[i], [(ROLE_USER, prompt), (ROLE_ASSISTANT, response)]


def _bad(ctx: _Ctx, stats: SourceStats, file: str, where: str, err: Malformed) -> None:
    if ctx.cfg.on_bad_record == "error":
        raise UserError(f"{file}: {where}: {err} (set instruct.on_bad_record: skip to skip and count such records)")
    stats.outcomes["malformed"] += 1
    if len(stats.examples) < 3:
        stats.examples.append(f"{file}: {where}: {err}")


def _run_captions_table(ctx: _Ctx, spec: Any, table: str, rows: RowBuilder, stats: SourceStats, progress: _Progress) -> None:
    manifest = Manifest.load(table)
    if manifest is None:
        raise FileNotFoundError(f"instruct source '{rows.name_bytes[:-1].decode()}': no pairs table at {table}; run `lmeye download` first")
    tasks = _CaptionTasks(ctx.templates(list(spec.tasks)), spec.tasks, ctx.cfg.seed, spec.task)
    fs, root = fsspec.core.url_to_fs(table)
    rej = stats.rejected
    for name in sorted(manifest.shards):
        with fs.open(root.rstrip("/") + "/" + name) as f:
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=["uid", "caption", "status"], batch_size=ctx.cfg.chunk_rows):
                d = batch.to_pydict()
                stats.input += batch.num_rows
                for uid, caption, status in zip(d["uid"], d["caption"], d["status"]):
                    if status != SUCCESS:
                        rej["image_failed"] += 1
                    elif caption is None or not caption.strip():
                        rej["no_caption"] += 1
                    elif not HEX16_RE.match(uid):
                        rej["bad_uid"] += 1
                    else:
                        task, turns = tasks.make(uid, caption.strip())
                        rows.add(uid, task, turns)
                progress.tick(lambda: f"{stats.input} caption rows read")


def _run_file_source(ctx: _Ctx, spec: Any, rows: RowBuilder, stats: SourceStats, progress: _Progress) -> None:
    kind = spec.kind
    index = ctx.index(spec.image_key, spec.path_components)
    task = spec.task or DEFAULT_TASK.get(kind)
    caption_tasks = None
    if kind == "captions":
        caption_tasks = _CaptionTasks(ctx.templates(list(spec.tasks)), spec.tasks, ctx.cfg.seed, spec.task)
    try:
        for file, where, rec in read_json_source(spec.path):
            stats.input += 1
            try:
                if isinstance(rec, Malformed):
                    raise rec
                if kind == "vqa":
                    out = parse_qa(rec, spec.image_field, spec.question_field, spec.answer_field)
                elif kind == "lmeyemid":
                    out = parse_qa(rec, spec.image_field, spec.question_field, spec.answer_field)
                elif kind == "llava":
                    out = parse_llava(rec, spec.image_field, spec.conversations_field)
                else:
                    out = parse_caption_record(rec, spec.image_field, spec.caption_field)
            except Malformed as err:
                _bad(ctx, stats, file, where, err)
                continue
            if isinstance(out, Reject):
                stats.rejected[out.reason] += 1
                continue
            ref = out.image if isinstance(out, Parsed) else out[0]
            uid = resolve(ref, spec.image_key, index, spec.path_components, spec.url_prefix)
            if isinstance(uid, Reject):
                stats.rejected[uid.reason] += 1
                continue
            if caption_tasks is not None:
                t, turns = caption_tasks.make(uid, out[1].strip())
                rows.add(uid, t, turns)
            else:
                rows.add(uid, task, out.turns)
            if stats.input % 4096 == 0:
                progress.tick(lambda: f"{spec.path}: {stats.input} records read")
    except Malformed as err:  # the file as a whole is not a JSON list: never skippable
        raise UserError(str(err)) from None


# ---------------------------------------------------------------------------------------------
# Inputs: resolve paths, check the features table, fingerprint


def _fill_paths(text: Optional[str], cfg: Config) -> Optional[str]:
    if text is None:
        return None
    return text.replace("{data.root}", cfg.data.root.rstrip("/")).replace("{demo.corpus_dir}", str(cfg.demo.corpus_dir).rstrip("/"))


def _resolved_sources(cfg: Config) -> list[Any]:
    out = []
    for spec in cfg.instruct.sources:
        if not spec.enabled:
            continue
        updates: dict[str, Any] = {"name": spec.name or spec.kind, "path": _fill_paths(spec.path, cfg)}
        if spec.kind == "captions":
            updates["table"] = _fill_paths(spec.table, cfg) or cfg.instruct.pairs
        out.append(spec.model_copy(update=updates))
    return out


def _table_signature(path: str) -> Optional[dict[str, Any]]:
    m = Manifest.load(path)
    if m is None:
        return None
    return {"table": m.table, "complete": m.complete, "shards": {n: s.sha256 for n, s in sorted(m.shards.items())}}


def _features_manifest(ic: InstructConfig) -> Optional[Manifest]:
    if not ic.require_features:
        return None
    m = Manifest.load(ic.features)
    where = f"{ic.features.rstrip('/')}/_manifest.json"
    if m is None:
        raise UserError(
            f"instruct.features: no features table at {ic.features} ({where} not found); run `lmeye extract` first, "
            "or set instruct.require_features: false to build without the feature check"
        )
    if m.table != "features":
        raise UserError(f"{where}: this is a '{m.table}' table, expected 'features'")
    if not m.complete:
        raise UserError(f"{where}: the features table is incomplete (its stage has not finished); rerun `lmeye extract`")
    return m


def _spill_features(ic: InstructConfig, manifest: Manifest, spill: Spill, placement: Placement) -> tuple[int, int]:
    """Spill the uids that have features; returns (uids with features, rows without)."""
    fs, root = fsspec.core.url_to_fs(ic.features)
    kept = skipped = 0
    for name in sorted(manifest.shards):
        with fs.open(root.rstrip("/") + "/" + name) as f:
            pf = pq.ParquetFile(f)
            names = pf.schema_arrow.names
            if "uid" not in names:
                raise UserError(f"{ic.features.rstrip('/')}/{name}: features table has no 'uid' column (has: {', '.join(names)})")
            cols = ["uid"] + (["status"] if "status" in names else [])
            for batch in pf.iter_batches(columns=cols, batch_size=262144):
                uids = batch.column(0)
                mask = pc.match_substring_regex(uids, "^[0-9a-f]{16}$")
                if "status" in cols:
                    mask = pc.and_(mask, pc.equal(batch.column(1), SUCCESS))
                mask = pc.fill_null(mask, False)
                good = pc.filter(uids, mask)
                skipped += batch.num_rows - len(good)
                kept += len(good)
                if len(good):
                    part, _ = placement.place(_uid_ints(good))
                    spill.write(pa.table({"uid": good}), part)
    return kept, skipped


def _file_bytes(path: str) -> int:
    total = 0
    for f in list_files(path):
        fs, root = fsspec.core.url_to_fs(f)
        total += fs.size(root) or 0
    return total


# ---------------------------------------------------------------------------------------------
# Per partition


def _process_partition(rows: pa.Table, feats: Optional[pa.Table], names: list[str], dedupe: bool,
                       seed: int, p: int) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Feature check, dedup, shuffle and split of one partition, with a single copy of the rows:
    the decisions are made on numpy index arrays, then one ``take`` builds the output (train
    rows first, then validation rows, so both sides are zero-copy slices)."""
    stats: dict[str, Any] = {"no_features": {}, "duplicate": {}, "kept": {}, "tasks": {}}
    n0 = rows.num_rows
    src = rows["src"].to_numpy() if n0 else np.zeros(0, dtype=np.int16)
    sel = np.arange(n0, dtype=np.int64)
    if feats is not None and n0:
        has = pc.is_in(rows["uid"], value_set=feats["uid"].combine_chunks()).to_numpy(zero_copy_only=False)
        stats["no_features"] = _count_by_src(src[~has], names)
        sel = sel[has]
    if dedupe and len(sel):
        _, first = np.unique(rows["key"].to_numpy()[sel], return_index=True)  # first occurrence of each key
        if len(first) < len(sel):
            first.sort()
            dropped = np.ones(len(sel), dtype=bool)
            dropped[first] = False
            stats["duplicate"] = _count_by_src(src[sel[dropped]], names)
            sel = sel[first]
    stats["kept"] = _count_by_src(src[sel], names)
    sel = sel[np.random.default_rng([seed & MASK64, p]).permutation(len(sel))]
    val = rows["val"].to_numpy(zero_copy_only=False)[sel] if len(sel) else np.zeros(0, dtype=bool)
    sel = np.concatenate([sel[~val], sel[val]])
    n_train = int((~val).sum())
    kept = rows.take(pa.array(sel))
    del rows
    source = pa.array(names, pa.string()).take(pa.array(src[sel].astype(np.int32)))
    split = pa.array(np.where(np.arange(len(sel)) < n_train, TRAIN, VALIDATION).tolist() if len(sel) else [], pa.string())
    out = pa.Table.from_arrays(
        [kept["sample_id"], kept["uid"], source, kept["task"], split, kept["conversation"]],
        schema=INSTRUCTIONS.with_metadata(INSTRUCTIONS.schema),
    )
    if len(sel):
        stats["tasks"] = {t["values"]: t["counts"] for t in pc.value_counts(out["task"]).to_pylist()}
    stats["train"], stats["validation"] = n_train, len(sel) - n_train
    return out.slice(0, n_train), out.slice(n_train), stats


def _count_by_src(src: np.ndarray, names: list[str]) -> dict[str, int]:
    if len(src) == 0:
        return {}
    counts = np.bincount(src.astype(np.int64), minlength=len(names))
    return {names[i]: int(c) for i, c in enumerate(counts) if c}


# ---------------------------------------------------------------------------------------------
# The stage


def _config_for_fingerprint(ic: InstructConfig, sources: list[Any]) -> dict[str, Any]:
    d = ic.model_dump(mode="json", exclude={"export_hf", "tmp_dir", "chunk_rows", "sources"})
    d["sources"] = [s.model_dump(mode="json") for s in sources]
    return d


def _summary_from_stats(ic: InstructConfig, stats: dict[str, Any], seconds: float, done: int, skipped: int) -> StageSummary:
    sources = stats.get("sources", {})
    total_in = sum(s["input"] for s in sources.values())
    summary = StageSummary(stage=STAGE, output=ic.output, seconds=seconds, shards_done=done, shards_skipped=skipped,
                           rate=(total_in / seconds if seconds > 0 else None), rate_unit="records/s")
    summary.rows = sum(stats.get("splits", {}).values())
    summary.counts = dict(stats.get("splits", {}))
    for name, s in sources.items():
        summary.counts[f"kept[{name}]"] = s["kept"]
        for reason, n in s["rejected"].items():
            summary.failures[f"{name}: rejected: {reason}"] = n
        for reason in ("malformed", "no_features"):
            if s.get(reason):
                summary.failures[f"{name}: {reason}"] = s[reason]
        parts = [f"{s['kept']} kept"] + [f"{s[k]} {k}" for k in OUTCOMES[1:] if s.get(k)]
        if s["rejected"]:
            parts.append(f"{sum(s['rejected'].values())} rejected")
        summary.notes.append(f"{name} ({s['kind']}): {s['input']} in = " + " + ".join(parts))
        for ex in s.get("malformed_examples", [])[:1]:
            summary.notes.append(f"{name}: first malformed record skipped: {ex}")
    if not stats.get("features_checked", False):
        summary.notes.append("features NOT checked (instruct.require_features: false): rows kept without the feature check")
    return summary


def run(cfg: Config) -> StageSummary:
    """Build the `instructions` table from the configured sources; see the module doc."""
    started = time.time()
    ic = cfg.instruct
    sources = _resolved_sources(cfg)
    if not sources:
        raise UserError("instruct.sources: no enabled source; configure at least one")
    templates_path = _fill_paths(ic.templates, cfg) or str(DEFAULT_TEMPLATES)
    features = _features_manifest(ic)
    uses_templates = any(s.kind == "captions" for s in sources)

    # What the output depends on: the config and every input.
    listing: list[Any] = []
    for s in sources:
        if s.kind == "captions" and s.path is None:
            sig = _table_signature(s.table)
            if sig is None:
                raise FileNotFoundError(f"instruct source '{s.name}': no pairs table at {s.table}; run `lmeye download` first")
            listing.append({"table": s.table, "sig": sig})
        else:
            listing.append([file_signature(f) for f in list_files(s.path)])
    needs_pairs = any(s.image_key not in ("url", "uid") and not (s.kind == "captions" and s.path is None) for s in sources)
    if needs_pairs:
        sig = _table_signature(ic.pairs)
        if sig is None:
            raise FileNotFoundError(
                f"instruct.pairs: no pairs table at {ic.pairs} (needed to map image references to uids); "
                "run `lmeye download` first, or use image_key: url or uid"
            )
        listing.append({"pairs": sig})
    if features is not None:
        listing.append({"features": {n: sh.sha256 for n, sh in sorted(features.shards.items())}})
    if uses_templates:
        with fsspec.open(templates_path, "rb") as f:
            listing.append({"templates": hashlib.sha256(f.read()).hexdigest()})
    input_fp = fingerprint(listing)
    config = _config_for_fingerprint(ic, sources)
    config["templates"] = templates_path if uses_templates else None

    # Complete and current: nothing to do.
    old = Manifest.load(ic.output)
    if (old is not None and old.complete and old.table == INSTRUCTIONS.name and old.schema_version == INSTRUCTIONS.version
            and old.config_fingerprint == fingerprint(config) and old.input_fingerprint == input_fp):
        fs, root = fsspec.core.url_to_fs(ic.output)
        try:
            intact = all(fs.size(root.rstrip("/") + "/" + n) == s.bytes for n, s in old.shards.items())
        except FileNotFoundError:
            intact = False
        if intact:
            summary = _summary_from_stats(ic, old.stats, time.time() - started, 0, len(old.shards))
            summary.rate = None
            summary.notes.insert(0, "already complete for this config and these inputs; nothing redone")
            _maybe_export(ic, summary)
            return summary

    # Size the partitions from the input size, so one partition stays bounded.
    est = 0
    for s in sources:
        if s.kind == "captions" and s.path is None:
            m = Manifest.load(s.table)
            est += (m.num_rows if m is not None else 0) * CAPTION_ROW_BYTES
        else:
            est += _file_bytes(s.path)
    partitions = max(1, math.ceil(est / (ic.partition_mb * 1024 * 1024)))
    placement = Placement(partitions, ic.split_seed, ic.val_fraction)
    _raise_open_files_limit(2 * partitions)

    writer = TableWriter(ic.output, INSTRUCTIONS, config=config, input_fingerprint=input_fp)
    shard_fp = fingerprint([input_fp, partitions])
    names = [s.name for s in sources]
    stats = {s.name: SourceStats(kind=s.kind) for s in sources}
    cache: dict[str, Any] = {}

    def templates(tasks: list[str]) -> dict:
        key = ",".join(tasks)
        if key not in cache:
            try:
                cache[key] = load_templates(templates_path, tasks)
            except ValueError as err:
                raise UserError(str(err)) from None
        return cache[key]

    ctx = _Ctx(cfg=ic, pairs=ic.pairs, templates=templates)
    progress = _Progress()
    spill_dir = tempfile.mkdtemp(prefix="lingcloud-instruct-", dir=ic.tmp_dir)
    done = skipped = 0
    expected: list[str] = []
    splits: Counter = Counter()
    tasks: Counter = Counter()
    try:
        row_spill = Spill(spill_dir, "rows", partitions, SPILL_SCHEMA)
        feat_spill = Spill(spill_dir, "feat", partitions, FEAT_SCHEMA)
        try:
            for i, spec in enumerate(sources):
                rows = RowBuilder(row_spill, placement, i, spec.name, spec.weight, spec.cap, ic.seed,
                                  stats[spec.name], ic.chunk_rows)
                if spec.kind == "captions" and spec.path is None:
                    _run_captions_table(ctx, spec, spec.table, rows, stats[spec.name], progress)
                else:
                    _run_file_source(ctx, spec, rows, stats[spec.name], progress)
                rows.flush()
            features_info = None
            if features is not None:
                features_info = _spill_features(ic, features, feat_spill, placement)
        finally:
            row_spill.close()
            feat_spill.close()

        for p in range(partitions):
            tname, vname = shard_name(TRAIN, p, partitions), shard_name(VALIDATION, p, partitions)
            expected += [tname, vname]
            if writer.is_done(tname, shard_fp) and writer.is_done(vname, shard_fp):
                pstats = writer.manifest.shards[tname].stats
                skipped += 2
            else:
                feats = feat_spill.read(p) if features is not None else None
                train, valid, pstats = _process_partition(row_spill.read(p), feats, names, ic.dedupe, ic.seed, p)
                writer.write(tname, train, input_fingerprint=shard_fp, stats=pstats)
                writer.write(vname, valid, input_fingerprint=shard_fp, stats={"rows": valid.num_rows})
                del train, valid
                pa.default_memory_pool().release_unused()  # give freed buffers back between partitions
                done += 2
                for tmp in (row_spill.path(p), feat_spill.path(p)):
                    if os.path.exists(tmp):
                        os.remove(tmp)
            for outcome in ("no_features", "duplicate", "kept"):
                for name, n in pstats.get(outcome, {}).items():
                    stats[name].outcomes[outcome] += n
            splits[TRAIN] += pstats.get("train", 0)
            splits[VALIDATION] += pstats.get("validation", 0)
            tasks.update(pstats.get("tasks", {}))
            progress.tick(lambda: f"partition {p + 1}/{partitions} written")
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    for name, s in stats.items():
        if s.accounted() != s.input:  # a bug, never a data problem: say so loudly
            raise RuntimeError(f"instruct: source {name}: {s.input} records in, {s.accounted()} accounted for")
    out_stats: dict[str, Any] = {
        "sources": {n: s.to_dict() for n, s in stats.items()},
        "splits": {TRAIN: splits[TRAIN], VALIDATION: splits[VALIDATION]},
        "tasks": dict(sorted(tasks.items())),
        "partitions": partitions,
        "features_checked": features is not None,
        "input_records": sum(s.input for s in stats.values()),
    }
    if features is not None:
        out_stats["feature_uids"], out_stats["feature_rows_without_features"] = features_info
    writer.finalize(expected, out_stats, metadata={"val_fraction": str(ic.val_fraction), "split_seed": str(ic.split_seed)})
    summary = _summary_from_stats(ic, out_stats, time.time() - started, done, skipped)
    _maybe_export(ic, summary)
    return summary


# ---------------------------------------------------------------------------------------------
# Hugging Face export


def split_files(path: str) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]}``: the shard paths of a finished table, by split."""
    reader = TableReader(path, INSTRUCTIONS)
    out: dict[str, list[str]] = {TRAIN: [], VALIDATION: []}
    for name, file in zip(reader.shard_names, reader.files):
        out[name.split("-", 1)[0]].append(file)
    return out


def export_hf(path: str, out_dir: str) -> Any:
    """Write the table as a ``datasets.DatasetDict`` (train, validation) that ``load_from_disk``
    opens. Streams through the Arrow cache of ``datasets``; nothing is held in memory."""
    import datasets

    files = split_files(path)
    cache = tempfile.mkdtemp(prefix="lingcloud-hf-")
    try:
        dd = datasets.load_dataset("parquet", data_files=files, cache_dir=cache)
        dd.save_to_disk(out_dir)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    return dd


def _maybe_export(ic: InstructConfig, summary: StageSummary) -> None:
    if ic.export_hf:
        export_hf(ic.output, ic.export_hf)
        summary.notes.append(f"exported a HF DatasetDict to {ic.export_hf} (datasets.load_from_disk)")


__all__ = ["run", "export_hf", "split_files", "Placement"]
