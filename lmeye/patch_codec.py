"""How patch tokens are stored: float16/float32 as they are, or int8 with a float16 scale.

Patch tokens dominate a features table (ViT-L-14 at 224 px: 256 x 1024 values an image), so
they may be stored compactly, chosen by ``extract.patch_dtype`` (and ``extract.patch_pool``,
which averages the patch grid to N x N regions before anything is stored). The table's
metadata names the encoding (``lingcloud.patch_encoding``); readers decode with
``codec(name).decode`` and always get float values back.

int8 is symmetric absmax quantisation: ``q = round(x / s)``, ``s = max|x| / 127`` over one
group of values, stored in the ``patch_scales`` column (float16: a scale's own rounding,
2^-11 relative, scales a whole group alike and so does not move its direction). The group is
either each token (``int8_token``: T scales an image) or each channel of an image
(``int8_channel``: D scales); README "Compact patch tokens" has both measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np

SCALE_DTYPE = np.float16
_QMAX = 127


@dataclass(frozen=True)
class PatchCodec:
    name: str
    dtype: str  # the stored value type of the patch_tokens column
    scale_axis: Optional[Literal["token", "channel"]] = None  # None: stored as is, no scales

    @property
    def scaled(self) -> bool:
        return self.scale_axis is not None

    def scale_width(self, shape: tuple[int, int]) -> int:
        """Scales an image for tokens of ``shape`` (T, D): T per token, D per channel, 0 unscaled."""
        if self.scale_axis is None:
            return 0
        return int(shape[0] if self.scale_axis == "token" else shape[1])

    def _axis(self) -> int:
        return 2 if self.scale_axis == "token" else 1  # the axis a scale's group spans, in (n, T, D)

    def encode(self, tokens: np.ndarray) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """(n, T, D) floats -> ((n, T*D) stored values, (n, scale_width) float16 scales or None)."""
        n = tokens.shape[0]
        x = np.asarray(tokens, dtype=np.float32)
        if self.scale_axis is None:
            return x.astype(self.dtype).reshape(n, -1), None
        axis = self._axis()
        # the scale is rounded to float16 first, and quantised with: decode then uses exactly it
        scale = (np.abs(x).max(axis=axis, keepdims=True) / _QMAX).astype(SCALE_DTYPE)
        s32 = scale.astype(np.float32)
        safe = np.where(s32 > 0, s32, 1.0)  # an all-zero group (a failed row) stays zero
        q = np.clip(np.rint(x / safe), -_QMAX, _QMAX).astype(np.int8)
        return q.reshape(n, -1), scale.reshape(n, -1)

    def decode(self, values: np.ndarray, scales: Optional[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
        """Stored values (n, T*D) (+ scales) -> (n, T, D); float32 for int8, the stored float type otherwise."""
        n = values.shape[0]
        v = np.asarray(values).reshape(n, *shape)
        if self.scale_axis is None:
            return v
        if scales is None:
            raise ValueError(f"{self.name} patch tokens need their scales")
        s = np.asarray(scales, dtype=np.float32).reshape(n, shape[0], 1) if self.scale_axis == "token" \
            else np.asarray(scales, dtype=np.float32).reshape(n, 1, shape[1])
        return v.astype(np.float32) * s

    def roundtrip(self, tokens: np.ndarray) -> np.ndarray:
        """What a reader of the table gets back for ``tokens`` (n, T, D): live encoders use it."""
        values, scales = self.encode(tokens)
        return self.decode(values, scales, tuple(tokens.shape[1:]))


CODECS = {
    c.name: c
    for c in (
        PatchCodec("float16", "float16"),
        PatchCodec("float32", "float32"),
        PatchCodec("int8_token", "int8", "token"),
        PatchCodec("int8_channel", "int8", "channel"),
    )
}
# extract.patch_dtype -> the encoding it writes (int8: per-token scales, README "Compact patch tokens")
BY_DTYPE = {"float16": "float16", "float32": "float32", "int8": "int8_token"}


def codec(name: str) -> PatchCodec:
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown patch-token encoding {name!r} (known: {', '.join(CODECS)})") from None


def pooled_shape(shape: tuple[int, int], pool: Optional[int]) -> tuple[int, int]:
    """(T, D) after pooling the grid to ``pool`` x ``pool`` (unchanged when pool is None)."""
    if not pool:
        return tuple(shape)
    t, d = shape
    side = math.isqrt(t)
    if side * side != t:
        raise ValueError(f"patch tokens of shape {t}x{d} are not a square grid, so they cannot be pooled to {pool}x{pool}")
    if pool > side:
        raise ValueError(f"patch_pool {pool} is larger than the model's {side}x{side} patch grid")
    return pool * pool, d


def pool_grid(tokens, pool: Optional[int]):
    """(n, T, D) torch tensor of a square row-major grid -> (n, pool*pool, D), region averages."""
    if not pool:
        return tokens
    import torch.nn.functional as F

    n, t, d = tokens.shape
    pooled_shape((t, d), pool)  # the same errors as the driver's check
    side = math.isqrt(t)
    grid = tokens.transpose(1, 2).reshape(n, d, side, side)
    return F.adaptive_avg_pool2d(grid.float(), pool).reshape(n, d, pool * pool).transpose(1, 2)
