"""Tiny frozen parts for the IPN tests: a demo tokenizer, random LLMs of several families, a tiny CLIP."""

from __future__ import annotations

import numpy as np
import pytest

from lmeye.config.model import ModelConfig

FAMILIES = ("llama", "gpt2", "qwen2")
FEATURE_DIM = 32  # lingcloud-tiny-vit: pooled embedding
PATCH_SHAPE = (16, 64)  # lingcloud-tiny-vit at 32 px: 16 tokens x width 64


@pytest.fixture(scope="session")
def tokenizer():
    from lmeye.model.demo import build_tokenizer, demo_conversations

    convs = demo_conversations(num_images=24)
    return build_tokenizer([" ".join(t["content"] for t in c) for c in convs], vocab_size=400)


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory, tokenizer) -> dict[str, str]:
    from lmeye.model.demo import build_tiny_llm

    root = tmp_path_factory.mktemp("llms")
    return {f: build_tiny_llm(str(root / f), f, tokenizer) for f in (*FAMILIES, "opt")}


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory) -> str:
    from lmeye.clip import build_tiny_model, save_checkpoint

    return save_checkpoint(build_tiny_model(0), str(tmp_path_factory.mktemp("clip") / "tiny.safetensors"))


@pytest.fixture(scope="session")
def model_cfg(llm_dirs, clip_checkpoint):
    def make(family: str = "llama", **kw) -> ModelConfig:
        base = dict(llm=llm_dirs[family], clip_model="lingcloud-tiny-vit", clip_pretrained=clip_checkpoint, max_length=128)
        return ModelConfig(**{**base, **kw})

    return make


@pytest.fixture(scope="session")
def ipn_factory(model_cfg):
    from lmeye.model import IPN

    def make(family: str = "llama", patch_shape=PATCH_SHAPE, **kw):
        return IPN.from_config(model_cfg(family, **kw), FEATURE_DIM, patch_shape)

    return make


QA = [
    ([{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"}], True),
    ([{"role": "user", "content": "Describe the image briefly."},
      {"role": "assistant", "content": "a blue square at the top left on a white background"}], True),
    ([{"role": "user", "content": "What shape is in the centre?"}, {"role": "assistant", "content": "star"},
      {"role": "user", "content": "What colour is the background?"}, {"role": "assistant", "content": "black"}], False),
    ([{"role": "user", "content": "How many shapes are in the image?"}, {"role": "assistant", "content": "3"}], True),
]


def features(n: int, seed: int = 0, patch_shape=PATCH_SHAPE):
    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((n, FEATURE_DIM)).astype(np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    patches = rng.standard_normal((n, *patch_shape)).astype(np.float32) if patch_shape else None
    return emb, patches


def batch_of(ipn, samples=QA, seed: int = 0, patch_shape=PATCH_SHAPE):
    encs = [ipn.encode(conv, has_image) for conv, has_image in samples]
    emb, patches = features(len(samples), seed, patch_shape)
    return ipn.collate(encs, emb, patches)
