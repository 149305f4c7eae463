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


def _preprocess_variants() -> dict[tuple, tuple[str, str]]:
    """Every distinct preprocessing in open_clip's pretrained-tag table -> one (model, tag) using it
    whose architecture matches the tag's activation (the pairs LingCloud accepts)."""
    import open_clip

    variants: dict[tuple, tuple[str, str]] = {}
    for model, tag in open_clip.list_pretrained():
        cfg = clip.tag_cfg(model, tag)
        key = tuple(_plain(cfg.get(k)) for k in PREPROCESS_KEYS)
        arch = open_clip.get_model_config(model) or {}
        if key not in variants and bool(cfg.get("quick_gelu", False)) == bool(arch.get("quick_gelu", False)):
            variants[key] = (model, tag)
    return variants


PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")


def _plain(v):
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else v


def test_every_tag_preprocessing_variant_is_probed_without_downloading(tmp_path, monkeypatch):
    """The driver takes a tag's own preprocessing from open_clip's table and downloads nothing."""
    monkeypatch.setenv(clip.WEIGHTS_CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip would be open_clip's default
    variants = _preprocess_variants()
    assert len(variants) >= 8  # open_clip 3.3 has 8 (OpenAI, SigLIP, CLIPA, MobileCLIP, PE, ... settings)
    for key, (model, tag) in variants.items():
        spec = clip.probe_model(model, tag)
        got = tuple(_plain(spec.preprocess_cfg.get(k)) for k in PREPROCESS_KEYS)
        want = tuple(_plain(v) if v is not None else _plain(spec.preprocess_cfg.get(k))
                     for k, v in zip(PREPROCESS_KEYS, key))  # a tag without fill_color keeps the default
        assert got == want, (model, tag)
        assert spec.checkpoint is None and spec.checkpoint_sha256 == ""
    assert not (tmp_path / "cache").exists() and not (tmp_path / "home").exists()


def test_tags_trained_with_another_activation_are_refused(monkeypatch):
    from open_clip.pretrained import _PRETRAINED

    with pytest.raises(clip.ModelError, match="trained with QuickGELU.*use extract.model=ViT-L-14-quickgelu"):
        clip.probe_model("ViT-L-14", "openai")
    gelu = dict(clip.tag_cfg("ViT-L-14", "laion2b_s32b_b82k"))  # a GELU tag registered on a QuickGELU name
    monkeypatch.setitem(_PRETRAINED["ViT-L-14-quickgelu"], "gelu_tag", gelu)
    with pytest.raises(clip.ModelError, match="trained with GELU.*use extract.model=ViT-L-14$"):
        clip.probe_model("ViT-L-14-quickgelu", "gelu_tag")
    with pytest.raises(clip.ModelError, match="QuickGELU"):
        clip.load_visual("ViT-B-32", "openai")  # refused before anything is downloaded
    spec = clip.probe_model("ViT-L-14-quickgelu", "openai")
    assert (spec.embed_dim, spec.image_size) == (768, (224, 224))


def test_defaults_and_shipped_configs_name_matching_activations():
    from pathlib import Path

    configs = sorted((Path(clip.REPO_ROOT) / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in [None, *configs]:
        ec = load_config(str(path) if path else None).extract
        if ec.pretrained and clip.tag_cfg(ec.model, ec.pretrained):
            clip.check_activation(ec.model, ec.pretrained)  # raises on a mismatch
    assert load_config(None).extract.model == "ViT-L-14-quickgelu"
