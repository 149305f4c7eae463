"""Rows of the `instructions` table -> model batches, on each worker.

A worker pulls Arrow batches of its shard (``get_dataset_shard``), and for each:

1. drops rows already trained on in this epoch (their ``sample_id`` is in the resumed
   checkpoint's *seen* set; see ``lmeye.train.checkpoint``), counted as ``resumed_skip``;
2. reads the features of the image rows by uid from the feature store (one gather per batch,
   memory-mapped); a row whose uid has none is skipped and counted (``missing_features``), or
   stops training when ``train.on_missing_features: error``;
3. tokenises each row with ``ipn.encode`` (chat template, labels on assistant turns only); a row
   that cannot fit ``model.max_length`` is skipped and counted (``too_long``) or stops training;
4. collates what is left with ``ipn.collate``.

Text-only rows (empty ``uid``) are mixed in as they come: no features, ``has_image=False``.
Every row pulled, trained or skipped, is recorded as seen, so a resumed run neither repeats a
skipped row in its counts nor trains a row twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pyarrow as pa

from lmeye.errors import UserError


@dataclass
class Prepared:
    batch: Optional[dict[str, Any]]  # None: nothing left to train in this micro-batch
    rows: int  # rows trained
    seen: np.ndarray  # uint64 sample ids of every row pulled (trained or skipped)
    skipped: Counter = field(default_factory=Counter)


def llm_tokens(batch: Optional[dict[str, Any]]) -> int:
    """Tokens the LLM runs for ``batch``: every position any of its masks marks (the IPN's prefix
    and suffix, <img>/<img-q>/<img-d> slots included; a plain LM's ``attention_mask``). Not the
    answer tokens alone: MFU is FLOPs per processed token, and the prompt costs as much as the answer."""
    if batch is None:
        return 0
    return int(sum(int(v.sum()) for k, v in batch.items() if k.endswith("mask") and hasattr(v, "sum")))


def hex64(values: list) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 key, valid) per 16-hex-digit ``sample_id``: what a checkpoint's seen set stores."""
    valid = np.array([isinstance(v, str) and len(v) == 16 and all(c in "0123456789abcdef" for c in v) for v in values],
                     dtype=bool)
    keys = np.array([int(v, 16) if ok else 0 for v, ok in zip(values, valid)], dtype=np.uint64)
    return keys, valid


def sample_keys(table: pa.Table) -> np.ndarray:
    keys, valid = hex64(table.column("sample_id").to_pylist())
    if not valid.all():
        bad = table.column("sample_id").combine_chunks().filter(pa.array(~valid))[0].as_py()
        raise UserError(f"instructions table: sample_id {bad!r} is not 16 hex digits")
    return keys


class BatchMaker:
    """Turns Arrow batches of instruction rows into model batches (see module doc)."""

    def __init__(self, ipn: Any, store: Any, *, on_missing: str = "skip", on_too_long: str = "skip"):
        self.ipn = ipn
        self.store = store
        self.columns = ["embedding"] + (["patch_tokens"] if store is not None and store.patch_shape else [])
        self.on_missing = on_missing
        self.on_too_long = on_too_long

    def features(self, uids: list[str]) -> tuple[np.ndarray, Optional[np.ndarray], np.ndarray]:
        """(embeddings, patch tokens or None, found) for ``uids``; empty uids are text-only rows."""
        has_image = np.array([bool(u) for u in uids], dtype=bool)
        dim = self.store.dim
        emb = np.zeros((len(uids), dim), np.float32)
        patches = np.zeros((len(uids), *self.store.patch_shape), np.float32) if "patch_tokens" in self.columns else None
        found = ~has_image  # text-only rows need nothing
        idx = np.flatnonzero(has_image)
        if idx.size:
            got = self.store.get([uids[i] for i in idx], self.columns, on_missing="mask")
            emb[idx] = got["embedding"]
            if patches is not None:
                patches[idx] = got["patch_tokens"]
            found[idx] = got.found
        return emb, patches, found

    def prepare(self, table: pa.Table, seen: Optional[np.ndarray] = None) -> Prepared:
        keys = sample_keys(table)
        skipped: Counter = Counter()
        keep = np.ones(table.num_rows, dtype=bool)
        if seen is not None and seen.size and table.num_rows:
            keep = ~np.isin(keys, seen)
            skipped["resumed_skip"] = int((~keep).sum())
        new_keys = keys[keep]
        table = table.filter(pa.array(keep)) if not keep.all() else table
        uids = [u or "" for u in table.column("uid").to_pylist()]
        emb, patches, found = self.features(uids)
        if not found.all():
            if self.on_missing == "error":
                missing = [u for u, ok in zip(uids, found) if not ok]
                raise UserError(f"train: {len(missing)} row(s) whose uid has no features, e.g. {missing[0]} "
                                "(set train.on_missing_features: skip to skip them)")
            skipped["missing_features"] += int((~found).sum())
        encs, rows = [], []
        convs = table.column("conversation").to_pylist()
        for i in np.flatnonzero(found):
            enc = self.ipn.encode(convs[i], has_image=bool(uids[i]))
            if enc is None:
                if self.on_too_long == "error":
                    sid = table.column("sample_id")[int(i)].as_py()
                    raise UserError(f"train: sample {sid} does not fit model.max_length (set train.on_too_long: skip)")
                skipped["too_long"] += 1
                continue
            encs.append(enc)
            rows.append(i)
        if not encs:
            return Prepared(None, 0, new_keys, skipped)
        sel = np.asarray(rows)
        batch = self.ipn.collate(encs, emb[sel], patches[sel] if patches is not None else None)
        return Prepared(batch, len(encs), new_keys, skipped)
