"""The train stage's preflight on the driver (lmeye.train.preflight through pipelines.train.run):
each deterministic mistake is one UserError naming the key or path, raised before Ray starts (so
no worker loads the LLM and Ray Train's FailureConfig never retries it); RVII's CLIP defaults to
the one that made the features table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from lmeye.config import load_config
from lmeye.errors import UserError
from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, tiny_clip_checkpoint, tiny_tokenizer

HERE = Path(__file__).parent


def _fake():
    spec = importlib.util.spec_from_file_location("_fake_ipn_file", HERE / "fake_ipn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def parts(tmp_path_factory):
    """A tiny LLaMA with the demo tokenizer (chat template), the tiny CLIP, and tables whose
    features name that CLIP (model and checkpoint) in their metadata."""
    from lmeye.model.demo import build_tiny_llm

    root = tmp_path_factory.mktemp("preflight")
    tok = tiny_tokenizer()
    llm = build_tiny_llm(str(root / "llm"), "llama", tok)
    clip = tiny_clip_checkpoint(str(root / "clip.safetensors"))
    fake = _fake()
    tables = fake.build_tables(root, n_train=6, n_val=2, dim=FEATURE_DIM, patch=PATCH_SHAPE)
    uids = sorted({r["uid"] for r in tables["rows"] if r["uid"]})
    for name, meta in {"features": {"model": "lingcloud-tiny-vit", "pretrained": clip},
                       "features_random": {"model": "lingcloud-tiny-vit", "pretrained": "none (random init, seed 0)"},
                       "features_grid": {"model": "lingcloud-tiny-vit", "pretrained": clip}}.items():
        if (root / name).exists():
            import shutil

            shutil.rmtree(root / name)
        patch = (40, PATCH_SHAPE[1]) if name == "features_grid" else PATCH_SHAPE  # 40 tokens: no square grid
        fake.write_features(root / name, uids, dim=FEATURE_DIM, patch=patch, meta=meta)
    return {"root": root, "llm": llm, "clip": clip, "tok": tok, "tables": tables}


@pytest.fixture
def no_ray(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Ray was started before the preflight failed")

    monkeypatch.setattr("lmeye.runtime.init_ray", boom)


def _cfg(parts, tmp_path, **extra):
    t = parts["tables"]
    base = {"ray.address": "local", "train.instructions": str(t["instructions"]), "train.features": str(t["features"]),
            "train.output": str(tmp_path / "out"), "train.num_workers": 1, "train.precision": "fp32",
            "train.stages": [{"name": "s1", "trainable": "instruct"}],
            "model.llm": parts["llm"], "model.max_length": 64}
    base.update(extra)
    return load_config(None, base)


def _run(cfg):
    from pipelines.train import run

    return run(cfg)


def test_a_good_config_passes_the_preflight_and_takes_the_features_clip(parts, tmp_path):
    from pipelines.train import preflight
    from lmeye.train.model_factory import IPNFactory

    cfg, files, store, output, plan = preflight(_cfg(parts, tmp_path), IPNFactory())
    assert (cfg.model.clip_model, cfg.model.clip_pretrained) == ("lingcloud-tiny-vit", parts["clip"])
    assert [s.name for s, _ in plan] == ["s1"] and output == str(tmp_path / "out")
    random = preflight(_cfg(parts, tmp_path, **{"train.features": str(parts["root"] / "features_random")}), IPNFactory())[0]
    assert (random.model.clip_model, random.model.clip_pretrained) == ("lingcloud-tiny-vit", None)
    # named explicitly, the configured CLIP is kept
    kept = preflight(_cfg(parts, tmp_path, **{"model.clip_model": "lingcloud-small-vit"}), IPNFactory())[0]
    assert (kept.model.clip_model, kept.model.clip_pretrained) == ("lingcloud-small-vit", None)


def test_the_model_trained_on_a_features_table_records_its_clip(parts, tmp_path):
    from pipelines.train import preflight
    from lmeye.train.model_factory import IPNFactory

    factory = IPNFactory()
    cfg, _, store, _, _ = preflight(_cfg(parts, tmp_path), factory)
    ipn = factory.build(cfg, store.dim, store.patch_shape)
    ipn.save_pretrained(str(tmp_path / "model"))
    saved = json.loads((tmp_path / "model" / "ipn_config.json").read_text())
    assert saved["clip"] == {"model": "lingcloud-tiny-vit", "pretrained": parts["clip"]}


@pytest.mark.parametrize("case, match", [
    ("no_template", r"tokenizer .* has no chat template"),
    ("broken_template", r"tokenizer .*chat template fails"),
    ("no_tokenizer", r"model.tokenizer .*nowhere.*cannot load a tokenizer"),
    ("not_causal", r"model.llm .*vit.* is not a causal LM"),
    ("gelu_on_quickgelu", r"model.clip_model 'ViT-L-14' with pretrained 'openai'.*QuickGELU.*model.clip_model=ViT-L-14-quickgelu"),
    ("unknown_clip", r"model.clip_model 'no-such-clip': no such open_clip architecture"),
    ("rvii_context", r"model.rvii_image_tokens 80 .* CLIP text context"),
    ("patch_grid", r"40 patch tokens are not a square grid"),
    ("max_length", r"model.max_length 8: .* does not fit"),
    ("output", r"train.output .*: not writable"),
])
def test_each_deterministic_mistake_is_one_error_before_ray(parts, tmp_path, no_ray, case, match):
    from transformers import ViTConfig

    root = parts["root"]
    if case in ("no_template", "broken_template"):
        tok = tiny_tokenizer()
        tok.chat_template = None if case == "no_template" else "{{ raise_exception('unsupported role') }}"
        tok.save_pretrained(tmp_path / "tok")
    if case == "not_causal":
        ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16).save_pretrained(tmp_path / "vit")
    if case == "output":
        (tmp_path / "file").write_text("a file, not a folder")
    extra = {
        "no_template": {"model.tokenizer": str(tmp_path / "tok")},
        "broken_template": {"model.tokenizer": str(tmp_path / "tok")},
        "no_tokenizer": {"model.tokenizer": str(tmp_path / "nowhere")},
        "not_causal": {"model.llm": str(tmp_path / "vit")},
        "gelu_on_quickgelu": {"model.clip_model": "ViT-L-14", "model.clip_pretrained": "openai"},
        "unknown_clip": {"model.clip_model": "no-such-clip"},
        "rvii_context": {"model.rvii_image_tokens": 80},
        "patch_grid": {"train.features": str(root / "features_grid")},
        "max_length": {"model.max_length": 8},
        "output": {"train.output": str(tmp_path / "file" / "out")},
    }[case]
    with pytest.raises(UserError, match=match) as err:
        _run(_cfg(parts, tmp_path, **extra))
    assert len(str(err.value).splitlines()) == 1


def test_the_rvii_text_tower_refuses_another_activation_than_its_weights(parts):
    """Building the tower itself (every worker, every load of a trained IPN) applies the same check:
    ViT-L-14 + openai would be GELU on QuickGELU weights. Refused before any weights are fetched."""
    import torch

    from lmeye.model.rvii import load_clip_text_tower

    with pytest.raises(UserError, match="QuickGELU.*model.clip_model=ViT-L-14-quickgelu"):
        load_clip_text_tower("ViT-L-14", "openai", [], torch.float32)
