"""Inputs of the instruct stage: resolve the configured paths, check the features table,
signatures for the input fingerprint, and the spill of the uids that have features."""

from __future__ import annotations

from typing import Any, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmeye.config import Config
from lmeye.config.instruct import InstructConfig
from lmeye.errors import UserError
from lmeye.tables import Manifest
from lmeye.uid import UID_PATTERN
from pipelines.instruct_partition import Placement, Spill, _uid_ints
from pipelines.instruct_sources import list_files
from schemas.pairs import SUCCESS


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
                mask = pc.match_substring_regex(uids, UID_PATTERN)
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
