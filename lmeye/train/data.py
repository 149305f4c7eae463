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
from lmeye.train.model_factory import TRAINING_DTYPES


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


class SeenSet:
    """The sample ids a resumed epoch already trained, sorted once when the checkpoint is read.

    Each batch then costs a binary search per row, O(log n), where ``np.isin`` sorted every seen id
    again for every micro-batch (about 1.7 s a call at 1M seen rows: GPUs starved after a late resume).
    """

    def __init__(self, keys: Optional[np.ndarray] = None):
        self.keys = np.unique(np.asarray(keys, dtype=np.uint64)) if keys is not None else np.zeros(0, np.uint64)

    @property
    def size(self) -> int:
        return int(self.keys.size)

    def contains(self, keys: np.ndarray) -> np.ndarray:
        if not self.keys.size:
            return np.zeros(len(keys), dtype=bool)
        at = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
        return self.keys[at] == keys


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


FILLER = [{"role": "user", "content": "?"}, {"role": "assistant", "content": "?"}]


def to_device(batch: dict[str, Any], device: Any, precision: str) -> dict[str, Any]:
    """``batch`` on ``device``, floating tensors in the training precision (DeepSpeed casts the
    module, not the inputs)."""
    import torch

    dtype = getattr(torch, TRAINING_DTYPES[precision])
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(device)
            if v.is_floating_point():
                v = v.to(dtype)
        out[k] = v
    return out


class BatchMaker:
    """Turns Arrow batches of instruction rows into model batches (see module doc).

    ``lockstep`` (ZeRO-3 with several ranks): every batch carries image features, zeros for a
    text-only batch, so the model runs the same modules on every rank (ZeRO-3 gathers a module's
    weights collectively when it runs, and a rank that skipped one would pair its next gather with
    another rank's); ``filler`` is the batch a rank without data runs while the others train or
    validate."""

    def __init__(self, ipn: Any, store: Any, *, on_missing: str = "skip", on_too_long: str = "skip", lockstep: bool = False):
        self.ipn = ipn
        self.store = store
        self.columns = ["embedding"] + (["patch_tokens"] if store is not None and store.patch_shape else [])
        self.on_missing = on_missing
        self.on_too_long = on_too_long
        self.lockstep = lockstep

    def collate(self, encs: list[dict], emb: np.ndarray, patches: Optional[np.ndarray]) -> dict[str, Any]:
        """``ipn.collate``; under ``lockstep`` a text-only batch gets its (zero) features too."""
        batch = self.ipn.collate(encs, emb, patches)
        if self.lockstep and "embeddings" not in batch:
            flagged = [dict(e, has_image=True) for e in encs]  # the features ride along; no row has an <img> to use them
            batch = dict(self.ipn.collate(flagged, emb, patches), has_image=batch["has_image"])
        return batch

    def filler(self, for_generation: bool = False) -> dict[str, Any]:
        """One row that runs every part of the model; its loss is multiplied by 0, its answer dropped."""
        conv = FILLER[:-1] if for_generation else FILLER
        enc = self.ipn.encode(conv, has_image=True, for_generation=for_generation)
        patches = np.zeros((1, *self.store.patch_shape), np.float32) if "patch_tokens" in self.columns else None
        return self.ipn.collate([enc], np.zeros((1, self.store.dim), np.float32), patches)

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

    def prepare(self, table: pa.Table, seen: Optional[SeenSet] = None) -> Prepared:
        keys = sample_keys(table)
        skipped: Counter = Counter()
        keep = np.ones(table.num_rows, dtype=bool)
        if seen is not None and seen.size and table.num_rows:
            keep = ~seen.contains(keys)
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
        batch = self.collate(encs, emb[sel], patches[sel] if patches is not None else None)
        return Prepared(batch, len(encs), new_keys, skipped)
