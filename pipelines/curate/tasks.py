"""The Ray tasks of the curate stage (plain functions; ``pipelines.curate`` wraps them in
``ray.remote``). Each reads and writes its own files under the staging folder, so no table's
bytes pass through the driver; what they return is a record, a histogram or a count."""

from __future__ import annotations

import io
import zlib
from collections import Counter
from typing import Any, Optional

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from lmeye.config.curate import CurateConfig
from lmeye.tables import ShardInfo, write_shard
from pipelines.curate import scores, semdedup
from schemas.curation import CLIP_SCORE, CONTAMINATED, CURATION, DUPLICATE, NO_FEATURES, NOT_DOWNLOADED
from schemas.features import FEATURES, TEXT_EMBEDDING
from schemas.pairs import PAIRS, SUCCESS

READ_ROWS = 1024
EMB = "_embedding"  # image embedding carried through the staging files (float32)
BENCH_ROWS = 256  # training rows compared with every benchmark hash at once


def _staged(staging: str, kind: str, name: str) -> str:
    return f"{staging.rstrip('/')}/{kind}/{name}"


def _write(path: str, table: pa.Table) -> None:
    fs, p = fsspec.core.url_to_fs(path)
    fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(p, "wb") as f:
        pq.write_table(table, f)


def _read(path: str, columns: Optional[list[str]] = None) -> pa.Table:
    with fsspec.open(path, "rb") as f:
        return pq.read_table(f, columns=columns)


def read_sample(path: str) -> np.ndarray:
    with fsspec.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


