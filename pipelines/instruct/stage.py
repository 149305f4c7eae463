"""The instruct stage's driver: LMEyeMID-style instruction data -> the `instructions` table.

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
   no features (a text-only row has no image and needs none), with ``instruct.curation`` rows
   whose image the curation table does not keep (``curation``), drop exact duplicates (same uid
   and same conversation; the earlier source in the config, then the earlier record, wins),
   shuffle with the seed, and write a ``train-`` and a ``validation-`` shard with
   ``TableWriter`` (atomic shards, manifest). A side without rows gets no shard; the last shard
   a partition writes records the partition's names and stats, which is how a rerun knows the
   partition is finished.

The split is by uid: validation iff ``mix(uid, split_seed) mod 10000 < val_fraction * 10000``,
so no image is on both sides. Shuffling: the partition of a row is a hash of its uid (a random
assignment) and rows are permuted inside each partition with a seeded generator; both are
deterministic, so a rerun writes the same bytes.

Accounting: for every source, ``input = kept + duplicate + no_features + sampled_out + over_cap
+ malformed + sum(rejected by reason)``; it is checked at the end and stored in the manifest.

Inputs: the pairs and features tables are read through ``lmeye.tables.open_table`` only, which
refuses an incomplete table or another schema version; ``instruct.allow_incomplete``
(``--allow-incomplete``) reads an unfinished table's finished shards and says so in the summary
and in the manifest's ``stats.incomplete_inputs``.

Resume: a rerun whose config and inputs match a complete table does nothing; after a killed
run, partitions whose shards are finished are not rewritten.

Runs on the driver alone (no Ray needed): the work is parsing and hashing, and the
per-partition step is bounded, so one process meets the benchmark on two cores.

This module keeps the stage's story; the mechanics live beside it in the package: ``partition``
(uid keys, placement, spill files), ``rows`` (accounting, row building, source runners),
``inputs`` (paths, input tables), ``jsonio`` and ``records`` (JSON readers and parsers),
``images`` (image reference -> uid), ``captions`` (caption tasks) and ``export`` (HF).
"""

from __future__ import annotations

import hashlib
import math
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmeye.config import Config
from lmeye.config.instruct import InstructConfig
from lmeye.errors import UserError
from lmeye.report import StageSummary
from lmeye.spill import Spill, raise_open_files_limit
from lmeye.tables import Manifest, TableWriter, fingerprint, shard_file
from lmeye.templates import CAPTIONS as DEFAULT_TEMPLATES
from pipelines.instruct import curation
from pipelines.instruct.captions import load_templates
from pipelines.instruct.export import export_hf
from pipelines.instruct.inputs import (
    InputTables,
    features_table,
    file_bytes,
    fill_paths,
    resolved_sources,
    spill_features,
    uses_pairs_table,
)
from pipelines.instruct.jsonio import file_signature, list_files
from pipelines.instruct.partition import FEAT_SCHEMA, KEY, MASK64, SPILL_SCHEMA, SRC, VAL, Placement
from pipelines.instruct.rows import OUTCOMES, Progress, RowBuilder, SourceContext, SourceStats, run_captions_table, run_file_source
from schemas.instructions import (
    CONVERSATION_COL,
    INSTRUCTIONS,
    SAMPLE_ID,
    SOURCE,
    SOURCE_ID,
    SPLIT,
    TASK,
    TRAIN,
    UID,
    VALIDATION,
    shard_name,
)

STAGE = "instruct"
# Rough in-memory bytes of one spilled row, to size partitions before reading: a caption row
# (uid, ids, a short prompt and a caption); file sources are sized by their file size.
CAPTION_ROW_BYTES = 256
PARTITION_SHARDS = "partition_shards"  # stats key of a partition's last shard: all its shards


# ---------------------------------------------------------------------------------------------
# Per partition


