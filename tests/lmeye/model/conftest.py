"""Tiny frozen parts for the IPN tests (built once per session): tokenizer, LLMs, CLIP."""

from __future__ import annotations

import pytest

from lmeye.model.testing import FAMILIES, FEATURE_DIM, MORE_FAMILIES, PATCH_SHAPE, tiny_clip_checkpoint, tiny_model_config, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="session")
def llm_dirs(tmp_path_factory, tokenizer) -> dict[str, str]:
    from lmeye.model.demo import build_tiny_llm

    root = tmp_path_factory.mktemp("llms")
    return {f: build_tiny_llm(str(root / f), f, tokenizer) for f in FAMILIES + MORE_FAMILIES}


@pytest.fixture(scope="session")
def clip_checkpoint(tmp_path_factory) -> str:
    return tiny_clip_checkpoint(str(tmp_path_factory.mktemp("clip") / "tiny.safetensors"))


@pytest.fixture(scope="session")
def model_cfg(llm_dirs, clip_checkpoint):
    def make(family: str = "llama", **kw):
        return tiny_model_config(llm_dirs[family], clip_checkpoint, **kw)

    return make


@pytest.fixture(scope="session")
def ipn_factory(model_cfg):
    from lmeye.model import build_ipn

    def make(family: str = "llama", patch_shape=PATCH_SHAPE, **kw):
        return build_ipn(model_cfg(family, **kw), FEATURE_DIM, patch_shape)

    return make


@pytest.fixture(scope="session")
def released(tmp_path_factory) -> dict[str, str]:
    """Every family of lmeye.model.released: a tokenizer in its released style and a tiny LLM."""
    from lmeye.model.released import FAMILIES, build_family

    root = tmp_path_factory.mktemp("released")
    return {name: build_family(str(root / name), name) for name in FAMILIES}