def _features_for(features_file: Optional[str], uids: pa.Array, want_text: bool) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(has features, image embeddings, caption embeddings or None) aligned with ``uids``."""
    n = len(uids)
    if features_file is None:
        return np.zeros(n, bool), np.zeros((n, 1), np.float32), None
    with fsspec.open(features_file, "rb") as f:
        pf = pq.ParquetFile(f)
        FEATURES.check(pf.schema_arrow, features_file)
        cols = ["uid", "status", "embedding"] + ([TEXT_EMBEDDING] if want_text and TEXT_EMBEDDING in pf.schema_arrow.names else [])
        feats = pf.read(columns=cols)
    feats = feats.filter(pc.equal(feats["status"], SUCCESS))
    if feats.num_rows == 0:
        return np.zeros(n, bool), np.zeros((n, 1), np.float32), None
    idx = pc.index_in(uids, value_set=feats["uid"])
    has = idx.is_valid().to_numpy(zero_copy_only=False)
    pos = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False).astype(np.int64)
    image = scores.vectors(feats["embedding"])[pos]
    text = scores.vectors(feats[TEXT_EMBEDDING])[pos] if TEXT_EMBEDDING in feats.column_names else None
    return has, image, text


def contamination(hashes: np.ndarray, valid: np.ndarray, emb: np.ndarray, has: np.ndarray, bench: dict[str, Any],
                  max_bits: int, min_cosine: Optional[float]) -> list[Optional[str]]:
    """The benchmark image each row matches (phash within ``max_bits``, or embedding cosine at least
    ``min_cosine`` when the benchmark embeddings are given), None for no match."""
    labels, bench_hashes, bench_emb = bench["labels"], bench["hashes"], bench.get("embeddings")
    out: list[Optional[str]] = [None] * len(hashes)
    if not labels:
        return out
    for start in range(0, len(hashes), BENCH_ROWS):
        stop = min(len(hashes), start + BENCH_ROWS)
        bits = scores.hamming_matrix(hashes[start:stop], bench_hashes)
        match = (bits <= max_bits) & valid[start:stop, None]
        if bench_emb is not None and min_cosine is not None:
            sim = semdedup.normalise(emb[start:stop]) @ bench_emb.T
            match |= (sim >= min_cosine) & has[start:stop, None]
        for i in np.flatnonzero(match.any(axis=1)):
            out[start + i] = labels[int(match[i].argmax())]
    return out


def score_shard(pairs_file: str, features_file: Optional[str], name: str, settings: dict[str, Any],
                bench: dict[str, Any], staging: str, sample_fraction: float) -> dict[str, Any]:
    """Pass 1 for one pairs shard: the per-row filters; writes the staged scores and a k-means sample."""
    settings = dict(settings)
    uses_clip = settings.pop("uses_clip_score")
    cc = CurateConfig.model_validate(settings)
    needs_features = uses_clip or cc.dedup
    parts = []
    with fsspec.open(pairs_file, "rb") as f:
        pf = pq.ParquetFile(f)
        PAIRS.check(pf.schema_arrow, pairs_file)
        extra = [c for c in (cc.punsafe_column, cc.pwatermark_column) if c in pf.schema_arrow.names]
        cols = ["uid", "caption", "status", "original_width", "original_height", "image"] + extra
        for rb in pf.iter_batches(batch_size=READ_ROWS, columns=cols):
            batch = pa.Table.from_batches([rb])
            hexes = [scores.phash_hex(d) if s == SUCCESS else None
                     for d, s in zip(batch["image"].to_pylist(), batch["status"].to_pylist())]
            parts.append(batch.drop_columns(["image"]).append_column("phash", pa.array(hexes, pa.string())))
    table = pa.concat_tables(parts) if parts else pa.schema([]).empty_table()
    n = table.num_rows
    if n == 0:
        _write(_staged(staging, "scored", name), _empty_scored())
        return {"hist": np.zeros(scores.HIST_BINS, np.int64).tolist(), "sample": None}
    reasons, cols_out = scores.metadata_reasons(table, cc)
    downloaded = pc.equal(table["status"], SUCCESS).to_numpy(zero_copy_only=False)
    has, image, text = _features_for(features_file, table["uid"], uses_clip)
    if needs_features:
        for i in np.flatnonzero(downloaded & ~has):
            reasons[i].append(NO_FEATURES)
    clip = np.full(n, np.nan, np.float32)
    if text is not None:
        clip = np.where(has, scores.clip_scores(image, text), np.nan).astype(np.float32)
    scores.apply_clip_floor(reasons, clip, cc.min_clip_score)
    hexes = table["phash"].to_pylist()
    valid = np.array([h is not None for h in hexes])
    contaminated = contamination(scores.hash_ints(hexes), valid, image, has, bench, cc.decontam_phash_max_distance,
                                 cc.decontam_min_cosine)
    for i, label in enumerate(contaminated):
        if label is not None:
            reasons[i].append(CONTAMINATED)
    emb = np.where(has[:, None], image, 0).astype(np.float32)
    staged = pa.table({
        "uid": table["uid"],
        "reasons": pa.array(reasons, pa.list_(pa.string())),
        "clip_score": pa.array(np.where(np.isnan(clip), None, clip).tolist(), pa.float32()),
        "punsafe": _nullable(cols_out["punsafe"]),
        "pwatermark": _nullable(cols_out["pwatermark"]),
        "width": pa.array(np.where(cols_out["width"] < 0, None, cols_out["width"]).tolist(), pa.int32()),
        "height": pa.array(np.where(cols_out["height"] < 0, None, cols_out["height"]).tolist(), pa.int32()),
        "caption_words": pa.array(cols_out["caption_words"], pa.int32()),
        "phash": table["phash"],
        "contaminated_by": pa.array(contaminated, pa.string()),
        EMB: semdedup_vectors(emb, has),
    })
    _write(_staged(staging, "scored", name), staged)
    sample_path = None
    candidates = np.flatnonzero(has & np.array([not r for r in reasons]))
    if cc.dedup and candidates.size:
        rng = np.random.default_rng([cc.seed, zlib.crc32(name.encode())])
        take = candidates[rng.random(candidates.size) < sample_fraction]
        if take.size:
            sample_path = _staged(staging, "sample", name + ".npy")
            buf = io.BytesIO()
            np.save(buf, semdedup.normalise(emb[take]), allow_pickle=False)
            fs, p = fsspec.core.url_to_fs(sample_path)
            fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
            fs.pipe_file(p, buf.getvalue())
    return {"hist": scores.score_histogram(clip).tolist(), "sample": sample_path}


def _nullable(values: np.ndarray) -> pa.Array:
    return pa.array(np.where(np.isnan(values), None, values).tolist(), pa.float32())


def semdedup_vectors(emb: np.ndarray, has: np.ndarray) -> pa.Array:
    width = max(1, emb.shape[1])
    return pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), width, mask=pa.array(~has))


def _empty_scored() -> pa.Table:
    return pa.table({"uid": pa.array([], pa.string()), "reasons": pa.array([], pa.list_(pa.string()))})


def _eligible(staged: pa.Table, threshold: Optional[float]) -> np.ndarray:
    """Rows no filter has dropped so far (the ones deduplicated), with an embedding."""
    if staged.num_rows == 0 or EMB not in staged.column_names:
        return np.zeros(staged.num_rows, bool)
    ok = (pc.list_value_length(staged["reasons"]).to_numpy(zero_copy_only=False) == 0)
    ok &= ~pc.is_null(staged[EMB]).to_numpy(zero_copy_only=False)
    if threshold is not None:
        s = pc.fill_null(staged["clip_score"], -2.0).to_numpy(zero_copy_only=False)
        ok &= s >= threshold
    return ok


def assign_shard(name: str, staging: str, centroids: np.ndarray, threshold: Optional[float], partitions: int) -> int:
    """Pass 3a: the rows still kept get their cluster and are spilled into partition files."""
    staged = _read(_staged(staging, "scored", name))
    ok = _eligible(staged, threshold)
    if not ok.any():
        return 0
    rows = staged.filter(pa.array(ok))
    emb = semdedup.normalise(scores.vectors(rows[EMB]))
    labels = semdedup.Assigner(centroids)(emb)
    part = labels % partitions
    base = pa.table({"uid": rows["uid"], "shard": pa.array([name] * rows.num_rows, pa.string()),
                     "cluster": pa.array(labels, pa.int64()), "phash": rows["phash"], EMB: rows[EMB]})
    for p in np.unique(part):
        _write(_staged(staging, f"parts/{p:05d}", name), base.filter(pa.array(part == p)))
    return int(ok.sum())


def dedup_partition(p: int, staging: str, settings: dict[str, Any]) -> int:
    """Pass 3b: SemDeDup within every cluster of partition ``p``; writes (uid, shard, duplicate_of)."""
    fs, root = fsspec.core.url_to_fs(_staged(staging, "parts", f"{p:05d}"))
    if not fs.exists(root):
        return 0
    files = sorted(fs.ls(root, detail=False))
    table = pa.concat_tables([_read(fs.unstrip_protocol(f)) for f in files])
    emb = semdedup.normalise(scores.vectors(table[EMB]))
    hexes = table["phash"].to_pylist()
    valid = np.array([h is not None for h in hexes])
    uids = np.array(table["uid"].to_pylist())
    order = np.argsort(np.argsort(uids, kind="stable"), kind="stable")  # the smallest uid of a group is kept
    dup = semdedup.dedup_clusters(table["cluster"].to_numpy(), emb, settings["semdedup_threshold"], order,
                                  scores.hash_ints(hexes), valid, settings["phash_max_distance"], settings["phash_min_cosine"])
    hit = np.flatnonzero(dup >= 0)
    out = pa.table({"uid": pa.array(uids[hit].tolist(), pa.string()),
                    "shard": table["shard"].take(pa.array(hit)),
                    "duplicate_of": pa.array(uids[dup[hit]].tolist(), pa.string())})
    _write(_staged(staging, "dups", f"{p:05d}.parquet"), out)
    return int(hit.size)


def _duplicates(staging: str, name: str) -> dict[str, str]:
    fs, root = fsspec.core.url_to_fs(_staged(staging, "dups", ""))
    if not fs.exists(root):
        return {}
    table = pads.dataset(root, format="parquet", filesystem=fs).to_table(filter=pc.field("shard") == name)
    return dict(zip(table["uid"].to_pylist(), table["duplicate_of"].to_pylist()))


def finalize_shard(name: str, staging: str, threshold: Optional[float], deduped: bool, out: str,
                   input_fp: str) -> ShardInfo:
    """Pass 4: the verdicts of one shard joined and written as its curation shard."""
    staged = _read(_staged(staging, "scored", name))
    reasons = staged["reasons"].to_pylist()
    if threshold is not None and "clip_score" in staged.column_names:  # (an empty shard has no score column)
        s = pc.fill_null(staged["clip_score"], np.nan).to_numpy(zero_copy_only=False)
        for i in np.flatnonzero(~(s >= threshold)):
            if not ({CLIP_SCORE, NOT_DOWNLOADED, NO_FEATURES} & set(reasons[i])):
                reasons[i].append(CLIP_SCORE)
    dups = _duplicates(staging, name) if deduped else {}
    uids = staged["uid"].to_pylist()
    duplicate_of = [dups.get(u) for u in uids]
    for i, d in enumerate(duplicate_of):
        if d is not None:
            reasons[i].append(DUPLICATE)
    n = staged.num_rows
    cols: dict[str, Any] = {"uid": staged["uid"], "keep": pa.array([not r for r in reasons], pa.bool_()),
                            "reasons": pa.array(reasons, pa.list_(pa.string())), "duplicate_of": pa.array(duplicate_of, pa.string())}
    for f in CURATION.schema:
        if f.name not in cols:
            cols[f.name] = staged[f.name] if f.name in staged.column_names else pa.nulls(n, f.type)
    schema = CURATION.with_metadata(CURATION.schema)
    table = pa.table({f.name: cols[f.name] for f in schema}).cast(schema)
    by_reason = Counter(r for rs in reasons for r in rs)
    return write_shard(out, name, table, inputs=[name], input_fingerprint=input_fp,
                       stats={"by_reason": dict(by_reason), "kept": sum(1 for r in reasons if not r)})