def process_partition(rows: pa.Table, feats: Optional[pa.Table], names: list[str], dedupe: bool,
                      seed: int, p: int, kept: Optional[pa.Table] = None) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    """Feature check, dedup, shuffle and split of one partition, with a single copy of the rows:
    the decisions are made on numpy index arrays, then one ``take`` builds the output (train
    rows first, then validation rows, so both sides are zero-copy slices)."""
    stats: dict[str, Any] = {"no_features": {}, curation.OUTCOME: {}, "duplicate": {}, "kept": {}, "tasks": {}}
    n0 = rows.num_rows
    src = rows[SRC].to_numpy() if n0 else np.zeros(0, dtype=np.int16)
    sel = np.arange(n0, dtype=np.int64)
    if feats is not None and n0:
        has = pc.is_in(rows[UID], value_set=feats[UID].combine_chunks()).to_numpy(zero_copy_only=False)
        has |= pc.is_null(rows[UID]).to_numpy(zero_copy_only=False)  # text-only: no image, no features needed
        stats["no_features"] = _count_by_src(src[~has], names)
        sel = sel[has]
    if kept is not None and len(sel):  # the curation keep-list (instruct.curation)
        ok = curation.kept_mask(rows[UID], kept)[sel]
        stats[curation.OUTCOME] = _count_by_src(src[sel[~ok]], names)
        sel = sel[ok]
    if dedupe and len(sel):
        _, first = np.unique(rows[KEY].to_numpy()[sel], return_index=True)  # first occurrence of each key
        if len(first) < len(sel):
            first.sort()
            dropped = np.ones(len(sel), dtype=bool)
            dropped[first] = False
            stats["duplicate"] = _count_by_src(src[sel[dropped]], names)
            sel = sel[first]
    stats["kept"] = _count_by_src(src[sel], names)
    sel = sel[np.random.default_rng([seed & MASK64, p]).permutation(len(sel))]
    val = rows[VAL].to_numpy(zero_copy_only=False)[sel] if len(sel) else np.zeros(0, dtype=bool)
    sel = np.concatenate([sel[~val], sel[val]])
    n_train = int((~val).sum())
    kept = rows.take(pa.array(sel))
    del rows
    source = pa.array(names, pa.string()).take(pa.array(src[sel].astype(np.int32)))
    split = pa.array(np.where(np.arange(len(sel)) < n_train, TRAIN, VALIDATION).tolist() if len(sel) else [], pa.string())
    columns = {SAMPLE_ID: kept[SAMPLE_ID], UID: kept[UID], SOURCE: source, TASK: kept[TASK], SPLIT: split,
               CONVERSATION_COL: kept[CONVERSATION_COL], SOURCE_ID: kept[SOURCE_ID]}
    out = pa.Table.from_arrays([columns[c] for c in INSTRUCTIONS.columns], schema=INSTRUCTIONS.with_metadata(INSTRUCTIONS.schema))
    if len(sel):
        stats["tasks"] = {t["values"]: t["counts"] for t in pc.value_counts(out[TASK]).to_pylist()}
    stats["train"], stats["validation"] = n_train, len(sel) - n_train
    return out.slice(0, n_train), out.slice(n_train), stats


def _count_by_src(src: np.ndarray, names: list[str]) -> dict[str, int]:
    if len(src) == 0:
        return {}
    counts = np.bincount(src.astype(np.int64), minlength=len(names))
    return {names[i]: int(c) for i, c in enumerate(counts) if c}


def _finished_partition(writer: TableWriter, p: int, partitions: int, fp: str) -> Optional[dict[str, Any]]:
    """The stats of partition p when a previous run finished it (its last shard lists them all)."""
    for split in (VALIDATION, TRAIN):  # the last one written carries the list
        info = writer.manifest.shards.get(shard_name(split, p, partitions))
        if info is not None and PARTITION_SHARDS in info.stats:
            if all(writer.is_done(n, fp) for n in info.stats[PARTITION_SHARDS]):
                return info.stats
    return None


def write_partition(writer: TableWriter, p: int, partitions: int, fp: str, train: pa.Table, valid: pa.Table,
                    stats: dict[str, Any]) -> list[str]:
    """Write the non-empty sides of partition p (never a 0-row shard); the last one carries the
    partition's stats and shard list. Returns the names written."""
    parts = [(shard_name(s, p, partitions), t) for s, t in ((TRAIN, train), (VALIDATION, valid)) if t.num_rows]
    names = [n for n, _ in parts]
    for k, (name, table) in enumerate(parts):
        last = k == len(parts) - 1
        writer.write(name, table, input_fingerprint=fp,
                     stats={**stats, PARTITION_SHARDS: names} if last else {"rows": table.num_rows})
    return names


