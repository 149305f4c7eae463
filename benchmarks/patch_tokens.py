"""Compact patch tokens: reconstruction quality and bytes on disk per image, for each encoding.

    .venv/bin/python benchmarks/patch_tokens.py --features DIR [--pool 2] [--max-images 3000]

DIR is a features table with float16 (or float32) patch tokens, e.g. the demo's or the learning
check's ``{data.root}/features``. For each encoding of ``lmeye.patch_codec`` (and int8 after
pooling the grid to ``--pool`` x ``--pool``), on the same images:
  * the cosine of every decoded token against its original (mean, 1st percentile, min):
    target mean >= 0.999 for int8;
  * bytes on disk an image: the patch columns (tokens + scales) as a zstd Parquet file, as the
    extract stage writes them, and raw in the serving copy; ratio to float16 (target int8 <= 0.52);
and, computed (not measured), raw bytes an image and disk per million images for ViT-L-14 at 224 px
(256 x 1024 tokens) and 336 px (576 x 1024).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmeye.patch_codec import CODECS, PatchCodec, codec, pool_grid, pooled_shape  # noqa: E402
from lmeye.store import FeatureStore  # noqa: E402


def raw_bytes(c: PatchCodec, shape: tuple[int, int]) -> int:
    """Stored bytes of one image's patch tokens (values + scales), uncompressed."""
    t, d = shape
    return t * d * np.dtype(c.dtype).itemsize + c.scale_width(shape) * 2


def parquet_bytes(c: PatchCodec, tokens: np.ndarray, work: str) -> int:
    """Bytes of the patch columns of ``tokens`` as the extract stage writes them (zstd Parquet)."""
    n = tokens.shape[0]
    values, scales = c.encode(tokens)
    cols = {"patch_tokens": pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])}
    if scales is not None:
        cols["patch_scales"] = pa.FixedSizeListArray.from_arrays(pa.array(scales.reshape(-1)), scales.shape[1])
    path = os.path.join(work, f"{c.name}-{tokens.shape[1]}.parquet")
    pq.write_table(pa.table(cols), path, compression="zstd", row_group_size=1024)
    assert n
    return os.path.getsize(path)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]).astype(np.float64), b.reshape(-1, b.shape[-1]).astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--features", required=True, help="a features table with float patch tokens")
    ap.add_argument("--pool", type=int, default=2, help="grid side for the int8 + pooling row")
    ap.add_argument("--max-images", type=int, default=3000)
    args = ap.parse_args()

    store = FeatureStore.open(args.features)
    if store.patch_shape is None or codec(store.info()["columns"]["patch_tokens"]["encoding"]).scaled:
        print(f"{args.features}: needs float16/float32 patch tokens to compare against")
        return 2
    import pyarrow.compute as pc

    uids = [u for u in pq.read_table(args.features, columns=["uid", "status"]).filter(
        pc.equal(pc.field("status"), "success"))["uid"].to_pylist()][: args.max_images]
    ref = store.get(uids, columns=["patch_tokens"])["patch_tokens"].astype(np.float32)  # (n, T, D), as stored
    shape = tuple(ref.shape[1:])
    print(f"{args.features}: {len(uids)} images, patch tokens {shape[0]} x {shape[1]} "
          f"({store.metadata.get('model')}, stored {store.info()['columns']['patch_tokens']['encoding']})")
    import torch

    pooled = pool_grid(torch.from_numpy(ref), args.pool).numpy()
    rows = [(name, CODECS[name], ref) for name in ("float16", "int8_token", "int8_channel")]
    rows.append((f"int8_token + pool {args.pool}x{args.pool}", CODECS["int8_token"], pooled))
    base_pq = base_raw = None
    print(f"{'encoding':28s} {'cos mean':>9s} {'cos p1':>9s} {'cos min':>9s} {'Parquet B/img':>14s} {'x f16':>6s} "
          f"{'raw B/img':>10s} {'x f16':>6s}")
    with tempfile.TemporaryDirectory() as work:
        for label, c, x in rows:
            back = c.roundtrip(x).astype(np.float32)
            cos = cosines(back, x)
            pq_b = parquet_bytes(c, x, work) / len(uids)
            raw_b = raw_bytes(c, tuple(x.shape[1:]))
            base_pq, base_raw = base_pq or pq_b, base_raw or raw_b
            print(f"{label:28s} {cos.mean():9.6f} {np.percentile(cos, 1):9.6f} {cos.min():9.6f} {pq_b:14.0f} "
                  f"{pq_b / base_pq:6.3f} {raw_b:10d} {raw_b / base_raw:6.3f}")
    print("computed, raw bytes an image (serving copy; Parquet adds little on real features) and per million images:")
    for label, grid in (("ViT-L-14 224 px", (256, 1024)), ("ViT-L-14 336 px", (576, 1024))):
        for name, pool in (("float16", None), ("int8_token", None), ("int8_channel", None), ("int8_token", 4), ("int8_token", 8)):
            s = pooled_shape(grid, pool)
            b = raw_bytes(CODECS[name], s)
            tag = name + (f" + pool {pool}x{pool}" if pool else "")
            print(f"  {label} {tag:24s} {s[0]:4d} x {s[1]}: {b / 1024:8.1f} KiB/image, {b * 1e6 / 1e9:8.1f} GB per million, "
                  f"{b / raw_bytes(CODECS['float16'], grid):.3f}x float16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
