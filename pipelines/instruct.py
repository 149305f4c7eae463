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

This file keeps the stage's story; the mechanics live beside it: ``instruct_partition`` (uid
hashing, placement, spill files), ``instruct_rows`` (accounting, row building, source runners),
``instruct_inputs`` (paths, features table, signatures) and ``instruct_sources`` (JSON readers
and parsers).
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from typing import Any, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmeye.config import Config
from lmeye.config.instruct import InstructConfig
from lmeye.errors import UserError
from lmeye.report import StageSummary
from lmeye.tables import Manifest, TableReader, TableWriter, fingerprint
from lmeye.templates import CAPTIONS as DEFAULT_TEMPLATES
from pipelines.instruct_inputs import (
    _features_manifest,
    _file_bytes,
    _fill_paths,
    _resolved_sources,
    _spill_features,
    _table_signature,
)
from pipelines.instruct_partition import (
    FEAT_SCHEMA,
    MASK64,
    SPILL_SCHEMA,
    Placement,
    Spill,
    _raise_open_files_limit,
)
from pipelines.instruct_rows import (
    OUTCOMES,
    RowBuilder,
    SourceStats,
    _Ctx,
    _Progress,
    _run_captions_table,
    _run_file_source,
)
from pipelines.instruct_sources import file_signature, list_files, load_templates
from schemas.instructions import INSTRUCTIONS, TRAIN, VALIDATION, shard_name

STAGE = "instruct"
# Rough in-memory bytes of one spilled row, to size partitions before reading: a caption row
# (uid, ids, a short prompt and a caption); file sources are sized by their file size.
CAPTION_ROW_BYTES = 256


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
