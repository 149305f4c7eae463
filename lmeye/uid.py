"""Stable image ids.

A uid depends on the image's URL (or file path) alone, never on shard or row position,
so it survives resharding and regeneration and every table can join on it. It is 128 bits of
BLAKE2b (``digest_size=16``) as 32 lowercase hex characters.

Why 128 bits: for n ids of b bits the chance of any collision is about n^2 / 2^(b+1). At
10^10 rows (LAION-5B is 5.85e9 URLs) 64 bits gives ~2.7 (a collision is near certain, and it
silently drops a different image as a duplicate); 128 bits gives ~1.5e-19.

In memory a uid is a key of two ``uint64`` (``UID_KEY``: ``hi`` = the first 16 hex characters,
``lo`` = the last 16), so the lexicographic order of the hex strings is the order of
``(hi, lo)``. numpy's own sort of a structured array is slow (a generic comparison per element),
so ``key_order`` (and the feature store's lookup, ``lmeye.store``) work on the ``hi`` words and only resolve the rare ties on ``lo``
(two different uids share their top 64 bits about 3 times in 10^10 rows).
"""

from __future__ import annotations

import hashlib
from typing import Iterable

import numpy as np
import pyarrow as pa

UID_BYTES = 16
UID_LEN = 2 * UID_BYTES  # hex characters
UID_KEY = np.dtype([("hi", "<u8"), ("lo", "<u8")])
UID_PATTERN = f"^[0-9a-f]{{{UID_LEN}}}$"  # a uid as written in the tables (regex, for pyarrow and re)


def uid_for(ref: str) -> str:
    """The uid of one URL or path. Surrounding whitespace is not part of the reference."""
    return hashlib.blake2b(ref.strip().encode("utf-8"), digest_size=UID_BYTES).hexdigest()


_HEX = np.full(256, 255, dtype=np.uint8)
for _i, _c in enumerate(b"0123456789abcdef"):
    _HEX[_c] = _i
for _i, _c in enumerate(b"ABCDEF"):
    _HEX[_c] = 10 + _i


def _string_array(uids: Iterable[str] | pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    if not isinstance(uids, pa.Array):
        uids = pa.array(list(uids), type=pa.string())
    if not pa.types.is_string(uids.type):
        uids = uids.cast(pa.string())
    return uids


def uid_keys(uids: Iterable[str] | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised uid parse: (``UID_KEY`` keys, valid mask). Invalid entries (not 32 hex) get key (0, 0)."""
    uids = _string_array(uids)
    n = len(uids)
    keys = np.zeros(n, dtype=UID_KEY)
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
    nib[~valid] = 0
    packed = np.ascontiguousarray((nib[:, 0::2] << 4) | nib[:, 1::2])  # (n, 16) bytes, big-endian
    words = packed.view(">u8")  # (n, 2): the first and last 8 bytes
    keys["hi"] = words[:, 0]
    keys["lo"] = words[:, 1]
    return keys, valid


def key_to_uid(hi: int, lo: int) -> str:
    """The 32-hex-character uid of one key (for messages)."""
    return f"{int(hi):016x}{int(lo):016x}"


def key_order(keys: np.ndarray) -> np.ndarray:
    """Stable argsort of ``UID_KEY`` keys by (hi, lo); as fast as a uint64 sort unless hi ties."""
    hi = keys["hi"]
    order = np.argsort(hi, kind="stable")
    s = hi[order]
    if s.size > 1 and (s[1:] == s[:-1]).any():  # duplicates or a shared top half: exact order
        order = np.lexsort((keys["lo"], hi))
    return order
