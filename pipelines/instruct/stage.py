"""The instruct stage's driver: LMEyeMID-style instruction data -> the `instructions` table.

``run(cfg)`` reads the configured sources (caption rows of a pairs table turned into tasks by
templates, VQA question/answer sets, LLaVA conversations, LMEyeMID records), maps every image
reference to a uid, and writes the `instructions` table (``schemas.instructions``).

How it streams (memory does not grow with the input), and where (``work``: the driver handles
metadata only; Ray tasks read the sources and write the shards):

1. *Spill* (one Ray task, ``work.spill_inputs``). Sources are read one record at a time (JSON is decoded element by element) and
   turned into rows in chunks of ``chunk_rows``. Each chunk is hash-partitioned by uid into P
   local Arrow IPC files. P grows with the input (``partition_mb`` per partition), so one
   partition's rows are bounded. The uids of the features table are spilled to the same P
   partitions. The files are local to the task's node.
2. *Per partition* (one Ray task per partition on that node, ``work.build_partition``; everything about one image is in one partition): drop rows whose image has
   no features (a text-only row has no image and needs none), with ``instruct.curation`` rows
   whose image the curation table does not keep (``curation``), drop exact duplicates (same uid
   and same conversation; the earlier source in the config, then the earlier record, wins),
   shuffle with the seed, and write a ``train-`` and a ``validation-`` shard with
   ``write_shard`` (atomic shards). The task returns their ``ShardInfo`` and the driver records
   them in the manifest (``TableWriter.record``) as each task returns. A side without rows gets
   no shard; the last shard a partition writes records the partition's names and stats, which
   is how a rerun knows the partition is finished.

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

The driver reads manifests, file sizes and the templates file (for the fingerprints), the
spill task's accounting and the partition tasks' shard records; it never reads a source file or
a spilled row, and never writes a shard (``tests/test_multinode.py`` measures it). The spill is
one task because a source's cap, first-duplicate-wins and the join's accounting follow the
input order; a lost spill node fails the run, and the rerun skips the partitions already
recorded.

This module keeps the stage's story; the mechanics live beside it in the package: ``work``
(the Ray tasks), ``partition``
(uid keys, placement, spill files), ``rows`` (accounting, row building, source runners),
``inputs`` (paths, input tables), ``jsonio`` and ``records`` (JSON readers and parsers),
``images`` (image reference -> uid), ``captions`` (caption tasks) and ``export`` (HF).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import fsspec
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from lmeye.config import Config
from lmeye.config.instruct import InstructConfig
from lmeye.errors import UserError, user_errors
from lmeye.report import StageSummary
from lmeye.runtime import init_ray, storage_runtime_env
from lmeye.tables import Manifest, TableWriter, fingerprint, shard_file
from lmeye.templates import CAPTIONS as DEFAULT_TEMPLATES
from pipelines.instruct import curation
from pipelines.instruct.export import export_hf
from pipelines.instruct.inputs import InputTables, features_table, file_bytes, fill_paths, resolved_sources, uses_pairs_table
from pipelines.instruct.jsonio import file_signature, list_files
from pipelines.instruct.partition import Placement
from pipelines.instruct.rows import OUTCOMES, Progress, SourceStats
from pipelines.instruct.work import PARTITION_SHARDS, PartitionJob, Spilled, build_partition, remove_spill, spill_inputs
from schemas.instructions import INSTRUCTIONS, TRAIN, VALIDATION, shard_name

STAGE = "instruct"
# Rough in-memory bytes of one spilled row, to size partitions before reading: a caption row
# (uid, ids, a short prompt and a caption); file sources are sized by their file size.
CAPTION_ROW_BYTES = 256


# ---------------------------------------------------------------------------------------------
# Resume


def _finished_partition(writer: TableWriter, p: int, partitions: int, fp: str) -> Optional[dict[str, Any]]:
    """The stats of partition p when a previous run finished it (its last shard lists them all)."""
    for split in (VALIDATION, TRAIN):  # the last one written carries the list
        info = writer.manifest.shards.get(shard_name(split, p, partitions))
        if info is not None and PARTITION_SHARDS in info.stats:
            if all(writer.is_done(n, fp) for n in info.stats[PARTITION_SHARDS]):
                return info.stats
    return None


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
    writer = TableWriter(ic.output, INSTRUCTIONS, config=job.config, input_fingerprint=job.input_fp)
    init_ray(cfg.ray)
    spilled = _remote(spill_inputs, cfg, job, placement)
    try:
        totals = _write_partitions(ic, job, writer, spilled, partitions)
    finally:
        _remove_spill(spilled)

    out_stats = _output_stats(ic, job, spilled, totals, partitions)
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


def _options(node: Optional[str]) -> dict[str, Any]:
    """Every task reads or writes tables (object storage settings); partition work runs where the
    spill files are. Ray's retries after a worker crash stay on: a partition task writes the same
    shards again, and a spill task spills again into a new folder."""
    options: dict[str, Any] = {"num_cpus": 1, "runtime_env": storage_runtime_env()}
    if node is not None:
        options["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node, soft=False)
    return options


def _result(ref: Any) -> Any:
    """A task's result; a user error raised in the task is raised here as itself (one line)."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as err:
        if isinstance(err.cause, user_errors()):
            raise err.cause from None
        raise


