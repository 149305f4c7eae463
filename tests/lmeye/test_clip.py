"""open_clip model handling: the tiny demo model, probing shapes without weights, split preprocessing."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from lmeye import clip
from lmeye.config import load_config


def _cfg(tmp_path, **extra):
    sets = [f"data.root={tmp_path}", f"extract.model={clip.TINY_MODEL}", "extract.pretrained=null"]
    sets += [f"extract.{k}={v}" for k, v in extra.items()]
    return load_config(None, sets)


def test_ensure_demo_model_writes_once_and_is_deterministic(tmp_path):
    cfg = _cfg(tmp_path)
    path = clip.ensure_demo_model(cfg.extract)
    assert path == f"{tmp_path}/models/{clip.TINY_MODEL}.safetensors"
    assert cfg.extract.pretrained == path and os.path.isfile(path)
    before = os.stat(path).st_mtime_ns
    assert clip.ensure_demo_model(cfg.extract) == path
    assert os.stat(path).st_mtime_ns == before  # not rebuilt
    other = _cfg(tmp_path / "again")
    assert clip.file_sha256(clip.ensure_demo_model(other.extract)) == clip.file_sha256(path)  # fixed seed


def test_probe_tiny_and_vit_l_without_weights():
    tiny = clip.probe_model(clip.TINY_MODEL)
    assert (tiny.embed_dim, tiny.image_size, tiny.token_shape) == (32, (32, 32), (16, 64))
    assert tiny.checkpoint is None and tiny.checkpoint_sha256 == ""
    # ViT-L-14 by config alone: built on the meta device, nothing downloaded, nothing allocated
    big = clip.probe_model("ViT-L-14", None)
    assert (big.embed_dim, big.image_size, big.token_shape) == (768, (224, 224), (256, 1024))
    assert big.preprocess_cfg["interpolation"] == "bicubic"


def test_bad_model_or_pretrained_is_a_clear_error():
    with pytest.raises(clip.ModelError, match="no such open_clip architecture"):
        clip.probe_model("ViT-Nope-99")
    with pytest.raises(clip.ModelError, match="neither a file nor a pretrained tag"):
        clip.probe_model("ViT-B-32", "/no/such/checkpoint.pt")


def test_split_preprocessing_is_bit_identical_to_the_models_own(tmp_path):
    cfg = _cfg(tmp_path)
    ckpt = clip.ensure_demo_model(cfg.extract)
    visual, preprocess = clip.load_visual(clip.TINY_MODEL, ckpt)
    pil_part, tensor_steps = clip.split_transform(preprocess)
    rng = np.random.default_rng(0)
    for shape, mode in (((50, 70, 3), "RGB"), ((40, 40), "L"), ((33, 90, 4), "RGBA")):
        img = Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        pixels = clip.to_pixels(pil_part, Image.open(io.BytesIO(buf.getvalue())), (32, 32))
        ours = clip.pixels_to_tensor(pixels[None], tensor_steps)
        theirs = preprocess(Image.open(io.BytesIO(buf.getvalue())))[None]
        assert torch.equal(ours, theirs)


def test_checkpoint_loads_through_open_clip_like_real_weights(tmp_path):
    import open_clip

    cfg = _cfg(tmp_path)
    ckpt = clip.ensure_demo_model(cfg.extract)
    clip.register_model_configs()
    model, _, preprocess = open_clip.create_model_and_transforms(clip.TINY_MODEL, pretrained=ckpt)
    reference = clip.build_tiny_model(seed=cfg.extract.seed)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(x), reference.encode_image(x))
    spec = clip.probe_model(clip.TINY_MODEL, ckpt)
    assert spec.checkpoint == ckpt and spec.checkpoint_sha256 == clip.file_sha256(ckpt)


def test_precision_resolution():
    assert clip.resolve_precision("auto", "cpu") == "fp32"
    assert clip.resolve_precision("auto", "cuda") == "amp_bf16"
    with pytest.raises(clip.ModelError):
        clip.resolve_precision("fp8", "cpu")
