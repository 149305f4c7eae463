"""The instruct stage's data work, run as Ray tasks: the driver (``stage``) handles metadata only.

* ``spill_inputs`` (one task): reads every source in config order, builds the rows and spills
  them, with the uids that have features and the uids the curation table keeps, into P local
  partition files in a folder of its own node (``lmeye.spill``). It is one task, not one per
  file, because a source's cap, the first-duplicate-wins rule, the sample ids and the image
  join's accounting all follow the input order. It returns the per-source accounting only.
* ``build_partition`` (one task per partition not finished by an earlier run, placed on the
  spill's node, where its files are): feature check, curation, dedup, shuffle and split; it
  writes the partition's shards itself (``write_shard``) and returns their ``ShardInfo`` and the
  partition's stats, which the driver records in the manifest.
* ``remove_spill``: the spill folder, at the end (or at once, when the spill task fails).

So the driver process never reads a source file or a spilled row and never writes a shard:
table bytes stay on the workers, whatever the size of the input.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmeye.config import Config
from lmeye.errors import UserError
from lmeye.spill import Spill, raise_open_files_limit
from lmeye.tables import ShardInfo, write_shard
from pipelines.instruct import curation
from pipelines.instruct.captions import load_templates
from pipelines.instruct.inputs import spill_features, uses_pairs_table
from pipelines.instruct.partition import FEAT_SCHEMA, KEY, MASK64, SPILL_SCHEMA, SRC, VAL, Placement
from pipelines.instruct.rows import Progress, RowBuilder, SourceContext, SourceStats, run_captions_table, run_file_source
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

PARTITION_SHARDS = "partition_shards"  # stats key of a partition's last shard: all its shards
ROWS, FEATS, KEEP = "rows", "feat", "keep"  # the spill files' prefixes


@dataclass
class Spilled:
    """What the spill task hands back: where its files are and the accounting, no rows."""

    node: str  # the Ray node id holding the spill folder
    folder: str
    stats: dict[str, SourceStats]
    features_info: Optional[tuple[int, int]] = None  # (uids with features, feature rows without)
    kept_uids: Optional[int] = None


@dataclass
class PartitionJob:
    """One partition's work, as the driver describes it to ``build_partition``."""

    output: str
    folder: str
    p: int
    partitions: int
    shard_fp: str
    names: list[str]  # the sources' names, by their index in the spill's ``src`` column
    dedupe: bool
    seed: int
    features: bool  # whether the feature check applies (feature uids were spilled)
    curated: bool  # whether the curation keep-list applies
    debug_delay_s: float = 0.0


# ---------------------------------------------------------------------------------------------
# The spill task


def _source_context(cfg: Config, job: Any, spill_dir: str) -> SourceContext:
    ic = cfg.instruct
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


def spill_inputs(cfg: Config, job: Any, placement: Placement) -> Spilled:
    """Every source's rows, the feature uids and the kept uids, spilled by partition into a new
    folder under ``instruct.tmp_dir`` on this node. ``job`` is the driver's resolved run
    (``stage._Job``): its sources, input tables and templates."""
    import ray

    ic = cfg.instruct
    partitions = placement.partitions
    raise_open_files_limit(3 * partitions)
    folder = tempfile.mkdtemp(prefix="lingcloud-instruct-", dir=ic.tmp_dir)
    try:
        stats = {s.name: SourceStats(kind=s.kind) for s in job.sources}
        out = Spilled(ray.get_runtime_context().get_node_id(), folder, stats)
        progress = Progress()
        spills = [Spill(folder, ROWS, partitions, SPILL_SCHEMA), Spill(folder, FEATS, partitions, FEAT_SCHEMA),
                  Spill(folder, KEEP, partitions, FEAT_SCHEMA)]
        rows_spill, feats, keep = spills
        ctx = _source_context(cfg, job, folder)
        try:
            for i, spec in enumerate(job.sources):
                rows = RowBuilder(rows_spill, placement, i, spec.name, spec.weight, spec.cap, ic.seed,
                                  stats[spec.name], ic.chunk_rows)
                if uses_pairs_table(spec):
                    run_captions_table(ctx, spec, job.inputs.pairs(spec.table), rows, stats[spec.name], progress)
                else:
                    run_file_source(ctx, spec, rows, stats[spec.name], progress)
                rows.flush()
            if job.features is not None:
                out.features_info = spill_features(job.features, feats, placement)
            if job.curated is not None:
                out.kept_uids = curation.spill_kept(job.curated, keep, placement)
        finally:
            for spill in spills:
                spill.close()
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # nothing will read a failed spill
        raise
    return out


def remove_spill(folder: str) -> None:
    shutil.rmtree(folder, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The partition task


def build_partition(job: PartitionJob) -> tuple[list[ShardInfo], dict[str, Any]]:
    """Process partition ``job.p`` from its spill files and write its shards; returns their
    descriptions (train first, the last one carrying the partition's stats and shard list)
    and the partition's stats."""
    folder, parts = job.folder, job.partitions
    feats = Spill(folder, FEATS, parts, FEAT_SCHEMA).read(job.p) if job.features else None
    kept = Spill(folder, KEEP, parts, FEAT_SCHEMA).read(job.p) if job.curated else None
    train, valid, stats = process_partition(Spill(folder, ROWS, parts, SPILL_SCHEMA).read(job.p), feats, job.names,
                                            job.dedupe, job.seed, job.p, kept)
    infos = write_partition(job.output, job.p, parts, job.shard_fp, train, valid, stats)
    del train, valid
    pa.default_memory_pool().release_unused()  # a worker runs partition after partition: give freed buffers back
    for prefix, schema in ((ROWS, SPILL_SCHEMA), (FEATS, FEAT_SCHEMA), (KEEP, FEAT_SCHEMA)):
        Spill(folder, prefix, parts, schema).remove(job.p)
    if job.debug_delay_s:
        time.sleep(job.debug_delay_s)  # tests: a window to kill the stage mid-run
    return infos, stats


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


def write_partition(output: str, p: int, partitions: int, fp: str, train: pa.Table, valid: pa.Table,
                    stats: dict[str, Any]) -> list[ShardInfo]:
    """Write the non-empty sides of partition p (never a 0-row shard); the last one carries the
    partition's stats and shard list. Returns the shards written, in order, for the driver to
    record."""
    parts = [(shard_name(s, p, partitions), t) for s, t in ((TRAIN, train), (VALIDATION, valid)) if t.num_rows]
    names = [n for n, _ in parts]
    infos = []
    for k, (name, table) in enumerate(parts):
        last = k == len(parts) - 1
        infos.append(write_shard(output, name, table, input_fingerprint=fp,
                                 stats={**stats, PARTITION_SHARDS: names} if last else {"rows": table.num_rows}))
    return infos