# ---------------------------------------------------------------------------------------------
# The stage


def _config_for_fingerprint(ic: InstructConfig, sources: list[Any]) -> dict[str, Any]:
    d = ic.model_dump(mode="json", exclude={"export_hf", "tmp_dir", "chunk_rows", "sources", "allow_incomplete",
                                            "debug_delay_s", "max_malformed_fraction"})
    # keys added later enter only when set, so tables built before them keep their fingerprint
    d["sources"] = [{k: v for k, v in s.model_dump(mode="json").items() if not (k == "answers" and v is None)}
                    for s in sources]
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
        if s.get("text_only"):
            summary.notes.append(f"{name}: {s['text_only']} text-only records (no image, null uid)")
        if s.get("dropped_turns"):
            dropped = ", ".join(f"{n} {r}" for r, n in s["dropped_turns"].items())
            summary.notes.append(f"{name}: question/answer pairs left out of kept conversations: {dropped}")
        for ex in s.get("malformed_examples", [])[:1]:
            summary.notes.append(f"{name}: first malformed record skipped: {ex}")
    if not stats.get("features_checked", False):
        summary.notes.append("features NOT checked (instruct.require_features: false): rows kept without the feature check")
    for line in stats.get("incomplete_inputs", []):
        summary.notes.append(line)
    return summary


def _input_fingerprint(ic: InstructConfig, sources: list[Any], inputs: InputTables, features, templates_path: Optional[str],
                       curated=None) -> str:
    """What the output depends on besides the config: every input table's shards and every file."""
    listing: list[Any] = []
    for s in sources:
        if uses_pairs_table(s):
            listing.append({"table": s.table, "sig": inputs.pairs(s.table, f"instruct source '{s.name}'").signature()})
        else:
            listing.append([file_signature(f) for f in list_files(s.path)])
            if getattr(s, "answers", None):
                listing.append({"answers": file_signature(s.answers)})
    if any(s.image_key not in ("url", "uid") and not uses_pairs_table(s) for s in sources):
        pairs = inputs.pairs(ic.pairs, "instruct.pairs (needed to map image references to uids; or use image_key: url or uid)")
        listing.append({"pairs": pairs.signature()})
    if features is not None:
        listing.append({"features": features.signature()})
    if curated is not None:
        listing.append({"curation": curated.signature()})
    if templates_path is not None:
        with fsspec.open(templates_path, "rb") as f:
            listing.append({"templates": hashlib.sha256(f.read()).hexdigest()})
    return fingerprint(listing)


def _already_complete(ic: InstructConfig, config: dict[str, Any], input_fp: str) -> Optional[Manifest]:
    old = Manifest.load(ic.output)
    if not (old is not None and old.complete and old.table == INSTRUCTIONS.name and old.schema_version == INSTRUCTIONS.version
            and old.config_fingerprint == fingerprint(config) and old.input_fingerprint == input_fp):
        return None
    fs, root = fsspec.core.url_to_fs(ic.output)
    try:
        intact = all(fs.size(root.rstrip("/") + "/" + shard_file(n)) == s.bytes for n, s in old.shards.items())
    except FileNotFoundError:
        intact = False
    return old if intact else None


@dataclass
class _Job:
    """What a run reads, resolved before anything is spilled."""

    sources: list[Any]
    inputs: InputTables
    features: Any  # the features table's reader, or None (no feature check)
    curated: Any  # the curation table's reader, or None
    templates_path: Optional[str]
    config: dict[str, Any]
    input_fp: str
    incomplete: list[str]  # the incomplete input tables read (allow_incomplete), described


@dataclass
class _Spills:
    rows: Spill
    feats: Spill
    keep: Spill
    features_info: Optional[tuple[int, int]] = None  # (uids with features, feature rows without)
    kept_uids: Optional[int] = None


@dataclass
class _Totals:
    """What the per-partition step adds up over the partitions."""

    done: int = 0
    skipped: int = 0
    expected: list[str] = field(default_factory=list)
    splits: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)


