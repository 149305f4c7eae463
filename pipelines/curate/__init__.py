"""Curation: `pairs` + `features` -> the `curation` table (keep, scores, reasons), on Ray.

``run(cfg) -> StageSummary``, like every stage. Four passes, each a set of Ray tasks that read
and write files themselves (the driver sees shard records, histograms and counts only):

1. *score* (one task per pairs shard, ``tasks.score_shard``): the metadata filters, the CLIP
   score (cosine of the image and caption embeddings of the features shard of the same name)
   with its absolute floor, the perceptual hash, and the benchmark matches; a histogram of the
   CLIP scores (fixed size) and a seeded sample of embeddings for k-means come back;
2. the driver turns the summed histogram into the top-fraction threshold (DataComp) and trains
   k-means (faiss) on the sample;
3. *assign* (one task per shard): the rows still kept get their nearest centroid and are spilled
   into ``partitions`` files by cluster; *dedup* (one task per partition): SemDeDup within each
   cluster, phash distance counted too (``semdedup.py``);
4. *finalize* (one task per shard): the verdicts joined, one curation shard written per pairs shard.

The duplicate and top-fraction verdicts depend on the whole table, so a shard is finished only
for the same inputs as a whole (pairs, features, benchmark hashes) and the same config: a rerun
after everything was written reads metadata only; a rerun after a stop redoes the passes and
writes only the shards not yet finished. Scratch files live in ``<output>/_staging`` and are
removed at the end.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
import traceback
from collections import Counter
from typing import Any

import fsspec

from lmeye.config import Config
from lmeye.errors import UserError
from lmeye.report import StageSummary
from lmeye.runtime import init_ray, storage_runtime_env
from lmeye.tables import STAGING, Manifest, TableReader, TableWriter, fingerprint, open_table, remove_temporaries
from pipelines.curate import semdedup
from pipelines.curate.benchmarks import benchmark_embeddings, benchmark_hashes
from schemas.curation import CURATION
from schemas.features import FEATURES, TEXT_EMBEDDING
from schemas.pairs import PAIRS

# What decides the verdicts: everything in curate: but paths and throughput knobs.
NOT_CONTENT = {"pairs", "features", "output", "task_num_cpus", "partitions"}


def paths(cfg: Config) -> tuple[str, str, str]:
    """(pairs, features, output) with the chain defaults."""
    c = cfg.curate
    root = cfg.data.root.rstrip("/")
    return (c.pairs or cfg.download.output or f"{root}/pairs", c.features or cfg.extract.output or f"{root}/features",
            c.output or f"{root}/curation")


def content_config(cfg: Config) -> dict[str, Any]:
    return {k: v for k, v in cfg.curate.model_dump(mode="json").items() if k not in NOT_CONTENT}


def _uses_clip_score(cfg: Config) -> bool:
    return cfg.curate.min_clip_score is not None or cfg.curate.clip_score_top_fraction is not None


def _check_text_embeddings(features: TableReader) -> None:
    """A CLIP-score filter needs the caption embeddings: one error naming the option to turn on."""
    if not features.shard_names:
        return
    schema = features.check_file(features.shard_names[0])
    if TEXT_EMBEDDING not in schema.names:
        raise UserError(
            f"{features.path}: the features table has no '{TEXT_EMBEDDING}' column, which the CLIP-score filter "
            "(curate.min_clip_score / curate.clip_score_top_fraction) needs; rerun extract with "
            "extract.text_embeddings: true (into a new folder, or with --overwrite)"
        )


def _abs(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def run(cfg: Config) -> StageSummary:
    """Curate every pairs row; returns the summary."""
    import ray

    t0 = time.time()
    cc = cfg.curate
    pairs_path, features_path, out = paths(cfg)
    summary = StageSummary(stage="curate", output=out, rate_unit="rows/s")
    pairs = open_table(pairs_path, PAIRS)
    features = open_table(features_path, FEATURES)
    if _uses_clip_score(cfg):
        _check_text_embeddings(features)
    labels, hashes = benchmark_hashes(cc.benchmarks)  # a bad benchmark path fails here, before Ray
    bench = {"labels": labels, "hashes": hashes}
    if cc.benchmarks and cc.decontam_min_cosine is not None:
        bench["embeddings"] = benchmark_embeddings(cc.benchmarks, features_path)
    bench_digest = hashlib.sha256(hashes.tobytes() + "\n".join(labels).encode()).hexdigest()[:16]
    input_fp = fingerprint({"pairs": pairs.signature(), "features": features.signature(), "benchmarks": bench_digest})
    before = Manifest.load(out)  # its pass notes are kept when a rerun has nothing to do
    writer = TableWriter(out, CURATION, config=content_config(cfg), input_fingerprint=input_fp)
    names = pairs.shard_names
    pending = [n for n in names if not writer.is_done(n, input_fp)]
    summary.shards_skipped = len(names) - len(pending)
    staging = f"{_abs(out).rstrip('/')}/{STAGING}/{writer.manifest.config_fingerprint}-{input_fp}"
    notes: dict[str, Any] = {}
    try:
        if pending:
            init_ray(cfg.ray)
            notes = _passes(cfg, pairs, features, writer, pending, staging, input_fp, bench, summary)
    except (ray.exceptions.RayError, RuntimeError, OSError, ValueError) as err:
        traceback.print_exc(file=sys.stderr)
        summary.ok = False
        summary.notes.append(f"stopped: {type(err).__name__}: {err}"[:400])
    reasons: Counter = Counter()
    kept = 0
    for info in writer.manifest.shards.values():
        reasons.update(info.stats.get("by_reason", {}))
        kept += int(info.stats.get("kept", 0))
    if summary.ok:
        kept_passes = before.stats.get("passes", {}) if before is not None and not pending else {}
        stats = {"by_reason": dict(reasons), "kept": kept, "passes": notes or kept_passes}
        writer.finalize(names, stats=stats, metadata={"pairs": pairs_path, "features": features_path,
                                                       "benchmarks": ",".join(cc.benchmarks)})
        remove_temporaries(out)
    summary.rows = writer.manifest.num_rows
    summary.counts = {"kept": kept, "dropped": summary.rows - kept}
    summary.failures = dict(reasons)  # why rows were dropped (a row may have several reasons)
    summary.seconds = time.time() - t0
    summary.rate = summary.rows / summary.seconds if pending and summary.seconds > 0 else None
    if notes.get("clip_threshold") is not None:
        summary.notes.append(f"top {cc.clip_score_top_fraction:.0%} by CLIP score: threshold {notes['clip_threshold']:.4f}")
    if notes.get("clusters"):
        summary.notes.append(f"SemDeDup: {notes['clusters']} clusters (k-means on {notes['kmeans_rows']} rows), "
                             f"{notes['duplicates']} duplicate(s) at cosine >= {cc.semdedup_threshold} "
                             f"or phash distance <= {cc.phash_max_distance}"
                             + ("" if cc.phash_min_cosine is None else f" and cosine >= {cc.phash_min_cosine}"))
    if cc.benchmarks:
        how = f"phash <= {cc.decontam_phash_max_distance} bits" + (
            f" or CLIP cosine >= {cc.decontam_min_cosine}" if cc.decontam_min_cosine is not None else "")
        summary.notes.append(f"decontamination against {len(labels)} benchmark image(s) from {len(cc.benchmarks)} path(s) ({how})")
    return summary


def _passes(cfg: Config, pairs: TableReader, features: TableReader, writer: TableWriter, pending: list[str],
            staging: str, input_fp: str, bench: dict[str, Any], summary: StageSummary) -> dict[str, Any]:
    """The four passes (module doc); returns what the summary and manifest say about them."""
    import numpy as np
    import ray

    from pipelines.curate import scores, tasks

    cc = cfg.curate
    names = pairs.shard_names
    fs, root = fsspec.core.url_to_fs(staging)
    if fs.exists(root):  # a stopped run's scratch: this run redoes every pass
        fs.rm(root, recursive=True)
    opts = {"num_cpus": cc.task_num_cpus, "runtime_env": storage_runtime_env()}
    score = ray.remote(tasks.score_shard).options(**opts)
    assign = ray.remote(tasks.assign_shard).options(**opts)
    dedup = ray.remote(tasks.dedup_partition).options(**opts)
    final = ray.remote(tasks.finalize_shard).options(**opts)
    settings = cc.model_dump(mode="json") | {"uses_clip_score": _uses_clip_score(cfg)}
    sample_fraction = min(1.0, cc.kmeans_sample / max(1, pairs.num_rows))
    features_files = {n: features.file(n) for n in features.shard_names}
    bench_ref = ray.put(bench)
    refs = [score.remote(pairs.file(n), features_files.get(n), n, settings, bench_ref, staging, sample_fraction)
            for n in names]
    hist = np.zeros(scores.HIST_BINS, np.int64)
    samples = []
    for done in ray.get(refs):
        hist += np.asarray(done["hist"], np.int64)
        if done["sample"]:
            samples.append(done["sample"])
    print(f"[curate] scored {len(names)} shard(s)", flush=True)
    notes: dict[str, Any] = {"clip_threshold": None, "clusters": 0, "kmeans_rows": 0, "duplicates": 0}
    threshold = None
    if cc.clip_score_top_fraction is not None:
        threshold = scores.top_fraction_threshold(hist, cc.clip_score_top_fraction)
        notes["clip_threshold"] = threshold
    centroids = None
    if cc.dedup and samples:
        sample = np.concatenate([tasks.read_sample(s) for s in samples])
        k = cc.clusters or semdedup.default_clusters(pairs.num_rows)
        centroids = semdedup.train_kmeans(sample, k, cc.kmeans_iterations, cc.seed)
        notes.update(clusters=len(centroids), kmeans_rows=len(sample))
        del sample
        cref = ray.put(centroids)
        ray.get([assign.remote(n, staging, cref, threshold, cc.partitions) for n in names])
        found = ray.get([dedup.remote(p, staging, settings) for p in range(cc.partitions)])
        notes["duplicates"] = int(sum(found))
        print(f"[curate] SemDeDup: {notes['duplicates']} duplicate(s) in {len(centroids)} clusters", flush=True)
    infos = ray.get([final.remote(n, staging, threshold, centroids is not None, writer.path, input_fp) for n in pending])
    for info in infos:
        writer.record(info)
        summary.shards_done += 1
    if fs.exists(root):
        fs.rm(root, recursive=True)
    return notes
