"""Tiny frozen parts and sample data for tests of the IPN and of code built on it (training,
serving): a demo tokenizer, random LLMs of several families, the tiny CLIP, synthetic features.
Everything is built from configs in seconds; nothing is downloaded."""

from __future__ import annotations

import numpy as np

from lmeye.config.model import ModelConfig

FAMILIES = ("llama", "gpt2", "qwen2")  # the three the issue names; OPT and BLOOM are checked too
MORE_FAMILIES = ("opt", "bloom")
FEATURE_DIM = 32  # lingcloud-tiny-vit: pooled embedding
PATCH_SHAPE = (16, 64)  # lingcloud-tiny-vit at 32 px: 16 tokens x width 64

QA = [  # (conversation, has_image): three with an image, one text-only multi-turn
    ([{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"}], True),
    ([{"role": "user", "content": "Describe the image briefly."},
      {"role": "assistant", "content": "a blue square at the top left on a white background"}], True),
    ([{"role": "user", "content": "What shape is in the centre?"}, {"role": "assistant", "content": "star"},
      {"role": "user", "content": "What colour is the background?"}, {"role": "assistant", "content": "black"}], False),
    ([{"role": "user", "content": "How many shapes are in the image?"}, {"role": "assistant", "content": "3"}], True),
]


def tiny_tokenizer(num_images: int = 24, vocab_size: int = 400):
    from lmeye.model.demo import build_tokenizer, demo_conversations

    convs = demo_conversations(num_images=num_images)
    return build_tokenizer([" ".join(t["content"] for t in c) for c in convs], vocab_size=vocab_size)


def tiny_clip_checkpoint(path: str) -> str:
    """The demo's tiny open_clip model (seed 0) as a safetensors checkpoint at ``path``."""
    from lmeye.clip import build_tiny_model, save_checkpoint

    return save_checkpoint(build_tiny_model(0), path)


def tiny_model_config(llm_dir: str, clip_checkpoint: str, **kw) -> ModelConfig:
    base = dict(llm=llm_dir, clip_model="lingcloud-tiny-vit", clip_pretrained=clip_checkpoint, max_length=128)
    return ModelConfig(**{**base, **kw})


def features(n: int, seed: int = 0, patch_shape=PATCH_SHAPE):
    """(embeddings (n, 32) L2-normalised, patch tokens (n, 16, 64) or None), as the features table holds them."""
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, FEATURE_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    patches = rng.standard_normal((n, *patch_shape)).astype(np.float32) if patch_shape else None
    return emb, patches


def batch_of(ipn, samples=QA, seed: int = 0, patch_shape=PATCH_SHAPE):
    encs = [ipn.encode(conv, has_image) for conv, has_image in samples]
    emb, patches = features(len(samples), seed, patch_shape)
    return ipn.collate(encs, emb, patches)