def run(cfg: Config) -> StageSummary:
    """Build the `instructions` table from the configured sources; see the module doc."""
    started = time.time()
    ic = cfg.instruct
    job = _resolve(cfg)
    old = _already_complete(ic, job.config, job.input_fp)
    if old is not None:
        return _nothing_redone(ic, old, started)

    partitions = _partition_count(ic, job)
    placement = Placement(partitions, ic.split_seed, ic.val_fraction)
    raise_open_files_limit(3 * partitions)
    writer = TableWriter(ic.output, INSTRUCTIONS, config=job.config, input_fingerprint=job.input_fp)
    stats = {s.name: SourceStats(kind=s.kind) for s in job.sources}
    progress = Progress()
    spill_dir = tempfile.mkdtemp(prefix="lingcloud-instruct-", dir=ic.tmp_dir)
    try:
        spills = _spill_inputs(cfg, job, placement, spill_dir, stats, progress)
        totals = _write_partitions(ic, job, writer, spills, partitions, stats, progress)
    finally:
        shutil.rmtree(spill_dir, ignore_errors=True)

    out_stats = _output_stats(ic, job, stats, totals, spills, partitions)
    writer.finalize(totals.expected, out_stats,
                    metadata={"val_fraction": str(ic.val_fraction), "split_seed": str(ic.split_seed)})
    summary = _summary_from_stats(ic, out_stats, time.time() - started, totals.done, totals.skipped)
    _maybe_export(ic, summary)
    return summary


def _resolve(cfg: Config) -> _Job:
    """The enabled sources, the input tables and templates they use, and the fingerprints."""
    ic = cfg.instruct
    sources = resolved_sources(cfg)
    if not sources:
        raise UserError("instruct.sources: no enabled source; configure at least one")
    uses_templates = any(s.kind == "captions" for s in sources)
    templates_path = (fill_paths(ic.templates, cfg) or str(DEFAULT_TEMPLATES)) if uses_templates else None
    inputs = InputTables(ic)
    features = features_table(ic, inputs)
    curated = curation.curation_table(ic, inputs)
    input_fp = _input_fingerprint(ic, sources, inputs, features, templates_path, curated)
    config = _config_for_fingerprint(ic, sources)
    config["templates"] = templates_path
    incomplete = [r.describe_incomplete() for r in inputs.incomplete()]
    return _Job(sources, inputs, features, curated, templates_path, config, input_fp, incomplete)


def _nothing_redone(ic: InstructConfig, old: Manifest, started: float) -> StageSummary:
    summary = _summary_from_stats(ic, old.stats, time.time() - started, 0, len(old.shards))
    summary.rate = None
    summary.notes.insert(0, "already complete for this config and these inputs; nothing redone")
    _maybe_export(ic, summary)
    return summary


def _partition_count(ic: InstructConfig, job: _Job) -> int:
    """Partitions sized from the input size, so one partition stays bounded."""
    est = sum(job.inputs.pairs(s.table).num_rows * CAPTION_ROW_BYTES if uses_pairs_table(s) else file_bytes(s.path)
              for s in job.sources)
    return max(1, math.ceil(est / (ic.partition_mb * 1024 * 1024)))


def _source_context(ic: InstructConfig, job: _Job, spill_dir: str) -> SourceContext:
    cache: dict[str, Any] = {}

    def templates(tasks: list[str]) -> dict:
        key = ",".join(tasks)
        if key not in cache:
            try:
                cache[key] = load_templates(job.templates_path, tasks)
            except ValueError as err:
                raise UserError(str(err)) from None
        return cache[key]

    return SourceContext(cfg=ic, pairs=lambda: job.inputs.pairs(ic.pairs), templates=templates, spill_dir=spill_dir)


