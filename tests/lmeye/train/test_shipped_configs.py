"""Every shipped config that trains passes the train stage's driver preflight (pipelines.train.preflight)
against tiny local stand-ins of the models it names: an LLM of the same architecture class with random
weights (saved under a temporary path the test maps the name to), and a features table of the shape
and metadata its extract section would write (the CLIP probed without weights, pipelines.extract's own
table metadata). Nothing is downloaded; a config naming an LLM this file does not map fails here."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml

from lmeye.config import load_config
from lmeye.model.testing import tiny_tokenizer

REPO = Path(__file__).resolve().parents[3]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
TRAINING = [p for p in CONFIGS if {"model", "train"} & set(yaml.safe_load(p.read_text()) or {})]
# the LLM each config names -> the architecture family of its stand-in (lmeye.model.demo.TINY_FAMILIES);
# null is the demo LLM (a LlamaForCausalLM, configs/models/lingcloud-tiny-llm.json)
STAND_INS = {None: "llama", "meta-llama/Llama-2-7b-chat-hf": "llama"}


def _fake():
    spec = importlib.util.spec_from_file_location("_fake_ipn_file", Path(__file__).with_name("fake_ipn.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_real_configs_train():
    names = {p.name for p in TRAINING}
    assert {"llava.yaml", "demo.yaml"} <= names


@pytest.mark.parametrize("path", TRAINING, ids=[p.stem for p in TRAINING])
def test_shipped_config_passes_the_driver_preflight(path, tmp_path, monkeypatch):
    from lmeye import clip
    from lmeye.model.demo import build_tiny_llm
    from lmeye.train.model_factory import IPNFactory
    from lmeye.uid import uid_for
    from pipelines.extract import table_metadata
    from pipelines.train import preflight

    def boom(*a, **k):
        raise AssertionError("the preflight started Ray")

    monkeypatch.setattr("lmeye.runtime.init_ray", boom)
    cfg = load_config(str(path))
    # only a demo config may leave model.llm null: the demo pipeline builds its LLM (ensure_demo_llm)
    assert cfg.model.llm is not None or "demo" in yaml.safe_load(path.read_text()), f"{path.name}: model.llm: not set"
    assert cfg.model.llm in STAND_INS, f"{path.name}: model.llm {cfg.model.llm!r} has no stand-in in this test"
    llm = build_tiny_llm(str(tmp_path / "llm"), STAND_INS[cfg.model.llm], tiny_tokenizer())

    # the features its extract section would write: shapes from the CLIP built on the meta device
    ec = cfg.extract
    spec = clip.probe_model(ec.model, ec.pretrained, seed=ec.seed, config_dirs=ec.model_config_dirs, with_checksum=False)
    patch = spec.token_shape if ec.patch_tokens else None
    meta = table_metadata(ec, spec, clip.resolve_precision(ec.precision, "cuda" if ec.num_gpus else "cpu"))
    fake = _fake()
    uids = [uid_for(f"http://img/{i}.jpg") for i in range(2)]
    fake.write_features(tmp_path / "features", uids, dim=spec.embed_dim, patch=patch, meta=meta)
    tasks = sorted({t for s in cfg.train.stages for t in (s.tasks or ["vqa"])})
    rows = [{"sample_id": f"s{i}", "uid": uids[i % 2], "task": task, "split": "train",
             "conversation": [{"role": "user", "content": "What colour is the circle?"}, {"role": "assistant", "content": "red"}]}
            for i, task in enumerate(tasks)]
    fake.write_instructions(tmp_path / "instructions", rows, shards=1)

    cfg = load_config(str(path), {
        "data.root": str(tmp_path), "model.llm": llm, "train.instructions": str(tmp_path / "instructions"),
        "train.features": str(tmp_path / "features"), "train.output": str(tmp_path / "out"),
    })
    checked, _, store, _, plan = preflight(cfg, IPNFactory())
    assert [s.name for s, _ in plan] == [s.name for s in cfg.train.stages]
    assert store.patch_shape == (tuple(patch) if patch else None)
    if cfg.model.rvii == "clip_text" and cfg.model.clip_model is None:  # RVII's CLIP is the features'
        assert (checked.model.clip_model, checked.model.clip_pretrained) == (ec.model, ec.pretrained)


def test_llava_trains_lmeye_on_patch_tokens_with_the_features_clip():
    cfg = load_config(str(REPO / "configs" / "llava.yaml"))
    assert cfg.extract.patch_tokens and cfg.model.rvii == "clip_text" and cfg.model.clip_model is None
    assert (cfg.extract.model, cfg.extract.pretrained) == ("ViT-L-14-quickgelu", "openai")
