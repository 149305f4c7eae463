"""Partitioning mechanics of the instruct stage: where a uid goes, and the spill files.

A uid's partition and its split (train or validation) both come from one salted mix of the uid
(``Placement``), so everything about one image lands in one partition and no image is on both
sides. The rows go to P local Arrow IPC streams, one per partition (``lmeye.spill.Spill``).
A text-only row (null uid) is placed by its sample key instead: it has no image to keep on
one side.

``uid_keys`` is the one place the stage turns uids into integers and checks their format.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from lmeye.uid import uid_keys as _uid_keys
from schemas.instructions import CONVERSATION, CONVERSATION_COL, SAMPLE_ID, SOURCE_ID, TASK, UID

MASK64 = (1 << 64) - 1
# Spill-only columns: the source's index, the dedup key and the split decision.
SRC, KEY, VAL = "src", "key", "val"
SPILL_SCHEMA = pa.schema(
    [
        (UID, pa.string()),
        (SRC, pa.int16()),
        (TASK, pa.string()),
        (SAMPLE_ID, pa.string()),
        (KEY, pa.int64()),
        (VAL, pa.bool_()),
        (CONVERSATION_COL, CONVERSATION),
        (SOURCE_ID, pa.string()),
    ]
)
FEAT_SCHEMA = pa.schema([(UID, pa.string())])


# ---------------------------------------------------------------------------------------------
# Hashing helpers (vectorised where it matters)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x += np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def seed64(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "big")


def uid_keys(uids: list[str] | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 key, valid) per uid: the stage's one use of the uid format (``lmeye.uid``).
    The key is the uid's top 64 bits: plenty to place it in a partition and a split."""
    keys, valid = _uid_keys(uids)
    return keys["hi"], valid


def is_uid(text: str) -> bool:
    return bool(uid_keys([text])[1][0])


@dataclass
class Placement:
    """Where a uid goes: its partition and its split. Both from one salted mix of the uid."""

    partitions: int
    split_seed: int
    val_fraction: float

    def __post_init__(self) -> None:
        self.salt = np.uint64(seed64("split", self.split_seed))
        self.threshold = int(round(self.val_fraction * 10000))

    def place(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(partition, is validation) per key (``uid_keys``, or a sample key for text-only rows)."""
        h = _splitmix64(keys ^ self.salt)
        part = ((h >> np.uint64(32)) % np.uint64(self.partitions)).astype(np.int64)
        val = ((h & np.uint64(0xFFFFFFFF)) % np.uint64(10000)).astype(np.int64) < self.threshold
        return part, val

    def is_validation(self, uid: str) -> bool:
        return bool(self.place(uid_keys([uid])[0])[1][0])
