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

import pyarrow as pa

UID_BYTES = 8
UID_LEN = 2 * UID_BYTES


def uid_for(ref: str) -> str:
    """The uid of one URL or path. Surrounding whitespace is not part of the reference."""
    return hashlib.blake2b(ref.strip().encode("utf-8"), digest_size=UID_BYTES).hexdigest()


def uids_for(refs: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    """Vectorised ``uid_for`` that returns an Arrow string array."""
    if isinstance(refs, (pa.Array, pa.ChunkedArray)):
        refs = refs.to_pylist()
    return pa.array([uid_for(r) for r in refs], type=pa.string())
