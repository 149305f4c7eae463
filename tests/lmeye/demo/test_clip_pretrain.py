"""The pretrained demo CLIP: trained on images of its own seed, saved as safetensors, reused."""

from __future__ import annotations

import os

import numpy as np
import pytest

from lmeye.config import load_config


def test_pretrained_checkpoint_is_built_once_and_changes_the_features(tmp_path):
    torch = pytest.importorskip("torch")
    from lmeye.clip import ensure_demo_model, load_visual
    from lmeye.demo.clip_pretrain import PRETRAIN_SEED_OFFSET, pretrain_demo_clip
    from lmeye.demo.corpus import generate_items

    cfg = load_config("configs/demo.yaml", {"data.root": str(tmp_path)}).extract
    random_path = ensure_demo_model(cfg.model_copy())
    args = dict(steps=3, num_images=16, seed=0, image_size=32, max_objects=2)
    path = pretrain_demo_clip(cfg, **args)
    assert cfg.pretrained == path and path.endswith(".safetensors") and os.path.isfile(path)
    assert os.path.dirname(path) == os.path.dirname(random_path)
    mtime = os.path.getmtime(path)
    assert pretrain_demo_clip(cfg.model_copy(update={"pretrained": None}), **args) == path  # reused, not retrained
    assert os.path.getmtime(path) == mtime
    assert pretrain_demo_clip(cfg.model_copy(update={"pretrained": None}), **{**args, "steps": 4}) != path  # another recipe

    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        trained = load_visual(cfg.model, path)[0](x)
        untouched = load_visual(cfg.model, random_path)[0](x)
    assert not np.allclose(trained.numpy(), untouched.numpy())
    # the pretraining images are not the pipeline's corpus
    assert generate_items(16, PRETRAIN_SEED_OFFSET, 2) != generate_items(16, 0, 2)
