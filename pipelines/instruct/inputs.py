"""Inputs of the instruct stage: the configured sources with their paths filled in, the input
tables (opened through ``lmeye.tables``, the one reader: complete tables of the right schema
only, unless ``instruct.allow_incomplete``), and the spill of the uids that have features."""

from __future__ import annotations

from typing import Any, Optional

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from lmeye.config import Config
from lmeye.config.instruct import InstructConfig
from lmeye.spill import Spill
from lmeye.tables import MANIFEST, TableReader, open_table
from pipelines.instruct.jsonio import list_files
from pipelines.instruct.partition import FEAT_SCHEMA, Placement, uid_keys
from schemas.features import FEATURES
from schemas.pairs import PAIRS, STATUS, SUCCESS, UID



def fill_paths(text: Optional[str], cfg: Config) -> Optional[str]:
    if text is None:
        return None
    return text.replace("{data.root}", cfg.data.root.rstrip("/")).replace("{demo.corpus_dir}", str(cfg.demo.corpus_dir).rstrip("/"))


def resolved_sources(cfg: Config) -> list[Any]:
    out = []
    for spec in cfg.instruct.sources:
        if not spec.enabled:
            continue
        updates: dict[str, Any] = {"name": spec.name or spec.kind, "path": fill_paths(spec.path, cfg)}
        if spec.kind == "captions":
            updates["table"] = fill_paths(spec.table, cfg) or cfg.instruct.pairs
        if getattr(spec, "answers", None):
            updates["answers"] = fill_paths(spec.answers, cfg)
        out.append(spec.model_copy(update=updates))
    return out


def uses_pairs_table(spec: Any) -> bool:
    """A captions source without a file reads the captions of a pairs table."""
    return spec.kind == "captions" and spec.path is None


class InputTables:
    """The stage's input tables, each opened once through ``lmeye.tables.open_table``; the
    incomplete ones read (allow_incomplete) are listed for the summary and the manifest."""

    def __init__(self, ic: InstructConfig):
        self.allow_incomplete = ic.allow_incomplete
        self.opened: dict[tuple[str, str], TableReader] = {}

    def open(self, path: str, what: str, table: Any, hint: str) -> TableReader:
        key = (path, table.name)
        if key not in self.opened:
            fs, root = fsspec.core.url_to_fs(path)
            # a stat, not a read: open_table reads the manifest (once; at scale it is MBs)
            if not fs.isfile(root) and not fs.exists(root.rstrip("/") + "/" + MANIFEST):
                raise FileNotFoundError(f"{what}: no {table.name} table at {path}; {hint}")
            self.opened[key] = open_table(path, table, allow_incomplete=self.allow_incomplete)
        return self.opened[key]

    def pairs(self, path: str, what: str = "instruct.pairs") -> TableReader:
        return self.open(path, what, PAIRS, "run `lmeye download` first")

    def incomplete(self) -> list[TableReader]:
        return [r for r in self.opened.values() if r.incomplete]


def features_table(ic: InstructConfig, inputs: InputTables) -> Optional[TableReader]:
    if not ic.require_features:
        return None
    return inputs.open(ic.features, "instruct.features", FEATURES,
                       "run `lmeye extract` first, or set instruct.require_features: false to build without the feature check")


def spill_features(features: TableReader, spill: Spill, placement: Placement) -> tuple[int, int]:
    """Spill the uids that have features; returns (uids with features, rows without)."""
    kept = skipped = 0
    for batch in features.iter_batches(columns=[UID, STATUS], batch_size=262144):
        uids = batch.column(0)
        mask = pa.array(uid_keys(uids)[1])
        mask = pc.fill_null(pc.and_(mask, pc.equal(batch.column(1), SUCCESS)), False)
        good = pc.filter(uids, mask)
        skipped += batch.num_rows - len(good)
        kept += len(good)
        if len(good):
            part, _ = placement.place(uid_keys(good)[0])
            spill.write(pa.Table.from_arrays([good], schema=FEAT_SCHEMA), part)
    return kept, skipped


def file_bytes(path: str) -> int:
    total = 0
    for f in list_files(path):
        fs, root = fsspec.core.url_to_fs(f)
        total += fs.size(root) or 0
    return total
