"""A features table written by the real extraction stage (tiny ViT), its images as files, and a
checkpoint of the stand-in IPN (lmeye.serve.testing) that names that table."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from lingcloud_testing import build_pairs_table as _build_pairs_table

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="session")
def served(tmp_path_factory, ray_local):
    from PIL import Image

    from lmeye import clip
    from lmeye.cli import main
    from lmeye.config import load_config
    from lmeye.serve.testing import write_fake_checkpoint
    from schemas.pairs import SUCCESS

    root = tmp_path_factory.mktemp("served")
    pairs = _build_pairs_table(root / "pairs", 4, shards=1, corrupt=0, failed=0, size=40)
    cfg = load_config(None, [f"data.root={root}", f"extract.model={clip.TINY_MODEL}", "extract.pretrained=null"])
    ckpt = clip.ensure_demo_model(cfg.extract)
    assert main([
        "extract", str(root / "pairs"), str(root / "features"),
        "--set", f"extract.model={clip.TINY_MODEL}", "--set", f"extract.pretrained={ckpt}",
        "--set", "extract.dtype=float16", "--set", "extract.patch_tokens=true", "--set", "extract.batch_size=4",
        "--set", "extract.decode_num_cpus=0.5",
    ]) == 0
    images = root / "images"
    images.mkdir()
    files = {}
    for row in pairs.to_pylist():
        if row["status"] == SUCCESS:
            with Image.open(io.BytesIO(row["image"])) as img:
                suffix = img.format.lower()
            path = images / f"{row['uid']}.{suffix}"
            path.write_bytes(row["image"])
            files[row["uid"]] = path
    checkpoint = write_fake_checkpoint(str(root / "checkpoint"), features=str(root / "features"))
    return {"root": root, "features": root / "features", "images": files, "checkpoint": checkpoint}


@pytest.fixture(scope="session")
def assistant(served):
    from lmeye.serve.loader import load_assistant

    return load_assistant(served["checkpoint"])
