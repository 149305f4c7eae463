"""Stable image ids.

A uid depends on the image's URL (or file path) alone, never on shard or row position,
so it survives resharding and regeneration and every table can join on it. 64 bits of
BLAKE2b as 16 hex characters: collisions are negligible below ~10^9 images, and the
fixed width lets the feature store keep a sorted, memory-mapped index without a Python
object per row.
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa

UID_BYTES = 8
UID_LEN = 2 * UID_BYTES


def uid_for(ref: str) -> str:
    """The uid of one URL or path. Surrounding whitespace is not part of the reference."""
    return hashlib.blake2b(ref.strip().encode("utf-8"), digest_size=UID_BYTES).hexdigest()


_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def uids_to_u64(uids: Iterable[str] | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised uid parse: (uint64 keys, valid mask). Invalid entries (not 16 hex) get key 0."""
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    if not isinstance(uids, pa.Array):
        uids = pa.array(list(uids), type=pa.string())
    if pa.types.is_large_string(uids.type) or pa.types.is_string_view(uids.type):
        uids = uids.cast(pa.string())
    n = len(uids)
    keys = np.zeros(n, dtype=np.uint64)
    if n == 0:
        return keys, np.zeros(0, dtype=bool)
    uids = uids.fill_null("")
    offsets = np.frombuffer(uids.buffers()[1], dtype=np.int32)[uids.offset : uids.offset + n + 1]
    data = uids.buffers()[2]
    raw = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    valid = lengths == UID_LEN
    if valid.all() and offsets[-1] - offsets[0] == n * UID_LEN:
        chars = raw[offsets[0] : offsets[-1]].reshape(n, UID_LEN)
    else:
        chars = np.zeros((n, UID_LEN), dtype=np.uint8)
        idx = np.flatnonzero(valid)
        if idx.size:
            gather = offsets[idx][:, None] + np.arange(UID_LEN)[None, :]
            chars[idx] = raw[gather]
    nib = _HEX[chars]
    valid &= (nib != 255).all(axis=1)
    nib = np.where(valid[:, None], nib, 0).astype(np.uint64)
    for i in range(UID_LEN):
        keys = (keys << np.uint64(4)) | nib[:, i]
    return keys, valid
