"""Patch-token encodings (lmeye.patch_codec) on synthetic tokens: int8 round trip, pooling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmeye.patch_codec import CODECS, codec, pool_grid, pooled_shape


def _tokens(n=6, t=16, d=64, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, t, d)).astype(np.float32)
    x[:, :, 3] *= 20  # an outlier channel, as CLIP's towers have
    x[:, 0] *= 5  # and a loud token
    return x


@pytest.mark.parametrize("name", ["int8_token", "int8_channel"])
def test_int8_round_trip_is_close_and_compact(name):
    x = _tokens()
    c = codec(name)
    values, scales = c.encode(x)
    assert values.dtype == np.int8 and values.shape == (6, 16 * 64)
    assert scales.dtype == np.float16 and scales.shape == (6, 16 if name == "int8_token" else 64)
    back = c.decode(values, scales, (16, 64))
    assert back.dtype == np.float32 and back.shape == x.shape
    axis = 2 if name == "int8_token" else 1
    step = np.abs(x).max(axis=axis, keepdims=True) / 127
    assert (np.abs(back - x) <= 0.5 * step * 1.01).all()  # half a step, plus the float16 scale's rounding
    cos = (back * x).sum(-1) / np.linalg.norm(back, axis=-1) / np.linalg.norm(x, axis=-1)
    assert cos.mean() > 0.999
    np.testing.assert_array_equal(c.roundtrip(x), back)


def test_all_zero_rows_stay_zero_and_float_encodings_are_unchanged():
    x = np.zeros((2, 4, 8), np.float32)
    c = codec("int8_token")
    values, scales = c.encode(x)
    assert not values.any() and not scales.any() and not c.decode(values, scales, (4, 8)).any()
    y = _tokens(2, 4, 8)
    values, scales = codec("float16").encode(y)
    assert scales is None and values.dtype == np.float16
    np.testing.assert_array_equal(codec("float16").decode(values, None, (4, 8)), y.astype(np.float16))
    with pytest.raises(ValueError, match="unknown patch-token encoding 'int4'.*int8_token"):
        codec("int4")
    assert set(CODECS) == {"float16", "float32", "int8_token", "int8_channel"}


def test_pooling_averages_grid_regions_and_refuses_what_it_cannot_pool():
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)  # a 4x4 grid, row-major
    got = pool_grid(x, 2)
    assert got.shape == (2, 4, 3)
    grid = x.reshape(2, 4, 4, 3)
    torch.testing.assert_close(got[:, 0], grid[:, :2, :2].mean(dim=(1, 2)))  # top-left region
    torch.testing.assert_close(got[:, 3], grid[:, 2:, 2:].mean(dim=(1, 2)))  # bottom-right region
    assert pool_grid(x, None) is x and pooled_shape((16, 3), None) == (16, 3) and pooled_shape((16, 3), 3) == (9, 3)
    with pytest.raises(ValueError, match="17x3 are not a square grid"):
        pooled_shape((17, 3), 2)
    with pytest.raises(ValueError, match="patch_pool 5 is larger than the model's 4x4"):
        pooled_shape((16, 3), 5)
