"""What the extraction stage puts through Ray's object store between its read tasks and its model
actors: the encoded images, not decoded pixels. Both halves run here in-process (no Ray), on the
functions the stage maps (``read_shard``, then ``Encoder``)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from lingcloud_testing import build_pairs_table

from lmeye import clip
from lmeye.config import load_config
from lmeye.tables import TableReader
from schemas.features import FAILED_TO_DECODE, SUCCESS
from schemas.pairs import PAIRS
from schemas.pairs import SUCCESS as PAIRS_SUCCESS


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """224-px JPEGs (12 good, 1 corrupt, 1 failed download) in one shard, and the read task's batches."""
    from pipelines.extract import read_shard

    root = tmp_path_factory.mktemp("transfer")
    table = build_pairs_table(root / "pairs", 12, shards=1, corrupt=1, failed=1, size=224)
    reader = TableReader(str(root / "pairs"), PAIRS)
    name = reader.shard_names[0]
    items = pa.table({"shard": [name], "path": [reader.file(name)]})
    batches = list(read_shard(items, rows=5))
    return {"root": root, "table": table, "batches": batches, "shard": name}


def test_the_read_task_ships_the_encoded_image_bytes_not_pixels(pairs):
    from pipelines.extract import IMAGE_COL, SHARD_COL

    batches, table = pairs["batches"], pairs["table"]
    assert [b.num_rows for b in batches] == [5, 5, 3]  # the 13 success rows, in slices of 5 (the failed one left out)
    shipped = pa.concat_tables(batches)
    assert shipped.column_names == ["uid", SHARD_COL, IMAGE_COL]
    assert pa.types.is_binary(shipped.schema.field(IMAGE_COL).type) or pa.types.is_large_binary(shipped.schema.field(IMAGE_COL).type)
    success = table.filter(pc.equal(table["status"], PAIRS_SUCCESS))
    assert shipped.column(IMAGE_COL).to_pylist() == success.column("image").to_pylist()  # the bytes as stored
    assert set(shipped.column(SHARD_COL).to_pylist()) == {pairs["shard"]}
    # the block's size is the JPEG bytes plus a few dozen bytes a row (uid, shard, offsets), a
    # fraction of the 224x224x3 = 150,528 bytes a row that a 224-px model's pixels took before
    jpeg = sum(len(b) for b in success.column("image").to_pylist())
    assert jpeg <= shipped.nbytes <= jpeg + 100 * shipped.num_rows
    assert shipped.nbytes < 0.2 * shipped.num_rows * 224 * 224 * 3


def test_the_model_actor_decodes_and_a_corrupt_image_is_a_failed_row(pairs):
    """The actor turns the shipped bytes into features exactly as decoding first and then encoding
    the pixels would; the corrupt image is a failed_to_decode row with its reason, the job goes on."""
    from pipelines.extract import Encoder, decode_image, encoder_settings, pil_part_of

    cfg = load_config(None, [f"data.root={pairs['root']}", f"extract.model={clip.TINY_MODEL}", "extract.pretrained=null",
                             "extract.batch_size=4", "extract.dtype=float32", "extract.torch_threads=2"])
    ckpt = clip.ensure_demo_model(cfg.extract)
    spec = clip.probe_model(clip.TINY_MODEL, ckpt)
    encoder = Encoder(spec.to_dict(), encoder_settings(cfg.extract, "fp32"))
    assert encoder.decode_threads == 2

    out = pa.concat_tables(encoder(b) for b in pairs["batches"])
    shipped = pa.concat_tables(pairs["batches"])
    assert out.column("uid").to_pylist() == shipped.column("uid").to_pylist()
    status = out.column("status").to_pylist()
    assert status == [SUCCESS] * 12 + [FAILED_TO_DECODE]
    corrupt = out.slice(12).to_pylist()[0]
    assert corrupt["embedding"] is None and corrupt["error_message"].startswith("UnidentifiedImageError")
    assert out.column("error_message").null_count == 12

    # the same features as the pixels path (decode, then encode_pixels), per block as the actor ran them
    images = shipped.column("_image").to_pylist()[:5]
    pixels = np.stack([decode_image(b, pil_part_of(spec), spec.image_size) for b in images])
    emb, _ = encoder.encode_pixels(pixels[:4])
    got = np.array(out.column("embedding").to_pylist()[:4], dtype=np.float32)
    np.testing.assert_array_equal(got, emb)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