def _spill_inputs(cfg: Config, job: _Job, placement: Placement, spill_dir: str, stats: dict[str, SourceStats],
                  progress: Progress) -> _Spills:
    """Step 1: every source's rows, the feature uids and the kept uids, spilled by partition."""
    ic = cfg.instruct
    partitions = placement.partitions
    spills = _Spills(Spill(spill_dir, "rows", partitions, SPILL_SCHEMA), Spill(spill_dir, "feat", partitions, FEAT_SCHEMA),
                     Spill(spill_dir, "keep", partitions, FEAT_SCHEMA))
    ctx = _source_context(ic, job, spill_dir)
    try:
        for i, spec in enumerate(job.sources):
            rows = RowBuilder(spills.rows, placement, i, spec.name, spec.weight, spec.cap, ic.seed,
                              stats[spec.name], ic.chunk_rows)
            if uses_pairs_table(spec):
                run_captions_table(ctx, spec, job.inputs.pairs(spec.table), rows, stats[spec.name], progress)
            else:
                run_file_source(ctx, spec, rows, stats[spec.name], progress)
            rows.flush()
        if job.features is not None:
            spills.features_info = spill_features(job.features, spills.feats, placement)
        if job.curated is not None:
            spills.kept_uids = curation.spill_kept(job.curated, spills.keep, placement)
    finally:
        for spill in (spills.rows, spills.feats, spills.keep):
            spill.close()
    return spills


def _write_partitions(ic: InstructConfig, job: _Job, writer: TableWriter, spills: _Spills, partitions: int,
                      stats: dict[str, SourceStats], progress: Progress) -> _Totals:
    """Step 2: each partition not finished by an earlier run, processed and written in turn."""
    shard_fp = fingerprint([job.input_fp, partitions])
    names = [s.name for s in job.sources]
    totals = _Totals()
    for p in range(partitions):
        pstats = _finished_partition(writer, p, partitions, shard_fp)
        if pstats is not None:
            written = pstats[PARTITION_SHARDS]
            totals.skipped += len(written)
        else:
            feats = spills.feats.read(p) if job.features is not None else None
            kept = spills.keep.read(p) if job.curated is not None else None
            train, valid, pstats = process_partition(spills.rows.read(p), feats, names, ic.dedupe, ic.seed, p, kept)
            written = write_partition(writer, p, partitions, shard_fp, train, valid, pstats)
            del train, valid
            pa.default_memory_pool().release_unused()  # give freed buffers back between partitions
            totals.done += len(written)
            for spill in (spills.rows, spills.feats, spills.keep):
                spill.remove(p)
            if ic.debug_delay_s:
                time.sleep(ic.debug_delay_s)  # tests: a window to kill the stage mid-run
        totals.expected += written
        for outcome in ("no_features", curation.OUTCOME, "duplicate", "kept"):
            for name, n in pstats.get(outcome, {}).items():
                stats[name].outcomes[outcome] += n
        totals.splits[TRAIN] += pstats.get("train", 0)
        totals.splits[VALIDATION] += pstats.get("validation", 0)
        totals.tasks.update(pstats.get("tasks", {}))
        progress.tick(lambda: f"partition {p + 1}/{partitions} written")
    return totals


def _output_stats(ic: InstructConfig, job: _Job, stats: dict[str, SourceStats], totals: _Totals, spills: _Spills,
                  partitions: int) -> dict[str, Any]:
    """The manifest's stats, after checking that every source's records are accounted for."""
    for name, s in stats.items():
        if s.accounted() != s.input:  # a bug, never a data problem: say so loudly
            raise RuntimeError(f"instruct: source {name}: {s.input} records in, {s.accounted()} accounted for")
    out_stats: dict[str, Any] = {
        "sources": {n: s.to_dict() for n, s in stats.items()},
        "splits": {TRAIN: totals.splits[TRAIN], VALIDATION: totals.splits[VALIDATION]},
        "tasks": dict(sorted(totals.tasks.items())),
        "partitions": partitions,
        "features_checked": job.features is not None,
        "input_records": sum(s.input for s in stats.values()),
        "incomplete_inputs": job.incomplete,
    }
    if job.features is not None:
        out_stats["feature_uids"], out_stats["feature_rows_without_features"] = spills.features_info
    if job.curated is not None:
        out_stats["curation"] = {**curation.recorded(ic), "kept_uids": spills.kept_uids}
    return out_stats


def _maybe_export(ic: InstructConfig, summary: StageSummary) -> None:
    if ic.export_hf:
        export_hf(ic.output, ic.export_hf)
        summary.notes.append(f"exported a HF DatasetDict to {ic.export_hf} (datasets.load_from_disk)")