def _remote(fn: Any, *args: Any, node: Optional[str] = None) -> Any:
    return _result(ray.remote(fn).options(**_options(node)).remote(*args))


def _remove_spill(spilled: Spilled) -> None:
    try:
        _remote(remove_spill, spilled.folder, node=spilled.node)
    except ray.exceptions.RayError:  # its node is gone, and its files with it: nothing to remove
        pass


def _write_partitions(ic: InstructConfig, job: _Job, writer: TableWriter, spilled: Spilled, partitions: int) -> _Totals:
    """Step 2: each partition not finished by an earlier run, processed and written by a task on
    the spill's node; the driver records each shard as its task returns (metadata only)."""
    shard_fp = fingerprint([job.input_fp, partitions])
    names = [s.name for s in job.sources]
    totals = _Totals()
    task = ray.remote(build_partition).options(**_options(spilled.node))
    pending = {}
    for p in range(partitions):
        pstats = _finished_partition(writer, p, partitions, shard_fp)
        if pstats is None:
            pending[task.remote(PartitionJob(ic.output, spilled.folder, p, partitions, shard_fp, names, ic.dedupe, ic.seed,
                                             job.features is not None, job.curated is not None, ic.debug_delay_s))] = p
        else:
            totals.skipped += len(pstats[PARTITION_SHARDS])
            _add(totals, pstats, pstats[PARTITION_SHARDS], spilled.stats)
    progress = Progress()
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            p = pending.pop(ready[0])
            infos, pstats = _result(ready[0])
            for info in infos:  # in order: the last one marks the partition finished
                writer.record(info)
            totals.done += len(infos)
            _add(totals, pstats, [i.name for i in infos], spilled.stats)
            progress.tick(lambda: f"partition {p + 1}/{partitions} written, {len(pending)} to go")
    finally:
        for ref in pending:  # a failure or Ctrl-C: no task goes on writing after the stage
            ray.cancel(ref, force=True)
    return totals


def _add(totals: _Totals, pstats: dict[str, Any], written: list[str], stats: dict[str, SourceStats]) -> None:
    """A partition's shards and stats, into the run's totals and the per-source accounting."""
    totals.expected += written
    for outcome in ("no_features", curation.OUTCOME, "duplicate", "kept"):
        for name, n in pstats.get(outcome, {}).items():
            stats[name].outcomes[outcome] += n
    totals.splits[TRAIN] += pstats.get("train", 0)
    totals.splits[VALIDATION] += pstats.get("validation", 0)
    totals.tasks.update(pstats.get("tasks", {}))


def _output_stats(ic: InstructConfig, job: _Job, spilled: Spilled, totals: _Totals, partitions: int) -> dict[str, Any]:
    """The manifest's stats, after checking that every source's records are accounted for."""
    stats = spilled.stats
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
        out_stats["feature_uids"], out_stats["feature_rows_without_features"] = spilled.features_info
    if job.curated is not None:
        out_stats["curation"] = {**curation.recorded(ic), "kept_uids": spilled.kept_uids}
    return out_stats


def _maybe_export(ic: InstructConfig, summary: StageSummary) -> None:
    if ic.export_hf:
        export_hf(ic.output, ic.export_hf)
        summary.notes.append(f"exported a HF DatasetDict to {ic.export_hf} (datasets.load_from_disk)")
