"""Per-row scores and the filters that need no other row: metadata, CLIP score floor, phash.

Everything here works on one pairs shard (and the features shard of the same name) at a time,
so a scoring task's memory is one shard's, whatever the table's size.
"""

from __future__ import annotations

import io
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmeye.config.curate import CurateConfig
from schemas.curation import (
    ASPECT_RATIO, CAPTION_LENGTH, CLIP_SCORE, NO_FEATURES, NOT_DOWNLOADED, TOO_SMALL, UNSAFE, WATERMARK,
)
from schemas.pairs import SUCCESS

# Histogram of CLIP scores over [-1, 1]: a fixed-size summary each task returns, from which the
# driver finds the top-fraction threshold without holding one score per row.
HIST_BINS = 20_000
EDGES = np.linspace(-1.0, 1.0, HIST_BINS + 1)


def phash_hex(data: Optional[bytes]) -> Optional[str]:
    """The 64-bit perceptual hash (imagehash.phash) as 16 hex characters; None when undecodable."""
    import imagehash
    from PIL import Image

    if not data:
        return None
    try:
        with Image.open(io.BytesIO(data)) as img:
            return str(imagehash.phash(img.convert("RGB")))
    except Exception:  # noqa: BLE001 - an undecodable image has no hash; extract reports it
        return None


def hash_ints(hexes: list[Optional[str]]) -> np.ndarray:
    """uint64 of each hex hash (0 for None; callers mask those rows)."""
    return np.array([int(h, 16) if h else 0 for h in hexes], dtype=np.uint64)


def _optional_column(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names:
        return np.full(table.num_rows, np.nan, np.float32)
    return pc.cast(table[name], pa.float32()).to_numpy(zero_copy_only=False).astype(np.float32)


def _floats(table: pa.Table, name: str) -> np.ndarray:
    return pc.cast(table[name], pa.float64()).to_numpy(zero_copy_only=False)


def metadata_reasons(pairs: pa.Table, cc: CurateConfig) -> tuple[list[list[str]], dict[str, np.ndarray]]:
    """The metadata filters of every row: (reasons per row, the score columns they looked at)."""
    n = pairs.num_rows
    punsafe = _optional_column(pairs, cc.punsafe_column)
    pwatermark = _optional_column(pairs, cc.pwatermark_column)
    w = _floats(pairs, "original_width")
    h = _floats(pairs, "original_height")
    captions = pairs["caption"].to_pylist()
    words = np.array([len(c.split()) if c else 0 for c in captions], np.int32)
    status_ok = pc.equal(pairs["status"], SUCCESS).to_numpy(zero_copy_only=False)
    with np.errstate(invalid="ignore", divide="ignore"):
        aspect = np.maximum(w, h) / np.minimum(w, h)
    # nan compares False: a row without the column (or the size) is not dropped for it
    checks = [
        (NOT_DOWNLOADED, ~status_ok),
        (UNSAFE, (punsafe > cc.max_punsafe) if cc.max_punsafe is not None else None),
        (WATERMARK, (pwatermark > cc.max_pwatermark) if cc.max_pwatermark is not None else None),
        (TOO_SMALL, (np.fmin(w, h) < cc.min_size) if cc.min_size else None),
        (ASPECT_RATIO, (aspect > cc.max_aspect_ratio) if cc.max_aspect_ratio is not None else None),
        (CAPTION_LENGTH, (words < cc.min_caption_words)
         | ((words > cc.max_caption_words) if cc.max_caption_words is not None else False)),
    ]
    reasons: list[list[str]] = [[] for _ in range(n)]
    for name, mask in checks:
        if mask is None:
            continue
        for i in np.flatnonzero(mask):
            reasons[i].append(name)
    size = {"width": np.where(np.isnan(w), -1, w).astype(np.int32), "height": np.where(np.isnan(h), -1, h).astype(np.int32)}
    return reasons, {"punsafe": punsafe, "pwatermark": pwatermark, "caption_words": words, **size}


def vectors(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed_size_list column as a float32 (rows, width) matrix (null rows: zeros)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = arr.type.list_size
    if arr.null_count:
        arr = pc.fill_null(arr, pa.scalar([0.0] * width, arr.type))
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(-1, width)


def clip_scores(image: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Cosine of each row's image and caption embeddings (both re-normalised: float16 rounding)."""
    ni = np.linalg.norm(image, axis=1)
    nt = np.linalg.norm(text, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (np.einsum("ij,ij->i", image, text) / (ni * nt)).astype(np.float32)


def score_histogram(scores: np.ndarray) -> np.ndarray:
    return np.histogram(scores[~np.isnan(scores)], bins=EDGES)[0].astype(np.int64)


def top_fraction_threshold(hist: np.ndarray, fraction: float) -> float:
    """The score at or above which (about) ``fraction`` of the scored rows lie: a bin's lower edge.

    Ties within one bin (width 1e-4) all stay in, so the kept share can exceed ``fraction`` by
    that bin's rows; DataComp's own percentile cut has the same tie rule.
    """
    total = int(hist.sum())
    if total == 0:
        return -1.0
    want = fraction * total
    from_top = np.cumsum(hist[::-1])
    k = int(np.searchsorted(from_top, want - 1e-9))  # first bin (from the top) reaching the fraction
    return float(EDGES[HIST_BINS - 1 - min(k, HIST_BINS - 1)])


def apply_clip_floor(reasons: list[list[str]], scores: np.ndarray, floor: Optional[float]) -> None:
    if floor is None:
        return
    for i in np.flatnonzero(~(scores >= floor)):  # nan (no score) fails the floor
        if NOT_DOWNLOADED not in reasons[i] and NO_FEATURES not in reasons[i]:
            reasons[i].append(CLIP_SCORE)


def hamming_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Bit differences of every hash in ``a`` (rows) against every hash in ``b`` (columns)."""
    return np.bitwise_count(np.bitwise_xor(a[:, None], b[None, :]))
