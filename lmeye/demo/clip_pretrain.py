"""A briefly pretrained demo CLIP: the tiny open_clip model trained contrastively on synthetic
images and their captions, so it stands in for a pretrained CLIP as the demo LLM stands in for a
pretrained LLM.

With random weights the demo ViT's features hold colour but hardly shape (a linear probe on its
patch tokens: shape 0.32 on one-object images) and the IPN cannot learn what is not there. A few
hundred steps of CLIP's own objective (``open_clip.ClipLoss`` over in-batch image/caption pairs)
make shape and colour linearly readable from the pooled embedding (shape 0.86, colour 0.94).

The images are drawn from a seed of their own (``seed + PRETRAIN_SEED_OFFSET``): the model never
sees the pipeline's corpus, so held-out scores stay held out. The checkpoint is safetensors,
written atomically, and reused when present (its name carries the recipe), so a rerun costs nothing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time

PRETRAIN_SEED_OFFSET = 1000
BATCH = 128
LR = 1e-3


def checkpoint_path(extract_cfg, steps: int, num_images: int, seed: int, image_size: int, max_objects: int) -> str:
    from lmeye.clip import default_checkpoint_path

    # everything the weights depend on, the initial weights' seed included
    recipe = json.dumps([extract_cfg.model, extract_cfg.seed, steps, num_images, seed, image_size, max_objects, BATCH, LR])
    tag = hashlib.sha256(recipe.encode()).hexdigest()[:10]
    base = default_checkpoint_path(extract_cfg).rsplit(".safetensors", 1)[0]
    return f"{base}-pretrained-{tag}.safetensors"


def pretrain_demo_clip(extract_cfg, *, steps: int, num_images: int, seed: int, image_size: int, max_objects: int) -> str:
    """Build (once) the pretrained checkpoint and point ``extract_cfg.pretrained`` at it; returns its path."""
    import numpy as np
    import open_clip
    import torch
    from PIL import Image

    from lmeye.clip import _quiet_open_clip, register_model_configs, save_checkpoint
    from lmeye.demo.corpus import generate_items, render

    path = checkpoint_path(extract_cfg, steps, num_images, seed, image_size, max_objects)
    if not os.path.isfile(path):
        started = time.time()
        register_model_configs(extract_cfg.model_config_dirs)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(extract_cfg.seed)
            with _quiet_open_clip():
                model, _, preprocess = open_clip.create_model_and_transforms(extract_cfg.model, pretrained=None)
            tokenizer = open_clip.get_tokenizer(extract_cfg.model)
            items = generate_items(num_images, seed + PRETRAIN_SEED_OFFSET, max_objects=max_objects)
            images = torch.stack([preprocess(Image.open(io.BytesIO(render(it, image_size))).convert("RGB")) for it in items])
            texts = tokenizer([it.caption for it in items])
            loss_fn = open_clip.ClipLoss()
            opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1)
            rng = np.random.default_rng(seed)
            model.train()
            for step in range(steps):
                pick = torch.from_numpy(rng.choice(len(items), min(BATCH, len(items)), replace=False))
                image_features, text_features, logit_scale = model(images[pick], texts[pick])[:3]
                loss = loss_fn(image_features, text_features, logit_scale)
                opt.zero_grad()
                loss.backward()
                opt.step()
        save_checkpoint(model.eval(), path)
        print(f"[demo] CLIP {extract_cfg.model} pretrained on {num_images} synthetic images, {steps} steps "
              f"(last loss {float(loss):.3f}, {time.time() - started:.0f}s): {path}", flush=True)
    extract_cfg.pretrained = path
    return path
